"""Speed of the compiler core: trace, channel analysis and pruning of a torchvision model.

    python tools/bench_core.py [--model resnet50] [--size 224] [--repeat 3]

Prints the median wall time of each stage over --repeat runs (random weights, random plan
keeping half of the prunable groups, 3 classes).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mdafx.api import channel_groups, plan_random, prune, trace  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = torchvision.models.get_model(args.model, num_classes=1000).eval()
    example = torch.randn(1, 3, args.size, args.size)
    times = {"trace + shapes": [], "channel groups": [], "plan": [], "prune": [], "total": []}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        gm = trace(model, example)
        t1 = time.perf_counter()
        cg = channel_groups(gm)
        t2 = time.perf_counter()
        plan = plan_random(cg, 0.5, seed=0, classes=[1, 2, 3])
        t3 = time.perf_counter()
        prune(gm, plan, cg=cg, instruments=[])
        t4 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            times[key].append(dt)
    rows = [(k, f"{statistics.median(v):.2f}") for k, v in times.items()]
    print(f"{args.model} at {args.size}x{args.size}, {len(gm.graph.nodes)} nodes, "
          f"{cg.prunable_roots().numel()} prunable groups, {args.threads} threads")
    print(tabulate(rows, headers=["stage", "median s"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
