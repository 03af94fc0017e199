"""Image-classification data: ImageFolder listing, decoding, preprocessing, batching, splits.

Data never ships with mdafx. Code takes the data root (the folder that holds ``cifar10/``) from
an argument or from ``$MDAFX_DATA`` (:func:`resolve_data_root`) and says so when it is absent.

One entry point, :func:`open_images`, gives one of two datasets with the same interface
(``len``, ``ds[i] -> (x, label)``, ``class_names``, ``labels``/``targets`` read from the
folder listing without decoding):

* :class:`ArrayDataset`, the fast path for small folders of images that already have the
  model's input size: decoded once into one uint8 array, batched by slicing (no per-image
  Python work). Decoded arrays are cached as ``.npz`` files in the user's cache directory
  (:func:`default_cache_dir`), keyed by the folder's absolute path and every image's name, size
  and modification time, because decoding 50k JPEGs takes seconds while loading the cache takes
  about one (most of it the stats).
* :class:`ImageFolderStream` for everything else (large folders, mixed sizes, a resize/crop
  :class:`Preprocess` or any transform): each image is decoded when it is read, in
  ``DataLoader`` worker processes, so memory does not grow with the number of images (only the
  file list and the labels, a few bytes per image, are held).

:func:`batches` is how every workflow reads a dataset: a dataset's own fast ``batches`` when
it has one, else a ``torch.utils.data.DataLoader`` over exactly the requested indices, in
order (``dataset.workers`` worker processes, pinned memory for a GPU).

Preprocessing (:class:`Preprocess`) is the standard evaluation recipe: resize the shorter side
(PIL, antialiased), centre crop, scale to [0, 1], normalise with the input format's mean/std;
exactly what torchvision weights' ``transforms()`` and timm's evaluation transform compute.
:func:`model_recipe` reads it from a torchvision weights entry or a timm model's data config.

Sample selection (MDA section 1.1) and logit calibration (section 2.1) draw from *disjoint*
per-class subsets of the training split (:func:`split_per_class`); the test split is only ever
used for the final scores.

Example (a tiny in-memory dataset):

>>> import numpy as np
>>> imgs = np.zeros((4, 8, 8, 3), dtype=np.uint8)
>>> ds = ArrayDataset(imgs, np.array([0, 1, 0, 1]), mean=(0.5,) * 3, std=(0.5,) * 3)
>>> x, y = ds[1]
>>> tuple(x.shape), y, float(x.min())
((3, 8, 8), 1, -1.0)
>>> [tuple(xb.shape) for xb, _ in ds.batches(3)]
[(3, 3, 8, 8), (1, 3, 8, 8)]
>>> [idx.tolist() for idx in split_per_class(np.array([0, 0, 1, 1, 1, 1]), [1, 1], seed=0)]
[[0, 5], [1, 2]]
>>> Preprocess(resize=256, crop=224).describe()
'resize the shorter side to 256 (bilinear), centre crop 224x224'
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdafx.errors import DataError, MdafxError, OutputError
from mdafx.fileio import atomic_output

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGE_EXTENSIONS",
    "IN_MEMORY_BYTES",
    "ArrayDataset",
    "DataError",
    "DataNotFoundError",
    "ImageArrays",
    "ImageFolderStream",
    "InputFormat",
    "Preprocess",
    "batches",
    "class_names_of",
    "default_cache_dir",
    "default_workers",
    "labels_at",
    "load_imagefolder",
    "model_recipe",
    "open_images",
    "resolve_data_root",
    "split_per_class",
]

# Per-channel statistics of the CIFAR-10 training split, pixel values scaled to [0, 1].
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"})



class DataNotFoundError(MdafxError, FileNotFoundError):
    """A data folder does not exist (the message says how to point mdafx at the data)."""


# PIL modes whose conversion to 8-bit RGB would clip the value range (16/32-bit integers, floats)
_HIGH_DEPTH_MODES = ("I", "F")
_CACHE_VERSION = 1  # bump when the .npz layout changes, so stale caches are ignored

IN_MEMORY_BYTES: int = 2 * 2**30
""":func:`open_images` decodes a folder into memory (:class:`ArrayDataset`) only when its
images already have the model's size and all of them take at most this many bytes decoded;
larger folders are streamed (:class:`ImageFolderStream`)."""


def resolve_data_root(path: str | os.PathLike | None = None) -> Path | None:
    """The data root: ``path`` if given, else ``$MDAFX_DATA``, else ``None``.

    The data root is the folder that contains ``cifar10/`` (for example ``/work/shared/data``).
    Existence is not checked here; :func:`load_imagefolder` names the missing path.
    """
    if path is not None and str(path) != "":
        return Path(path).expanduser()
    env = os.environ.get("MDAFX_DATA")
    if env:
        return Path(env).expanduser()
    return None


def default_cache_dir() -> Path:
    """Where decoded images are cached: ``$MDAFX_CACHE/data`` if set, else
    ``$XDG_CACHE_HOME/mdafx/data``, else ``~/.cache/mdafx/data`` (never next to the code)."""
    env = os.environ.get("MDAFX_CACHE")
    if env:
        return Path(env).expanduser() / "data"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "mdafx" / "data"


def default_workers(processes: int = 1) -> int:
    """DataLoader worker processes per process of a run of ``processes``: the usable CPU
    cores shared among them, one left for the process itself, at most 8 each."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, processes) - 1))


@dataclass(frozen=True)
class InputFormat:
    """What a model expects: ``size`` (H, W), ``channels``, and per-channel ``mean``/``std``
    applied to [0, 1] pixels (``x = (pixel / 255 - mean) / std``)."""

    size: tuple[int, int]
    channels: int = 3
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        import math

        if len(self.size) != 2 or any(int(s) < 1 for s in self.size):
            raise DataError(f"input size must be two positive sizes, got {self.size}")
        if self.channels < 1 or len(self.mean) != self.channels or \
                len(self.std) != self.channels:
            raise DataError(f"input format: {self.channels} channels need as many mean/std "
                            f"values, got {len(self.mean)}/{len(self.std)}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or \
                any(s <= 0 for s in self.std):
            raise DataError(f"input format: mean must be finite and std finite and positive, "
                            f"got mean {list(self.mean)}, std {list(self.std)}")

    @classmethod
    def from_dict(cls, d: dict) -> "InputFormat":
        try:
            return cls((int(d["size"][0]), int(d["size"][1])), int(d["channels"]),
                       tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"malformed input format {d!r}") from e

    def to_dict(self) -> dict:
        return {"size": list(self.size), "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std)}

    def example(self, batch: int = 1) -> torch.Tensor:
        """A zero input of this format."""
        return torch.zeros(batch, self.channels, *self.size)


_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming",
                   "lanczos")


def _pair(value: Any, what: str) -> tuple[int, int]:
    """``N`` or ``(H, W)`` as a pair of positive ints; DataError otherwise."""
    try:
        h, w = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be N or (H, W), got {value!r}") from None
    if h < 1 or w < 1:
        raise DataError(f"{what} must be positive, got {value!r}")
    return h, w


@dataclass(frozen=True)
class Preprocess:
    """The standard evaluation preprocessing of a decoded RGB image, before normalisation.

    ``resize``: an int resizes the *shorter* side to it (aspect kept, the longer side
    truncated, as ``torchvision.transforms.Resize(int)``); a pair ``(H, W)`` resizes to exactly
    that; None does not resize. ``crop``: a centre crop of ``N`` or ``(H, W)`` (zero padding
    where the image is smaller, as ``CenterCrop``); None does not crop. ``interpolation``:
    one of ``nearest, nearest-exact, bilinear, bicubic, box, hamming, lanczos`` (PIL's
    antialiased resampling). The image is then scaled to [0, 1] and normalised with the
    input format's mean and std by the dataset that reads it. This is what torchvision
    weights' ``transforms()`` (``ImageClassification``) and timm's evaluation transform do to
    a PIL image, computed by the same torchvision functions (:func:`model_recipe`).
    """

    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize is not None:
            if isinstance(self.resize, (int, np.integer)):
                if int(self.resize) < 1:
                    raise DataError(f"resize must be positive, got {self.resize}")
                object.__setattr__(self, "resize", int(self.resize))
            else:
                object.__setattr__(self, "resize", _pair(self.resize, "resize"))
        if self.crop is not None:
            object.__setattr__(self, "crop", _pair(self.crop, "crop"))
        if self.interpolation not in _INTERPOLATIONS:
            raise DataError(f"interpolation {self.interpolation!r}: expected one of "
                            f"{', '.join(_INTERPOLATIONS)}")

    @property
    def identity(self) -> bool:
        """Neither resizes nor crops."""
        return self.resize is None and self.crop is None

    def __call__(self, img):
        """``img`` (a PIL image) resized and cropped."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        if self.resize is not None:
            size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
            img = F.resize(img, size, interpolation=InterpolationMode(self.interpolation))
        if self.crop is not None:
            img = F.center_crop(img, list(self.crop))
        return img

    def describe(self) -> str:
        parts = []
        if isinstance(self.resize, int):
            parts.append(f"resize the shorter side to {self.resize} ({self.interpolation})")
        elif self.resize is not None:
            parts.append(f"resize to {self.resize[0]}x{self.resize[1]} ({self.interpolation})")
        if self.crop is not None:
            parts.append(f"centre crop {self.crop[0]}x{self.crop[1]}")
        return ", ".join(parts) or "none"

    def to_dict(self) -> dict:
        return {"resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize,
                "crop": list(self.crop) if self.crop is not None else None,
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        try:
            resize = d.get("resize")
            return cls(tuple(resize) if isinstance(resize, list) else resize,
                       tuple(d["crop"]) if d.get("crop") is not None else None,
                       str(d.get("interpolation", "bilinear")))
        except (AttributeError, TypeError, KeyError) as e:
            raise DataError(f"malformed preprocessing {d!r}") from e


def model_recipe(source: Any, channels: int = 3) -> tuple[Preprocess, InputFormat] | None:
    """The evaluation preprocessing and input format a model was trained with, where the
    object offers it (None otherwise):

    * a torchvision weights entry (``ResNet50_Weights.IMAGENET1K_V2``, or its name as a
      string): its ``transforms()`` (resize, crop, interpolation, mean, std);
    * a timm model (``pretrained_cfg`` / ``default_cfg``): its data config (``input_size``,
      ``crop_pct``, ``crop_mode`` center or squash, ``interpolation``, ``mean``, ``std``), as
      ``timm.data.create_transform`` builds the evaluation transform.
    """
    if isinstance(source, str):
        try:
            from torchvision.models import get_weight

            source = get_weight(source)
        except (ValueError, KeyError, AttributeError) as e:
            raise DataError(f"{source!r} is not a torchvision weights name (e.g. "
                            "ResNet50_Weights.IMAGENET1K_V2)") from e
    transforms = getattr(source, "transforms", None)
    if callable(transforms) and hasattr(source, "meta"):
        t = transforms()
        try:
            resize, crop = int(t.resize_size[0]), int(t.crop_size[0])
            interpolation = getattr(t.interpolation, "value", str(t.interpolation))
            mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
        except (AttributeError, IndexError, TypeError) as e:
            raise DataError(f"{source}: its transforms() is not torchvision's "
                            "ImageClassification preset") from e
        return (Preprocess(resize, (crop, crop), interpolation),
                InputFormat((crop, crop), channels, mean, std))
    cfg = getattr(source, "pretrained_cfg", None) or getattr(source, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        try:
            from timm.data import resolve_data_config

            cfg = resolve_data_config({}, model=source)
        except ImportError:
            pass
        _, h, w = (int(v) for v in cfg["input_size"])
        pct = float(cfg.get("crop_pct") or 0.875)
        mode = cfg.get("crop_mode") or "center"
        scale = (math.floor(h / pct), math.floor(w / pct))
        if mode == "center":
            resize: int | tuple[int, int] = scale[0] if scale[0] == scale[1] else scale
        elif mode == "squash":
            resize = scale
        else:
            raise DataError(f"timm crop_mode {mode!r} is not supported; give the resize and "
                            "crop yourself (--resize N --crop N)")
        interpolation = str(cfg.get("interpolation") or "bilinear")
        mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        return (Preprocess(resize, (h, w), interpolation),
                InputFormat((h, w), channels, mean, std))
    return None


@dataclass
class ImageArrays:
    """A decoded image-classification split.

    ``images``: uint8, N x H x W x C. ``labels``: int64, N, indices into ``class_names``
    (the sorted class-folder names).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _scan(split_dir: Path) -> tuple[list[str], list[list[str]]]:
    """The class folders of ``split_dir`` (sorted, hidden ones skipped) and each one's image
    file names (sorted), from directory entries alone: nothing is opened or stat'ed."""
    if not split_dir.is_dir():
        raise DataNotFoundError(
            f"image folder {str(split_dir)!r} does not exist (expected <split>/<class>/<image>; "
            "set the data root with --data or MDAFX_DATA)"
        )
    with os.scandir(split_dir) as it:
        class_names = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise DataError(f"image folder {str(split_dir)!r} has no class sub-folders")
    files = []
    for name in class_names:
        with os.scandir(split_dir / name) as it:
            imgs = sorted(e.name for e in it if e.is_file()
                          and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        if not imgs:
            raise DataError(
                f"class folder {str(split_dir / name)!r} contains no images "
                f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files.append(imgs)
    return class_names, files


def _list_imagefolder(split_dir: Path) -> tuple[list[str], list[list[Path]]]:
    class_names, files = _scan(split_dir)
    return class_names, [[split_dir / c / f for f in fs] for c, fs in zip(class_names, files)]


def _cache_path(cache_dir: Path, split_dir: Path, class_files: list[list[Path]]) -> Path:
    """The cache file of ``split_dir``: keyed by its path and every image's relative path, size
    and modification time, so that adding, removing, renaming or rewriting an image misses."""
    listing = hashlib.sha1(f"v{_CACHE_VERSION}|{split_dir}".encode())
    n_files = 0
    for files in class_files:
        for f in files:
            st = f.stat()
            listing.update(f"|{f.relative_to(split_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
            n_files += 1
    digest = listing.hexdigest()[:16]
    # A readable prefix (last two path parts) makes the cache folder browsable.
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(split_dir.parts[-2:]))
    return cache_dir / f"{stem}-{n_files}-{digest}.npz"


def _read_rgb(path: Path | str):
    """The image at ``path`` as an 8-bit RGB PIL image; DataError naming it otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in _HIGH_DEPTH_MODES or mode.startswith("I;"):
                raise DataError(f"image {str(path)!r} has mode {mode!r} (16-bit or "
                                "float pixels); mdafx reads 8-bit images: convert the "
                                "data set to 8-bit RGB first")
            return im.convert("RGB")
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {str(path)!r}: {e}") from e


def _decode(class_files: list[list[Path]]) -> tuple[np.ndarray, np.ndarray]:
    n = sum(len(f) for f in class_files)
    images: np.ndarray | None = None
    labels = np.empty(n, dtype=np.int64)
    first: Path | None = None
    i = 0
    for label, files in enumerate(class_files):
        for path in files:
            arr = np.asarray(_read_rgb(path))
            if images is None:
                images = np.empty((n, *arr.shape), dtype=np.uint8)
                first = path
            elif arr.shape != images.shape[1:]:
                raise DataError(
                    f"images of mixed sizes: {str(path)!r} is {arr.shape[1]}x{arr.shape[0]} "
                    f"but {str(first)!r} is {images.shape[2]}x{images.shape[1]} (give a "
                    "resize/crop, --resize N --crop N, to read it)"
                )
            images[i] = arr
            labels[i] = label
            i += 1
    assert images is not None
    return images, labels


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_imagefolder(
    split_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> ImageArrays:
    """Decode an ImageFolder split (``split_dir/<class>/<image>``) into uint8 arrays.

    Classes are the sub-folders in sorted order; images within a class are in sorted file-name
    order, so the result is deterministic. Images are converted to RGB and must all have the
    same size. The decoded arrays are cached under ``cache_dir`` (default
    :func:`default_cache_dir`), keyed by the absolute path of ``split_dir`` and every image's
    relative path, size and modification time, and written atomically; ``use_cache=False`` neither reads nor writes it.

    Raises :class:`DataNotFoundError` (a ``FileNotFoundError``) for a missing folder and
    :class:`DataError` (a ``ValueError``) naming the path for a folder without classes, a class
    folder without images, an unreadable image, or images of mixed sizes. Both are
    :class:`~mdafx.errors.MdafxError`.
    """
    split_dir = Path(split_dir).expanduser().resolve()
    class_names, class_files = _list_imagefolder(split_dir)
    n_files = sum(len(f) for f in class_files)

    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = _cache_path(cache_root, split_dir, class_files)
    if use_cache and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                cached = ImageArrays(z["images"], z["labels"], [str(c) for c in z["class_names"]])
            if len(cached) == n_files and cached.class_names == class_names:
                return cached
        except (OSError, KeyError, ValueError):
            pass  # a corrupt or foreign cache file is rebuilt below

    images, labels = _decode(class_files)
    result = ImageArrays(images, labels, class_names)
    if use_cache:
        try:
            _atomic_savez(cache, images=images, labels=labels, class_names=np.array(class_names))
        except (OSError, OutputError) as e:  # a read-only or full cache only costs speed
            warnings.warn(f"could not write the data cache {str(cache)!r}: {e}", stacklevel=2)
    return result


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 N x H x W x C images + int labels as normalised float C x H x W tensors.

    ``augment=True`` applies the standard CIFAR augmentation on tensors: zero-pad by
    ``pad`` pixels (black in pixel space), take a random crop of the original size, and flip
    horizontally with probability 1/2.

    ``ds[i]`` works with a ``DataLoader`` (augmentation then draws from the global torch RNG);
    :meth:`batches` is the fast path: it converts whole batches at once and takes a
    ``torch.Generator`` for shuffling and augmentation, so training is deterministic per seed.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        augment: bool = False,
        pad: int = 4,
        class_names: Sequence[str] | None = None,
    ):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(
                f"images must be uint8 N x H x W x C, got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise DataError(f"labels shape {labels.shape} != ({images.shape[0]},)")
        c = images.shape[3]
        if len(mean) != c or len(std) != c:
            raise DataError(f"mean/std need {c} values, got {len(mean)}/{len(std)}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.augment = augment
        self.pad = pad
        self.class_names = list(class_names) if class_names is not None else None
        self.root: Path | None = None  # the folder it was decoded from (open_images)
        # x_norm = x_uint8 * scale + shift  ==  (x / 255 - mean) / std
        std_t = torch.tensor(std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, c, 1, 1)
        self._shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, c, 1, 1)

    @classmethod
    def from_arrays(cls, arrays: ImageArrays, **kwargs) -> ArrayDataset:
        return cls(arrays.images, arrays.labels, **kwargs)

    def __len__(self) -> int:
        return len(self.labels)

    def _augment(self, imgs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Random pad-crop + horizontal flip of uint8 B x H x W x C images."""
        b, h, w, _ = imgs.shape
        p = self.pad
        if p > 0:
            padded = torch.nn.functional.pad(imgs, (0, 0, p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b, 1, 1), generator=gen)
            dx = torch.randint(0, 2 * p + 1, (b, 1, 1), generator=gen)
            rows = dy + torch.arange(h).view(1, h, 1)
            cols = dx + torch.arange(w).view(1, 1, w)
            imgs = padded[torch.arange(b).view(b, 1, 1), rows, cols]
        flip = torch.rand(b, generator=gen) < 0.5
        return torch.where(flip.view(b, 1, 1, 1), imgs.flip(2), imgs)

    def _to_float(self, imgs: torch.Tensor, channels_last: bool) -> torch.Tensor:
        # NHWC storage permuted to NCHW is exactly the channels-last layout.
        x = imgs.permute(0, 3, 1, 2).float() if channels_last else (
            imgs.permute(0, 3, 1, 2).contiguous().float()
        )
        return x.mul_(self._scale).add_(self._shift)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i : i + 1] if i >= 0 else self.images[i].unsqueeze(0)
        if self.augment:
            img = self._augment(img, None)
        return self._to_float(img, channels_last=False)[0], int(self.labels[i])

    def batches(
        self,
        batch_size: int,
        indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches: x float B x C x H x W (normalised), y int64 B.

        ``indices`` restricts (and orders) the samples; ``shuffle`` permutes them with
        ``generator``, which also drives augmentation. ``channels_last`` returns x in
        channels-last memory format (no copy: the storage is already NHWC).
        """
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        idx = (
            torch.arange(len(self))
            if indices is None
            else torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        )
        if shuffle:
            idx = idx[torch.randperm(len(idx), generator=generator)]
        stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            bi = idx[start : start + batch_size]
            imgs = self.images[bi]
            if self.augment:
                imgs = self._augment(imgs, generator)
            yield self._to_float(imgs, channels_last), self.labels[bi]


def _fill(fmt_mean: Sequence[float], fmt_std: Sequence[float]) -> torch.Tensor:
    """The normalised value of a black pixel, per channel (``[C, 1, 1]``)."""
    mean = torch.tensor(fmt_mean, dtype=torch.float32)
    return (-mean / torch.tensor(fmt_std, dtype=torch.float32)).view(-1, 1, 1)


class ImageFolderStream(torch.utils.data.Dataset):
    """An ImageFolder (``root/<class>/<image>``) read one image at a time: memory does not
    grow with the number of images.

    Listing reads directory entries only: ``class_names`` (sorted folder names), ``files``
    (``class/name`` per image, sorted; a compact bytes array) and ``labels`` (also
    ``targets``, int64) exist before any image is opened. ``ds[i]`` decodes image ``i`` to
    8-bit RGB, applies ``transform`` and returns ``(x, label)``:

    * ``transform`` None or a :class:`Preprocess`: the (preprocessed) image scaled to [0, 1]
      and normalised with ``fmt``'s mean/std (``(x - mean) / std``, as torchvision's
      ``Normalize``); it must then have ``fmt.size``, else DataError naming the image;
    * any other callable ``f(PIL image) -> tensor``: its output is the model input as is
      (e.g. a torchvision transform that normalises itself).

    ``augment=True`` adds a random pad-``pad`` crop and horizontal flip (torch's global RNG,
    as ``ArrayDataset[i]``). ``workers`` is how many DataLoader processes :func:`batches` uses
    to read it (default :func:`default_workers`).
    """

    def __init__(self, root: str | os.PathLike, fmt: InputFormat,
                 transform: Preprocess | Callable[[Any], torch.Tensor] | None = None, *,
                 augment: bool = False, pad: int = 4, workers: int | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        class_names, files = _scan(self.root)
        self.fmt, self.transform, self.augment, self.pad = fmt, transform, augment, pad
        self.class_names = class_names
        self.files = np.array([f"{c}/{f}".encode("utf-8", "surrogateescape")
                               for c, names in zip(class_names, files) for f in names])
        self.labels = torch.repeat_interleave(torch.arange(len(class_names)),
                                              torch.tensor([len(f) for f in files]))
        self.workers = default_workers() if workers is None else int(workers)
        if fmt.channels != 3:
            raise DataError(f"{self.root}: images are read as 3-channel RGB but the model "
                            f"takes {fmt.channels} channels")

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        """The file of image ``i``."""
        return self.root / self.files[i].decode("utf-8", "surrogateescape")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.path(i)
        img = _read_rgb(path)
        if self.transform is None or isinstance(self.transform, Preprocess):
            from torchvision.transforms import functional as F

            if self.transform is not None:
                img = self.transform(img)
            x = F.normalize(F.convert_image_dtype(F.pil_to_tensor(img), torch.float32),
                            list(self.fmt.mean), list(self.fmt.std))
            if tuple(x.shape[1:]) != tuple(self.fmt.size):
                done = (f" after {self.transform.describe()}" if self.transform is not None
                        else "")
                raise DataError(f"image {str(path)!r} is {x.shape[2]}x{x.shape[1]} (width x "
                                f"height){done} but the model takes {self.fmt.size[1]}x"
                                f"{self.fmt.size[0]}; give a resize/crop (--resize N "
                                "--crop N) that ends at the model's input size")
        else:
            x = self.transform(img)
            if not isinstance(x, torch.Tensor):
                raise DataError(f"the transform returned a {type(x).__name__} for "
                                f"{str(path)!r}, not a tensor")
        if self.augment:
            x = self._augment(x)
        return x, int(self.labels[i])

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = x.shape
        p = self.pad
        if p > 0:
            padded = _fill(self.fmt.mean, self.fmt.std).expand(x.shape[0], h + 2 * p,
                                                               w + 2 * p).clone()
            padded[:, p:p + h, p:p + w] = x
            dy, dx = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = padded[:, dy:dy + h, dx:dx + w]
        return x.flip(-1) if bool(torch.rand(()) < 0.5) else x

    def files_digest(self, indices: Sequence[int]) -> str:
        """SHA-256 of the relative path, size and modification time of the images at
        ``indices`` (in that order): what changes when an image is replaced, without reading
        any image."""
        h = hashlib.sha256()
        for i in indices:
            st = self.path(int(i)).stat()
            h.update(self.files[int(i)] + f":{st.st_size}:{st.st_mtime_ns}|".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        what = ("no preprocessing" if self.transform is None else
                self.transform.describe() if isinstance(self.transform, Preprocess)
                else repr(self.transform))
        return (f"ImageFolderStream({str(self.root)!r}, {len(self)} images, "
                f"{len(self.class_names)} classes, {what}, {self.workers} workers)")


def split_per_class(
    labels: np.ndarray | Sequence[int],
    sizes: Sequence[float] | Sequence[int],
    seed: int = 0,
) -> list[np.ndarray]:
    """Disjoint, per-class stratified, deterministic index sets.

    ``sizes`` are either fractions of each class (floats in [0, 1], summing to at most 1) or
    sample counts per class (ints). Set ``k`` takes, from every class, the next ``sizes[k]``
    indices of that class's seeded permutation, so the sets never overlap. Each class is
    shuffled by its own generator (seeded by ``(seed, class)``), so a class's indices do not
    depend on the other classes. Fractions are rounded on cumulative boundaries, so they never
    over-allocate. Returned arrays are sorted int64.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {labels.shape}")
    if isinstance(sizes, (int, float)):
        sizes = [sizes]
    sizes = list(sizes)
    if not sizes:
        raise DataError("sizes must not be empty")
    if any(isinstance(s, bool) for s in sizes):
        raise DataError(f"sizes must be ints (counts) or floats (fractions), got {sizes}")
    is_count = all(isinstance(s, (int, np.integer)) for s in sizes)
    if not is_count:
        if not all(isinstance(s, (float, np.floating)) for s in sizes):
            raise DataError(f"sizes mix counts (int) and fractions (float): {sizes}")
        if any(s < 0 or s > 1 for s in sizes) or sum(sizes) > 1 + 1e-9:
            raise DataError(f"fractions must lie in [0, 1] and sum to at most 1, got {sizes}")
    elif any(s < 0 for s in sizes):
        raise DataError(f"counts must be >= 0, got {sizes}")

    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        if is_count:
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            if bounds[-1] > n:
                raise DataError(
                    f"class {c} has {n} samples, fewer than the {int(bounds[-1])} requested "
                    f"(counts {sizes})"
                )
        else:
            bounds = np.concatenate([[0], np.round(np.cumsum(sizes) * n)]).astype(np.int64)
            bounds = np.minimum(bounds, n)
        perm = members[np.random.default_rng([seed, int(c)]).permutation(n)]
        for k in range(len(sizes)):
            parts[k].append(perm[bounds[k] : bounds[k + 1]])
    return [
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64)
        for p in parts
    ]


def class_names_of(dataset) -> list[str] | None:
    """A labelled dataset's class names: ``class_names``, or torchvision's ``classes``."""
    names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
    return list(names) if names else None


def labels_at(dataset, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Labels of ``dataset`` at ``indices`` (default: all), from its ``labels`` or ``targets``
    when it has them, else from ``dataset[i][1]``; never reads any other sample."""
    idx = torch.arange(len(dataset)) if indices is None else _as_index(indices)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is not None:
        return torch.as_tensor(labels[idx] if isinstance(labels, torch.Tensor) else
                               [labels[int(i)] for i in idx]).long().reshape(-1)
    return torch.as_tensor([int(dataset[int(i)][1]) for i in idx], dtype=torch.long)


def _as_index(indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        return indices.long().reshape(-1)
    if isinstance(indices, np.ndarray):
        return torch.from_numpy(indices.astype(np.int64, copy=False)).reshape(-1)
    return torch.as_tensor([int(i) for i in indices], dtype=torch.long)


def batches(dataset, indices: Sequence[int] | torch.Tensor | None, batch_size: int,
            with_index: bool = False, *, shuffle: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False,
            workers: int | None = None, pin_memory: bool = False
            ) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(x, y[, idx])`` batches of ``dataset`` restricted to ``indices`` (default: all), in
    that order or shuffled with ``generator`` (which also drives an :class:`ArrayDataset`'s
    augmentation).

    A dataset with its own fast ``batches`` (:class:`ArrayDataset`) slices itself. Any other
    map-style dataset is read by a ``DataLoader`` over exactly these indices in this order,
    with ``workers`` processes (default: the dataset's ``workers`` attribute, else 0) and
    ``pin_memory`` (use it when the batches go to a GPU). An :class:`~mdafx.errors.MdafxError`
    raised in a worker (a bad image) is raised again here with its own type and message.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    idx = torch.arange(len(dataset)) if indices is None else _as_index(indices)
    if shuffle:
        idx = idx[torch.randperm(len(idx), generator=generator)]
    stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
    idx = idx[:stop]
    if hasattr(dataset, "batches"):
        for start in range(0, stop, batch_size):
            chunk = idx[start:start + batch_size]
            x, y = next(iter(dataset.batches(len(chunk), chunk, generator=generator)))
            yield (x, y, chunk) if with_index else (x, y)
        return
    if not len(idx):
        return
    n_workers = int(workers if workers is not None else getattr(dataset, "workers", 0) or 0)
    chunks = _Chunks(idx, batch_size)
    loader = torch.utils.data.DataLoader(
        _Guarded(dataset), batch_sampler=chunks, num_workers=n_workers, collate_fn=_collate,
        pin_memory=bool(pin_memory) and torch.cuda.is_available())
    for chunk, batch in zip(chunks, loader):
        if isinstance(batch, _Failure):
            raise batch.error()
        x, y = batch
        yield (x, y, torch.as_tensor(chunk)) if with_index else (x, y)


class _Chunks:
    """The batch sampler of :func:`batches`: consecutive slices of an index tensor (lazy, so
    a 1.28M-image pool costs one int64 tensor, not a list of lists)."""

    def __init__(self, idx: torch.Tensor, batch_size: int) -> None:
        self.idx, self.batch_size = idx, batch_size

    def __len__(self) -> int:
        return -(-len(self.idx) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.idx), self.batch_size):
            yield self.idx[start:start + self.batch_size].tolist()


@dataclass
class _Failure:
    """An MdafxError raised while reading an item in a DataLoader worker, carried back."""

    kind: type
    message: str

    def error(self) -> Exception:
        try:
            return self.kind(self.message)
        except Exception:  # an error type whose constructor takes other arguments
            return DataError(self.message)


class _Guarded(torch.utils.data.Dataset):
    """``dataset`` whose items are a :class:`_Failure` instead of raising an MdafxError, so
    the message crosses the worker boundary unchanged (torch would wrap it in a traceback)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except MdafxError as e:
            return _Failure(type(e), str(e))


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor] | _Failure:
    for item in items:
        if isinstance(item, _Failure):
            return item
    return (torch.stack([torch.as_tensor(it[0]) for it in items]),
            torch.as_tensor([int(it[1]) for it in items]))


def _first_image_size(root: Path) -> tuple[int, tuple[int, int], Path]:
    """``(images, (height, width) of the first image, its path)`` of an ImageFolder."""
    from PIL import Image, UnidentifiedImageError

    class_names, files = _scan(root)
    first = root / class_names[0] / files[0][0]
    try:
        with Image.open(first) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {str(first)!r}: {e}") from e
    return sum(len(f) for f in files), (h, w), first


def open_images(path: str | os.PathLike, fmt: InputFormat, *,
                transform: Preprocess | Callable[[Any], torch.Tensor] | None = None,
                augment: bool = False, workers: int | None = None,
                stream: bool | None = None) -> ArrayDataset | ImageFolderStream:
    """The ImageFolder at ``path`` as a dataset of model inputs in format ``fmt`` (labels
    index ``dataset.class_names``, the sorted folder names).

    Without a ``transform`` (or with an identity :class:`Preprocess`) the images must already
    have ``fmt.size``; a folder of them whose decoded pixels fit in :data:`IN_MEMORY_BYTES` is
    decoded into an :class:`ArrayDataset` (cached, the fast path), any other folder is an
    :class:`ImageFolderStream` read with ``workers`` DataLoader processes. ``stream`` forces
    the choice. ``augment`` is the standard pad-crop and flip (fine-tuning)."""
    root = Path(path)
    if isinstance(transform, Preprocess) and transform.identity:
        transform = None
    if stream is None:
        stream = transform is not None
        if not stream:
            n, (h, w), first = _first_image_size(root.expanduser().resolve())
            if (h, w) != tuple(fmt.size):
                raise DataError(f"{root}: images are {w}x{h} (width x height; {first.name}) but "
                                f"the model takes {fmt.size[1]}x{fmt.size[0]} (--input-size / "
                                "the model file's input format); give a resize/crop "
                                "(--resize N --crop N) or resize the data set first")
            stream = n * h * w * 3 > IN_MEMORY_BYTES
    if stream:
        return ImageFolderStream(root, fmt, transform, augment=augment, workers=workers)
    if transform is not None:
        raise DataError("a transform needs the streaming dataset (stream=True or None)")
    arrays = load_imagefolder(root)
    h, w = arrays.images.shape[1:3]
    if (h, w) != tuple(fmt.size):
        raise DataError(f"{root}: images are {w}x{h} (width x height) but the model takes "
                        f"{fmt.size[1]}x{fmt.size[0]} (--input-size / the model file's input "
                        "format); give a resize/crop (--resize N --crop N) or resize the data "
                        "set first")
    if arrays.images.shape[3] != fmt.channels:
        raise DataError(f"{root}: images have {arrays.images.shape[3]} channels but the model "
                        f"takes {fmt.channels}")
    ds = ArrayDataset(arrays.images, arrays.labels, mean=fmt.mean, std=fmt.std,
                      augment=augment, class_names=arrays.class_names)
    ds.root = root.expanduser().resolve()
    return ds
