"""``mdafx demo``: the whole pipeline on a procedurally generated image set (no download)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output directory (default: a new temp dir)")
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--epochs", type=common.positive_int, default=4, metavar="N",
                   help="training epochs (default 4)")
    p.add_argument("--train-per-class", type=common.positive_int, default=150, metavar="N",
                   help="training images per class (default 150)")
    p.add_argument("--no-images", action="store_true",
                   help="do not write the data splits as ImageFolder PNGs")
    common.add_force(p)


def run(args: argparse.Namespace) -> int:
    if args.out:
        common.check_output_dir(args, Path(args.out))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mdafx-demo-"))
    common.say(args, f"mdafx demo: writing to {out}")
    import torch  # heavy: only when the command runs (`--help` stays light)

    from mdafx import api

    if not getattr(args, "threads", None):
        # the demo's tiny models gain nothing from more threads (and lose a lot on a busy
        # machine); one thread also makes its printed numbers the same on every machine
        torch.set_num_threads(1)
    report = api.demo(out, seed=args.seed, epochs=args.epochs,
                      train_per_class=args.train_per_class, images=not args.no_images,
                      progress=common.progress(args))
    common.emit_json(args, {"command": "demo", "out": str(report.out), "onnx": report.onnx,
                            "seconds": report.seconds, "files": [p.name for p in report.files],
                            "rows": [dict(zip(["model", "classes", "test_images", "accuracy",
                                               "params"], r)) for r in report.rows]})
    rows = [[m, c, n, common.pct(acc, 1), None if params is None else f"{params:,}"]
            for m, c, n, acc, params in report.rows]
    common.say(args, "", *common.table(rows, ["model", "classes", "test images", "accuracy",
                                              "params"]),
               "", f"ONNX: {report.onnx}", "files:", *[f"  {p.name}" for p in report.files])
    if not args.no_images:
        common.say(args, f"try: mdafx evaluate {out / 'assembled.mdafx'} --data "
                         f"{out / 'data' / 'test'}")
    common.say(args, f"demo finished in {report.seconds:.1f} s", final=True)
    return common.EXIT_OK
