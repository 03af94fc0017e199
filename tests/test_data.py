import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdafx import data
from mdafx.data import (
    ArrayDataset,
    DataError,
    DataNotFoundError,
    load_imagefolder,
    resolve_data_root,
    split_per_class,
)
from mdafx.errors import DataError, MdafxError
from imagefolders import mixed_folder


# --- split_per_class ------------------------------------------------------------------------

def _labels(counts):
    rng = np.random.default_rng(123)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return rng.permutation(labels)


def test_split_counts_disjoint_and_stratified():
    labels = _labels([50, 40, 30])
    parts = split_per_class(labels, [5, 10, 2], seed=0)
    assert [len(p) for p in parts] == [15, 30, 6]
    assert len(np.unique(np.concatenate(parts))) == 51  # disjoint
    for p, k in zip(parts, [5, 10, 2]):
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
        assert np.bincount(labels[p], minlength=3).tolist() == [k, k, k]


def test_split_fractions_round_on_cumulative_bounds():
    labels = _labels([10, 7])
    parts = split_per_class(labels, [0.3, 0.3, 0.4], seed=1)
    assert len(np.unique(np.concatenate(parts))) == 17  # fractions summing to 1 use every sample
    assert np.bincount(labels[parts[0]]).tolist() == [3, 2]


def test_split_deterministic_and_seeded():
    labels = _labels([20, 20])
    a = split_per_class(labels, [4, 4], seed=7)
    b = split_per_class(labels, [4, 4], seed=7)
    c = split_per_class(labels, [4, 4], seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_split_class_independent_of_other_classes():
    # A class's picks depend only on (seed, class), not on what other classes exist.
    labels = _labels([20, 20])
    full = split_per_class(labels, [5], seed=3)[0]
    alone = split_per_class(np.zeros(20, np.int64), [5], seed=3)[0]
    assert np.array_equal(full[labels[full] == 0], np.flatnonzero(labels == 0)[alone])


def test_split_errors():
    labels = _labels([5, 3])
    with pytest.raises(ValueError, match="class 1 has 3 samples"):
        split_per_class(labels, [2, 2], seed=0)
    with pytest.raises(DataError, match="mix"):
        split_per_class(labels, [1, 0.5], seed=0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        split_per_class(labels, [0.6, 0.6], seed=0)


# --- load_imagefolder -----------------------------------------------------------------------

def _make_folder(root: Path, classes: dict[str, int], size=(6, 5), ext=".png") -> dict:
    """Write ``classes[name]`` random images per class; return path -> pixel array."""
    rng = np.random.default_rng(0)
    written = {}
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            path = root / name / f"{i:04d}{ext}"
            Image.fromarray(arr).save(path)
            written[path] = arr
    return written


def test_load_imagefolder_decodes_in_sorted_order(tmp_path):
    written = _make_folder(tmp_path / "train", {"cat": 2, "ant": 3})
    arrays = load_imagefolder(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert arrays.class_names == ["ant", "cat"]
    assert arrays.images.shape == (5, 5, 6, 3) and arrays.images.dtype == np.uint8
    assert arrays.labels.tolist() == [0, 0, 0, 1, 1] and arrays.labels.dtype == np.int64
    np.testing.assert_array_equal(arrays.images[3], written[tmp_path / "train/cat/0000.png"])


def test_load_imagefolder_uses_cache(tmp_path, monkeypatch):
    _make_folder(tmp_path / "train", {"a": 2, "b": 2})
    first = load_imagefolder(tmp_path / "train", cache_dir=tmp_path / "cache")
    [cached] = (tmp_path / "cache").glob("*.npz")
    assert not list((tmp_path / "cache").glob("*.tmp"))

    def no_decode(*a):
        raise AssertionError("decoded despite the cache")

    monkeypatch.setattr(data, "_decode", no_decode)
    again = load_imagefolder(tmp_path / "train", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.images, again.images)
    assert again.class_names == ["a", "b"]
    # A new image changes the listing, hence the key: the split is decoded again.
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "train/a/9999.png")
    with pytest.raises(AssertionError, match="despite the cache"):
        load_imagefolder(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert cached.exists()


def test_load_imagefolder_cache_misses_a_rewritten_image(tmp_path, monkeypatch):
    _make_folder(tmp_path / "train", {"a": 2, "b": 2})
    load_imagefolder(tmp_path / "train", cache_dir=tmp_path / "cache")
    target = tmp_path / "train/b/0001.png"
    stat = target.stat()
    Image.fromarray(np.full((5, 6, 3), 7, np.uint8)).save(target)  # same name, same count
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = load_imagefolder(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert (again.images[3] == 7).all()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_load_imagefolder_cache_env(tmp_path, monkeypatch):
    _make_folder(tmp_path / "train", {"a": 1})
    monkeypatch.setenv("MDAFX_CACHE", str(tmp_path / "envcache"))
    load_imagefolder(tmp_path / "train")
    assert len(list((tmp_path / "envcache" / "data").glob("*.npz"))) == 1


def test_load_imagefolder_missing_dir(tmp_path):
    missing = tmp_path / "nope" / "train"
    with pytest.raises(DataNotFoundError, match=str(missing)) as e:
        load_imagefolder(missing, use_cache=False)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, MdafxError)


def test_load_imagefolder_empty_class(tmp_path):
    _make_folder(tmp_path / "train", {"a": 1})
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder .*train/b.* contains no images"):
        load_imagefolder(tmp_path / "train", use_cache=False)


def test_load_imagefolder_no_classes(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_imagefolder(tmp_path / "train", use_cache=False)


def test_load_imagefolder_unreadable_image(tmp_path):
    _make_folder(tmp_path / "train", {"a": 1})
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        load_imagefolder(tmp_path / "train", use_cache=False)


def test_load_imagefolder_mixed_sizes(tmp_path):
    _make_folder(tmp_path / "train", {"a": 1})
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "train/a/0001.png")
    with pytest.raises(DataError, match=r"mixed sizes: .*0001\.png.* is 7x7"):
        load_imagefolder(tmp_path / "train", use_cache=False)


def test_resolve_data_root(monkeypatch):
    monkeypatch.delenv("MDAFX_DATA", raising=False)
    assert resolve_data_root() is None
    monkeypatch.setenv("MDAFX_DATA", "/some/where")
    assert resolve_data_root() == Path("/some/where")
    assert resolve_data_root("/explicit") == Path("/explicit")


# --- ArrayDataset ---------------------------------------------------------------------------

def _dataset(n=10, **kw):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return imgs, ArrayDataset(imgs, np.arange(n) % 3, mean=(0.5, 0.4, 0.3),
                              std=(0.2, 0.25, 0.3), **kw)


def test_dataset_normalises_and_batches_match_items():
    imgs, ds = _dataset()
    x, y = ds[4]
    expect = (torch.from_numpy(imgs[4]).permute(2, 0, 1) / 255.0
              - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(3, 1, 1)
    torch.testing.assert_close(x, expect)
    assert y == 1
    xb, yb = next(ds.batches(4, indices=[4, 0]))
    torch.testing.assert_close(xb[0], x)
    assert yb.tolist() == [1, 0]
    sizes = [len(y) for _, y in ds.batches(4)]
    assert sizes == [4, 4, 2]
    assert [len(y) for _, y in ds.batches(4, drop_last=True)] == [4, 4]
    xcl, _ = next(ds.batches(4, channels_last=True))
    assert xcl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(xcl, next(ds.batches(4))[0])


def test_dataset_augment_is_seeded_crop_and_flip():
    imgs, ds = _dataset(augment=True, pad=2)
    a = [x for x, _ in ds.batches(5, shuffle=True, generator=torch.Generator().manual_seed(1))]
    b = [x for x, _ in ds.batches(5, shuffle=True, generator=torch.Generator().manual_seed(1))]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert a[0].shape == (5, 3, 8, 8)
    # With pad 0 the only augmentation is a flip: every output is the image or its mirror.
    _, flip_only = _dataset(augment=True, pad=0)
    _, plain = _dataset()
    xa = next(flip_only.batches(10, generator=torch.Generator().manual_seed(0)))[0]
    xp = next(plain.batches(10))[0]
    same = (xa == xp).flatten(1).all(1)
    mirrored = (xa == xp.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and bool(mirrored.any())


def test_dataset_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="labels shape"):
        ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3))


# --- preprocessing, streaming, DataLoader batches -------------------------------------------

FMT16 = data.InputFormat((16, 16), 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def test_default_cache_dir_follows_xdg_and_mdafx_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MDAFX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "mdafx" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "mdafx" / "data"
    monkeypatch.setenv("MDAFX_CACHE", str(tmp_path / "mine"))
    assert data.default_cache_dir() == tmp_path / "mine" / "data"


def test_preprocess_is_torchvisions_weights_transforms():
    from torchvision.models import ResNet18_Weights

    pre, fmt = data.model_recipe(ResNet18_Weights.IMAGENET1K_V1)
    assert pre == data.Preprocess(256, (224, 224), "bilinear") and fmt.size == (224, 224)
    assert data.model_recipe("ResNet18_Weights.IMAGENET1K_V1") == (pre, fmt)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), np.uint8))
    from torchvision.transforms import functional as F

    mine = F.normalize(F.convert_image_dtype(F.pil_to_tensor(pre(img)), torch.float32),
                       list(fmt.mean), list(fmt.std))
    assert torch.equal(mine, ResNet18_Weights.IMAGENET1K_V1.transforms()(img))
    with pytest.raises(DataError, match="not a torchvision weights name"):
        data.model_recipe("NoSuch_Weights.V1")
    assert data.model_recipe(torch.nn.Linear(2, 2)) is None


def test_preprocess_is_timms_eval_transform():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    pre, fmt = data.model_recipe(model)
    cfg = timm.data.resolve_data_config({}, model=model)
    want = timm.data.create_transform(**cfg)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (260, 333, 3), np.uint8))
    from torchvision.transforms import functional as F

    mine = F.normalize(F.convert_image_dtype(F.pil_to_tensor(pre(img)), torch.float32),
                       list(fmt.mean), list(fmt.std))
    torch.testing.assert_close(mine, want(img), rtol=0, atol=1e-6)


def test_preprocess_validates_and_round_trips():
    pre = data.Preprocess((40, 30), 24, "bicubic")
    assert pre.crop == (24, 24) and data.Preprocess.from_dict(pre.to_dict()) == pre
    assert data.Preprocess().identity and not pre.identity
    for bad in ({"resize": 0}, {"crop": (3, -1)}, {"interpolation": "cubic"}):
        with pytest.raises(DataError):
            data.Preprocess(**bad)


def test_mixed_sizes_stream_with_a_resize_crop_and_labels_need_no_decoding(tmp_path,
                                                                          monkeypatch):
    root = mixed_folder(tmp_path / "mixed", per_class=4)
    with pytest.raises(DataError, match=r"images are \d+x\d+ .*give a resize/crop"):
        data.open_images(root, FMT16)

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(data, "_read_rgb", no_decoding)
    ds = data.open_images(root, FMT16, transform=data.Preprocess(20, 16), workers=0)
    assert isinstance(ds, data.ImageFolderStream)
    assert ds.class_names == ["ant", "bee", "cat"] and len(ds) == 12
    assert ds.labels.tolist() == ds.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.labels_at(ds, [11, 0]).tolist() == [2, 0]
    monkeypatch.undo()
    x, y = ds[5]
    assert x.shape == (3, 16, 16) and y == 1
    no_crop = data.open_images(root, FMT16, transform=data.Preprocess(20), workers=0)
    with pytest.raises(DataError, match=r"0000?\.png.* after resize the shorter side to 20"):
        no_crop[0]


def test_dataloader_batches_are_the_requested_indices_in_order(tmp_path):
    root = mixed_folder(tmp_path / "mixed", per_class=3)
    ds = data.open_images(root, FMT16, transform=data.Preprocess(16, 16), workers=0)
    want = torch.stack([ds[i][0] for i in (8, 1, 4, 0, 7)])
    for workers in (0, 1):
        got = list(data.batches(ds, [8, 1, 4, 0, 7], 2, True, workers=workers))
        assert [b[2].tolist() for b in got] == [[8, 1], [4, 0], [7]]
        assert torch.equal(torch.cat([b[0] for b in got]), want)
        assert torch.cat([b[1] for b in got]).tolist() == [2, 0, 1, 0, 2]
    shuffled = [b[2] for b in data.batches(ds, None, 4, True, shuffle=True,
                                           generator=torch.Generator().manual_seed(0))]
    assert sorted(torch.cat(shuffled).tolist()) == list(range(9))


def test_a_bad_image_read_in_a_worker_is_the_same_one_line_error(tmp_path):
    root = mixed_folder(tmp_path / "mixed", per_class=2)
    (root / "bee" / "001.png").write_bytes(b"not a png")
    ds = data.open_images(root, FMT16, transform=data.Preprocess(16, 16), workers=1)
    with pytest.raises(DataError) as e:
        list(data.batches(ds, None, 2))
    assert str(e.value).startswith("cannot read image") and "001.png" in str(e.value)
    assert "Traceback" not in str(e.value)


def test_open_images_keeps_the_fast_path_for_small_same_size_folders(tmp_path, monkeypatch):
    _make_folder(tmp_path / "same", {"a": 3, "b": 2}, size=(16, 16))
    monkeypatch.setenv("MDAFX_CACHE", str(tmp_path / "cache"))
    fast = data.open_images(tmp_path / "same", FMT16)
    assert isinstance(fast, ArrayDataset) and fast.root == (tmp_path / "same").resolve()
    monkeypatch.setattr(data, "IN_MEMORY_BYTES", 0)  # too big to hold: streamed
    slow = data.open_images(tmp_path / "same", FMT16, workers=0)
    assert isinstance(slow, data.ImageFolderStream)
    for i in range(5):
        torch.testing.assert_close(slow[i][0], fast[i][0], rtol=0, atol=1e-5)
        assert slow[i][1] == fast[i][1]


def test_stream_files_digest_sees_a_rewritten_image(tmp_path):
    _make_folder(tmp_path / "f", {"a": 2, "b": 2})
    ds = data.ImageFolderStream(tmp_path / "f", data.InputFormat((5, 6)), workers=0)
    before = ds.files_digest([1, 3])
    target = tmp_path / "f" / "b" / "0001.png"
    stat = target.stat()
    Image.fromarray(np.full((5, 6, 3), 9, np.uint8)).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert ds.files_digest([1, 3]) != before and ds.files_digest([1]) == ds.files_digest([1])
