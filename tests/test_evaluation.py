"""mdafx/evaluation.py: scoring where the model is, from any dataset, and sharded over ranks."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mdafx.api import trace
from mdafx.data import ArrayDataset, ImageFolderStream, InputFormat
from mdafx.errors import DataError
from mdafx.evaluation import evaluate, logits_of, predict
from mdafx.models import tiny_cnn

NAMES = ["a", "b", "c", "d"]


def _setup():
    torch.manual_seed(0)
    gm = trace(tiny_cnn(4), torch.zeros(1, 3, 16, 16))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    ds = ArrayDataset(imgs, np.arange(50) % 4, mean=(0.5,) * 3, std=(0.25,) * 3,
                      class_names=NAMES)
    return gm, ds


def _report(r) -> dict:
    return r.to_dict()


def test_evaluate_on_cpu_device_equals_the_default():
    gm, ds = _setup()
    a = evaluate(gm, ds, NAMES, batch_size=16)
    b = evaluate(gm, ds, NAMES, batch_size=16, device="cpu", progress=True)
    assert _report(a) == _report(b) and a.images == 50
    c = evaluate(gm, ds, NAMES[:2], classes=[0, 1], batch_size=16, use_autocast=True)
    assert c.images == 26 and c.rows[-1][1] == 26


def test_predict_and_logits_of_agree_and_refuse_non_finite():
    gm, ds = _setup()
    logits, labels = predict(gm, ds.batches(16))
    x = torch.cat([x for x, _ in ds.batches(50)])
    torch.testing.assert_close(logits_of(gm, x, 7), logits)
    assert labels.tolist() == (torch.arange(50) % 4).tolist()
    with pytest.raises(DataError, match="non-finite"):
        predict(gm, [(torch.full((2, 3, 16, 16), float("nan")), torch.zeros(2))])


def test_evaluate_a_streamed_folder_like_the_in_memory_one(tmp_path):
    from PIL import Image

    gm, ds = _setup()
    for i in range(len(ds)):
        folder = tmp_path / NAMES[int(ds.labels[i])]
        folder.mkdir(exist_ok=True)
        Image.fromarray(ds.images[i].numpy()).save(folder / f"{i:03d}.png")
    stream = ImageFolderStream(tmp_path, InputFormat((16, 16), 3, (0.5,) * 3, (0.25,) * 3),
                               workers=1)
    # the folder lists class by class: compare per class counts, not positions
    a, b = evaluate(gm, ds, NAMES, batch_size=16), evaluate(gm, stream, NAMES, batch_size=16)
    assert a.rows == b.rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _search(ranks=None) -> dict:
    """A threshold search (tests/test_search.py's model and data), summarised."""
    from test_search import SCALES, TASK, setup

    from mdafx.search import Budget, search_thresholds

    gm, prof, train, _, calib, _ = setup()
    res = search_thresholds(gm, prof, TASK, train, calib, Budget(max_acc_drop=2.0),
                            scales=SCALES, ranks=ranks)
    return {"scale": res.candidate.scale, "source": res.source_accuracy,
            "accuracies": [c.accuracy for c in res.candidates]}


def _sharded(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from mdafx.distributed import current

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        gm, ds = _setup()
        report = evaluate(gm, ds, NAMES, batch_size=8, ranks=current())
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"evaluate": report.to_dict(), "search": _search(current())}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_score_their_shards_and_report_the_whole(tmp_path):
    """evaluate and the threshold search's scoring, sharded over 2 gloo processes."""
    gm, ds = _setup()
    want = json.loads(json.dumps({"evaluate": evaluate(gm, ds, NAMES, batch_size=8).to_dict(),
                                  "search": _search()}))
    out = str(tmp_path / "report")
    mp.start_processes(_sharded, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            got = json.load(f)
        assert got["evaluate"] == want["evaluate"]
        assert got["search"]["scale"] == want["search"]["scale"]
        assert got["search"]["accuracies"] == pytest.approx(want["search"]["accuracies"])
        assert got["search"]["source"] == pytest.approx(want["search"]["source"])
