"""Dump the graph before and after every pass of the disassembly pipeline for one model.

Builds a torchvision classifier with random (seeded) weights, traces it at ``--size``, computes
its channel groups, draws a random plan (``--density`` of the prunable groups kept, logits of
``--classes`` in that order) and runs ``passes.disassembly_pipeline`` with ``DumpIR`` into
``<out>/<model>/``; prints the files written. Add ``--verify`` to also run ``VerifyEach``.

Example::

    python tools/dump_pipeline.py resnet18 --out out/dumps --size 32 --density 0.5 --classes 3,5
    less out/dumps/resnet18/01_prune-channels.txt
    dot -Tsvg out/dumps/resnet18/01_prune-channels.dot > prune.svg
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mdafx.instrument import DumpIR, Timing, VerifyEach  # noqa: E402
from mdafx.ir import trace  # noqa: E402
from mdafx.passmanager import AnalysisManager, PassManager  # noqa: E402
from mdafx.passes import disassembly_pipeline  # noqa: E402
from mdafx.passes.channel_groups import ChannelGroups  # noqa: E402
from mdafx.passes.prune_channels import plan_random  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a torchvision classifier name, e.g. resnet18, mobilenet_v2")
    ap.add_argument("--out", default="out/dumps", help="dump directory (default: out/dumps)")
    ap.add_argument("--size", type=int, default=32, help="input height and width (default: 32)")
    ap.add_argument("--density", type=float, default=0.5,
                    help="share of prunable channel groups kept (default: 0.5)")
    ap.add_argument("--classes", default=None,
                    help="comma-separated logits to keep, in this order (default: all)")
    ap.add_argument("--num-classes", type=int, default=10, help="logits of the model (default: 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the plan")
    ap.add_argument("--verify", action="store_true", help="also lint and run after each pass")
    args = ap.parse_args(argv)

    import torchvision  # only this tool needs it

    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(args.model, num_classes=args.num_classes)
    example = torch.randn(1, 3, args.size, args.size)
    gm = trace(model, example)
    am = AnalysisManager(gm)
    cg = am.get(ChannelGroups)
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    plan = plan_random(cg, args.density, seed=args.seed, classes=classes)

    dump_ir, timing = DumpIR(args.out, args.model), Timing()
    instruments = [dump_ir, timing] + ([VerifyEach()] if args.verify else [])
    PassManager(disassembly_pipeline(plan), instruments).run(gm, am)
    for path in dump_ir.written:
        print(path)
    print(timing.table(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
