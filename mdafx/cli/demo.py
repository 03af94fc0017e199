"""``mdafx demo``: the whole pipeline, on a procedurally generated image set (no download) or,
with ``--data``, on the embedded CIFAR-10 sources and a scaled-down copy of the user's CIFAR-10.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output directory (default: a new temp dir)")
    p.add_argument("--data", metavar="DIR",
                   help="CIFAR-10 as ImageFolders DIR/train and DIR/test (or DIR/cifar10/...): "
                        "run on the embedded trained sources (cifar10-vgg, cifar10-resnet20) "
                        "instead of training two on synthetic images")
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--epochs", type=common.positive_int, metavar="N",
                   help="synthetic demo: training epochs (default 4)")
    p.add_argument("--train-per-class", type=common.positive_int, metavar="N",
                   help="training images per class (default 150 synthetic, 100 with --data)")
    p.add_argument("--test-per-class", type=common.positive_int, default=100, metavar="N",
                   help="with --data: test images per class (default 100)")
    p.add_argument("--no-images", action="store_true",
                   help="synthetic demo: do not write the data splits as ImageFolder PNGs")
    common.add_force(p)


def run(args: argparse.Namespace) -> int:
    if args.data is not None and (args.epochs is not None or args.no_images):
        raise common.UsageError("--epochs/--no-images go with the synthetic demo (no --data): "
                                "the embedded sources are trained already")
    common.require_dirs(data=args.data)
    if args.out:
        common.check_output_dir(args, Path(args.out))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mdafx-demo-"))
    common.say(args, f"mdafx demo: writing to {out}")
    import torch  # heavy: only when the command runs (`--help` stays light)

    from mdafx import api

    if not getattr(args, "threads", None):
        # the demo's small models gain little from more threads (and lose a lot on a busy
        # machine); one thread also makes its printed numbers the same on every machine
        torch.set_num_threads(1)
    report = api.demo(out, seed=args.seed, epochs=args.epochs or 4,
                      train_per_class=args.train_per_class or (100 if args.data else 150),
                      test_per_class=args.test_per_class, images=not args.no_images,
                      data=args.data, progress=common.progress(args))
    common.emit_json(args, {"command": "demo", "out": str(report.out), "onnx": report.onnx,
                            "data": args.data,
                            "seconds": report.seconds, "files": [p.name for p in report.files],
                            "rows": [dict(zip(["model", "classes", "test_images", "accuracy",
                                               "params"], r)) for r in report.rows]})
    rows = [[m, c, n, common.pct(acc, 1), None if params is None else f"{params:,}"]
            for m, c, n, acc, params in report.rows]
    common.say(args, "", *common.table(rows, ["model", "classes", "test images", "accuracy",
                                              "params"]),
               "", f"ONNX: {report.onnx}", "files:", *[f"  {p.name}" for p in report.files])
    if args.data or not args.no_images:
        common.say(args, f"try: mdafx evaluate {out / 'assembled.mdafx'} --data "
                         f"{out / 'data' / 'test'}")
    if args.data:
        common.say(args, f"     mdafx inspect {out / 'assembled.mdafx'} -o {out / 'dumps'}")
    common.say(args, f"demo finished in {report.seconds:.1f} s", final=True)
    return common.EXIT_OK
