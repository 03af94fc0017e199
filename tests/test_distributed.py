"""mdafx/distributed.py: sharding, exact merging, and ``torchrun ... mdafx analyse`` on 2 CPU
processes (gloo) against one process.

The launches go through ``python -m torch.distributed.run --standalone --nproc-per-node 2``
(torchrun; ``--standalone`` picks a free port), exactly as the analyse docstring documents.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdafx import api, cli
from mdafx.distributed import (SINGLE, DistributedError, Ranks, merge_ranked, on_device,
                               resolve_device)
from mdafx.errors import MdafxError, PreconditionError
from mdafx.models import tiny_cnn
from mdafx.passes.contributions import densify

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "frog")
NORM = ["--input-size", "16", "--mean", "0.5", "--std", "0.25"]


# ----------------------------------------------------------------------------- in process

@pytest.mark.parametrize("n,batch,world", [(0, 4, 2), (10, 3, 3), (37, 8, 2), (5, 8, 4),
                                           (100, 7, 5)])
def test_shards_are_disjoint_whole_batches_covering_everything(n, batch, world):
    items = list(range(100, 100 + n))
    parts = [Ranks(r, world).shard(items, batch) for r in range(world)]
    assert sum(parts, []) == items  # in order, no duplicates, nothing left out
    batches_of = [len(p) // batch + (len(p) % batch > 0) for p in parts]
    assert max(batches_of) - min(batches_of) <= 1
    for p in parts[:-1]:  # every batch boundary is a one-process batch boundary
        assert len(p) % batch == 0
    assert SINGLE.shard(items, batch) == items


def test_merge_ranked_equals_one_top_k_with_ties_to_the_smaller_index():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=g).double().tolist()  # many ties
    quota = {0: 7, 1: 1, 2: 0}
    key = [i % 3 for i in range(60)]
    want = {c: sorted([(scores[i], i) for i in range(60) if key[i] == c],
                      key=lambda t: (-t[0], t[1]))[:k] for c, k in quota.items()}
    shards = [Ranks(r, 3).shard(list(range(60)), 8) for r in range(3)]
    parts = [{c: sorted([(scores[i], i) for i in part if key[i] == c],
                        key=lambda t: (-t[0], t[1]))[:quota[c]] for c in quota}
             for part in shards]
    assert merge_ranked(parts, quota) == want


def test_one_process_steps_raise_the_original_error():
    def fails():
        raise PreconditionError("as it was")

    with pytest.raises(PreconditionError, match="as it was"):
        SINGLE.step("a step", fails)
    t = torch.tensor([1.5])
    assert SINGLE.sum(t) is t and SINGLE.gather(3) == [3] and SINGLE.broadcast(4) == 4


def test_devices_are_checked_and_modules_moved_back():
    assert resolve_device(None) == torch.device("cpu") == resolve_device("cpu")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(PreconditionError, match="expected cpu, cuda"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(PreconditionError, match="no CUDA GPU"):
            resolve_device("cuda")
    net = torch.nn.Linear(2, 2)
    with on_device(net, "cpu") as dev:
        assert dev == torch.device("cpu") and net.weight.device == dev
    with on_device(net, None) as dev:  # None: where it is
        assert dev == torch.device("cpu")
    assert issubclass(DistributedError, MdafxError)


# ----------------------------------------------------------------------------- torchrun

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A 3-class folder of 16x16 images (12 per class) and random tiny_cnn weights."""
    d = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (d / "data" / c).mkdir(parents=True)
        for i in range(12):
            img = rng.integers(0, 90, (16, 16, 3), dtype=np.uint8)
            img[..., CLASSES.index(c)] += rng.integers(0, 160, dtype=np.uint8)
            Image.fromarray(img).save(d / "data" / c / f"{i:03d}.png")
    torch.manual_seed(0)
    torch.save(tiny_cnn(len(CLASSES)).state_dict(), d / "w.pt")
    return d


def _env(d: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MDAFX_CACHE": str(d / "cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _args(out: str, *extra: str) -> list[str]:
    return ["--threads", "1", "analyse", "--model", "tiny_cnn", "--weights", "w.pt", *NORM,
            "--data", "data", "--per-class", "3", "--batch-size", "8", "--workers", "0",
            "-o", out, *extra]


def _torchrun(d: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m mdafx.cli analyse ...`` in ``d``."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m", "mdafx.cli", *_args(out, *extra)],
                          cwd=d, env=_env(d), capture_output=True, text=True, timeout=240)


def test_two_gloo_processes_write_the_one_process_profile(folder, monkeypatch):
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MDAFX_CACHE", str(folder / "cache"))
    assert cli.main(_args("one.st", "--quiet")) == 0  # one process, in this one
    two = _torchrun(folder, "two.st")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote two.st") == 1  # only rank 0 prints
    a, b = api.Profile.load(folder / "one.st"), api.Profile.load(folder / "two.st")
    assert a.selected == b.selected and a.samples_per_class == b.samples_per_class == [3] * 3
    assert a.record == b.record and a.fingerprint == b.fingerprint
    for name in a.layers:
        x, y = densify(a.contributions[name]).double(), densify(b.contributions[name]).double()
        torch.testing.assert_close(y, x, rtol=1e-6, atol=0.0)
    gm = api.build_model("tiny_cnn", 3)
    api.load_weights(gm, folder / "w.pt")
    gm = api.trace(gm, torch.zeros(1, 3, 16, 16))
    for task in ([0, 1], [2, 0]):
        ca, cb = api.cut(gm, a, task), api.cut(gm, b, task)
        sa, sb = ca.module.state_dict(), cb.module.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_failing_rank_fails_the_run_and_leaves_no_profile(folder, tmp_path):
    bad = folder / "data" / "frog" / "zzz.png"  # the last image: in rank 1's shard
    bad.write_bytes(b"not a png")
    try:
        run = _torchrun(folder, "never.st", "--resize", "16", "--holdout", "0")
    finally:
        bad.unlink()
    assert run.returncode != 0
    assert "sample selection failed on rank 1 of 2: cannot read image" in run.stderr, run.stderr
    assert "zzz.png" in run.stderr
    assert not (folder / "never.st").exists()
    assert not list(folder.glob(".never.st.*"))  # no temporary file either


class _OtherFolderOnRank1(Ranks):
    """Rank 0 of two whose rank 1 reports a digest of other data (a differing copy)."""

    def gather(self, obj):
        return [obj, (obj[0] + 1, "0" * 64)]


def test_ranks_that_see_different_folders_are_refused(folder):
    fmt = api.InputFormat((16, 16), 3, (0.5,) * 3, (0.25,) * 3)
    data = api.open_images(folder / "data", fmt, workers=0)
    gm = api.trace(tiny_cnn(len(CLASSES)), fmt.example())
    with pytest.raises(DistributedError, match=r"do not see the same data: rank\(s\) \[1\]"):
        api.profile(gm, data, list(CLASSES), per_class=2, ranks=_OtherFolderOnRank1(0, 2))
    # the same data on both ranks passes the check (then selection runs one shard here)
    same = type("Same", (Ranks,), {"gather": lambda self, obj: [obj, obj]})(0, 2)
    from mdafx.profiling import _check_same_data
    from mdafx.data import labels_at
    labels = labels_at(data)
    _check_same_data(same, data, labels, torch.arange(len(labels)))
