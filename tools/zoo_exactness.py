"""Exactness of channel pruning on every torchvision classification model that torch.fx traces.

For each model (random weights made to matter, eval mode, smallest input that works among
--sizes): trace, ChannelGroups, a random keep plan at --density over the prunable groups and a
random 3-class subset, prune, and compare with the masked model (MDA.md §1.4) on random inputs.
Prints one row per model: prunable share of channels, barriers (count and op), max error relative
to the output scale, params before/after, analysis and prune time.

    python tools/zoo_exactness.py [--models resnet18,vit_b_16] [--density 0.5] [--out FILE]
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "models")]

from mdafx.api import channel_groups, masked_model, plan_random, prune, trace  # noqa: E402
from mdafx.passes.channel_groups import barrier_report  # noqa: E402
from mdafx.ir import count_params  # noqa: E402
from zoo import calibrate_norms_, randomize_  # noqa: E402


def build(name: str, size: int):
    kwargs = {"num_classes": 10}
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    model = torchvision.models.get_model(name, **kwargs)
    return randomize_(model, seed=0)


def run_one(name: str, sizes: list[int], density: float):
    last = None
    for size in sizes:
        try:
            model = build(name, size)
            example = torch.randn(1, 3, size, size)
            calibrate_norms_(model, example)
            break
        except Exception as e:  # too small for this architecture: try the next size
            last = e
    else:
        raise RuntimeError(f"no input size in {sizes} works: {last}")
    t0 = time.perf_counter()
    gm = trace(model, example)
    cg = channel_groups(gm)
    t1 = time.perf_counter()
    classes = torch.randperm(10, generator=torch.Generator().manual_seed(1))[:3].tolist()
    plan = plan_random(cg, density, seed=1, classes=classes)
    pruned = prune(gm, plan, cg=cg, instruments=[])
    t2 = time.perf_counter()
    masked = masked_model(gm, plan, cg)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = pruned(x), masked(x)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    # share of the output channels of weighted layers (conv/linear, modules and functional)
    # that a plan may drop
    report = barrier_report(gm, cg)
    roots = cg.prunable_roots()
    barrier_ops = Counter(r.replace("no channel rule for ", "") for r in cg.barriers.values())
    return {
        "model": name, "input": size,
        "prunable ch": f"{100 * report.share:.0f}%",
        "prunable groups": int(roots.numel()),
        "kept": f"{int(plan.keep[roots].sum())}/{int(roots.numel())}",
        "barriers": ", ".join(f"{k}×{v}" for k, v in barrier_ops.most_common(3)) or "-",
        "max rel err": f"{err:.1e}",
        "params": f"{count_params(gm) / 1e6:.2f}M→{count_params(pruned) / 1e6:.2f}M",
        "analysis s": f"{t1 - t0:.2f}", "prune s": f"{t2 - t1:.2f}",
        "ok": "yes" if err <= 1e-4 and count_params(pruned) < count_params(gm) else "NO",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated names (default: all classifiers)")
    ap.add_argument("--sizes", default="64,96,128,224")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="also write the table as markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else torchvision.models.list_models(torchvision.models)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, failures = [], 0
    for name in names:
        try:
            row = run_one(name, sizes, args.density)
        except Exception as e:
            row = {"model": name, "ok": f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"}
        failures += row["ok"] != "yes"
        rows.append(row)
        print(" | ".join(str(v) for v in row.values()), flush=True)
        gc.collect()
    table = tabulate(rows, headers="keys", tablefmt="github")
    print(table)
    print(f"{len(rows) - failures}/{len(rows)} models exact (max rel err ≤ 1e-4) and smaller")
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
