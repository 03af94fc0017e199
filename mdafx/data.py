"""Image-classification data for mdafx benchmarks: ImageFolder decoding, caching, splits.

Data never ships with mdafx. Code takes the data root (the folder that holds ``cifar10/``) from
an argument or from ``$MDAFX_DATA`` (:func:`resolve_data_root`) and says so when it is absent.

Decoded splits are cached as ``.npz`` files under ``<repo>/.cache/data`` (or ``$MDAFX_CACHE``),
keyed by the split's absolute path and every image's name, size and modification time, because
decoding 50k JPEGs takes seconds while loading the cache takes about one (most of it the stats).

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
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mdafx.errors import DataError, MdafxError, OutputError
from mdafx.fileio import atomic_output

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "DataError",
    "DataNotFoundError",
    "ImageArrays",
    "InputFormat",
    "batches",
    "default_cache_dir",
    "labels_at",
    "open_images",
    "load_imagefolder",
    "resolve_data_root",
    "split_per_class",
]

# Per-channel statistics of the CIFAR-10 training split, pixel values scaled to [0, 1].
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"})



class DataNotFoundError(MdafxError, FileNotFoundError):
    """A data folder does not exist (the message says how to point mdafx at the data)."""


_REPO_ROOT = Path(__file__).resolve().parent.parent
# PIL modes whose conversion to 8-bit RGB would clip the value range (16/32-bit integers, floats)
_HIGH_DEPTH_MODES = ("I", "F")
_CACHE_VERSION = 1  # bump when the .npz layout changes, so stale caches are ignored


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
    """``$MDAFX_CACHE/data`` if set, else ``<repo>/.cache/data``."""
    env = os.environ.get("MDAFX_CACHE")
    base = Path(env).expanduser() if env else _REPO_ROOT / ".cache"
    return base / "data"


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


def _list_imagefolder(split_dir: Path) -> tuple[list[str], list[list[Path]]]:
    if not split_dir.is_dir():
        raise DataNotFoundError(
            f"image folder {str(split_dir)!r} does not exist (expected <split>/<class>/<image>; "
            "set the data root with --data or MDAFX_DATA)"
        )
    class_dirs = sorted(
        (p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not class_dirs:
        raise DataError(f"image folder {str(split_dir)!r} has no class sub-folders")
    files = []
    for d in class_dirs:
        imgs = sorted(
            (p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: p.name,
        )
        if not imgs:
            raise DataError(
                f"class folder {str(d)!r} contains no images "
                f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files.append(imgs)
    return [d.name for d in class_dirs], files


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


def _decode(class_files: list[list[Path]]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    n = sum(len(f) for f in class_files)
    images: np.ndarray | None = None
    labels = np.empty(n, dtype=np.int64)
    first: Path | None = None
    i = 0
    for label, files in enumerate(class_files):
        for path in files:
            try:
                with Image.open(path) as im:
                    mode = im.mode
                    if mode in _HIGH_DEPTH_MODES or mode.startswith("I;"):
                        raise DataError(f"image {str(path)!r} has mode {mode!r} (16-bit or "
                                        "float pixels); mdafx reads 8-bit images: convert the "
                                        "data set to 8-bit RGB first")
                    arr = np.asarray(im.convert("RGB"))
            except DataError:
                raise
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise DataError(f"cannot read image {str(path)!r}: {e}") from e
            if images is None:
                images = np.empty((n, *arr.shape), dtype=np.uint8)
                first = path
            elif arr.shape != images.shape[1:]:
                raise DataError(
                    f"images of mixed sizes: {str(path)!r} is {arr.shape[1]}x{arr.shape[0]} "
                    f"but {str(first)!r} is {images.shape[2]}x{images.shape[1]}"
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


def labels_at(dataset, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Labels of ``dataset`` at ``indices`` (default: all), from its ``labels`` or ``targets``
    when it has them, else from ``dataset[i][1]``; never reads any other sample."""
    idx = torch.arange(len(dataset)) if indices is None else torch.as_tensor(
        [int(i) for i in indices], dtype=torch.long)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is not None:
        return torch.as_tensor(labels[idx] if isinstance(labels, torch.Tensor) else
                               [labels[int(i)] for i in idx]).long().reshape(-1)
    return torch.as_tensor([int(dataset[int(i)][1]) for i in idx], dtype=torch.long)


def batches(dataset, indices: Sequence[int] | None, batch_size: int, with_index: bool = False,
            *, shuffle: bool = False, generator: torch.Generator | None = None,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(x, y[, idx])`` batches of ``dataset`` restricted to ``indices`` (default: all), in
    that order or shuffled with ``generator`` (which also drives an :class:`ArrayDataset`'s
    augmentation); uses a dataset's own fast ``batches`` when it has one."""
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        order = torch.randperm(len(indices), generator=generator).tolist()
        indices = [indices[i] for i in order]
    stop = len(indices) - (len(indices) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        chunk = indices[start:start + batch_size]
        if hasattr(dataset, "batches"):
            x, y = next(iter(dataset.batches(len(chunk), chunk, generator=generator)))
        else:
            items = [dataset[i] for i in chunk]
            x = torch.stack([torch.as_tensor(it[0]) for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
        yield (x, y, torch.as_tensor(chunk)) if with_index else (x, y)


def open_images(path: str | os.PathLike, fmt: InputFormat, *, augment: bool = False
                ) -> ArrayDataset:
    """The ImageFolder at ``path`` as a dataset of normalised inputs in format ``fmt`` (labels
    index ``dataset.class_names``, the sorted folder names); its images must have ``fmt.size``."""
    root = Path(path)
    arrays = load_imagefolder(root)
    h, w = arrays.images.shape[1:3]
    if (h, w) != tuple(fmt.size):
        raise DataError(f"{root}: images are {w}x{h} (width x height) but the model takes "
                        f"{fmt.size[1]}x{fmt.size[0]} (--input-size / the model file's input "
                        "format); resize the data set first")
    if arrays.images.shape[3] != fmt.channels:
        raise DataError(f"{root}: images have {arrays.images.shape[3]} channels but the model "
                        f"takes {fmt.channels}")
    return ArrayDataset(arrays.images, arrays.labels, mean=fmt.mean, std=fmt.std,
                        augment=augment, class_names=arrays.class_names)
