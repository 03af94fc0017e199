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
