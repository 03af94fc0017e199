"""Issue #6 experiment: per-layer threshold multipliers (greedy) vs the conv x linear grid.

    python tools/experiment_per_layer.py [--data DIR] [--models vgg,resnet20]
                                         [--tasks 'cat,dog;airplane,ship'] [--threads 1]
                                         [--out .cache/experiment_per_layer.md]

Why the default search (``mdafx.search``) has two multipliers and not one per layer: this tool
measures what per-layer freedom buys. For each cached source model (tools/train_sources.py) and
task, on the same splits as tools/report_accuracy.py (calibration = 10% of each class's training
images, profile = 50 samples per class from the rest, norms re-estimated on 50 calibration images
of every class):

1. ``search_thresholds`` over the default conv x linear grid, budget "at most 1 point below the
   source on the task's calibration images", gives the start: every conv layer at the chosen
   conv multiplier, the linear multiplier fixed;
2. greedy rounds: for every conv layer, raise its multiplier to the next of ``LEVELS`` that
   changes the kept channels; prune, re-estimate the norms, score on the calibration images; move
   to the candidate with the fewest MACs that meets the budget and has fewer MACs than the
   current component; stop when none does.

Both choices are then scored on the CIFAR-10 test images of the task (never seen by either
search). Per-layer multipliers are passed to ``passes.locate.locate`` through an object with
the ``Thresholds.for_module`` interface; nothing in mdafx itself changes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce as rp  # noqa: E402
from mdafx import api  # noqa: E402
from mdafx.data import split_per_class  # noqa: E402
from mdafx.search import Budget, norm_batches, scale_text, search_thresholds  # noqa: E402
from mdafx.evaluation import predict, task_accuracy  # noqa: E402
from mdafx.passes.locate import Thresholds, locate  # noqa: E402
from mdafx.passes.prune_channels import plan_from_votes  # noqa: E402
from mdafx.passes.reestimate_norms import reestimate_norms  # noqa: E402

LEVELS = (0.1, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.5, 1.75, 2.0, 2.5)
DEFAULT_TASKS = "cat,dog;airplane,ship;automobile,truck"
NORM_PER_CLASS = 50


class LayerThresholds:
    """MDA's thresholds with one multiplier per conv module (``for_module`` as in Thresholds)."""

    def __init__(self, conv_scale: dict[nn.Module, float], linear_scale: float,
                 base: Thresholds = Thresholds()) -> None:
        self.conv_scale, self.linear_scale, self.base = conv_scale, linear_scale, base

    def for_module(self, module: nn.Module) -> tuple[float, float]:
        if isinstance(module, nn.Linear):
            return (self.base.linear_alpha * self.linear_scale,
                    self.base.linear_beta * self.linear_scale)
        s = self.conv_scale[module]
        return self.base.conv_alpha * s, self.base.conv_beta * s


def _accuracy(module, x, target) -> float:
    with torch.no_grad():
        logits = torch.cat([module(x[s:s + 250]) for s in range(0, len(x), 250)])
    return float((logits.argmax(1) == target).float().mean())


def greedy(gm, cg, prof, classes, class_names, x_cal, t_cal, x_norm, conv_scale, linear_scale,
           source_acc, max_drop, log):
    convs = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
             and n.target in prof.contributions
             and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    start = min(range(len(LEVELS)), key=lambda i: abs(LEVELS[i] - conv_scale))

    def build(state):
        th = LayerThresholds({m: LEVELS[lv] for m, lv in zip(convs, state)}, linear_scale)
        masks = locate(gm, cg, prof.contributions, th)
        return masks, plan_from_votes(cg, masks.votes(classes), classes).keep.numpy().tobytes()

    def score(masks):
        comp = api.disassemble(gm, masks, classes, class_names=class_names, cg=cg)
        reestimate_norms(comp.module, norm_batches(x_norm, 250, 0))
        return comp, _accuracy(comp.module, x_cal, t_cal), rp.count_macs(comp.module)

    state = [start] * len(convs)
    masks, key = build(state)
    comp, acc, macs = score(masks)
    seen, rounds, scored = {key}, 0, 1
    while True:
        best = None
        for j in range(len(convs)):
            cand = list(state)
            key = None
            while cand[j] + 1 < len(LEVELS):  # the next level that changes the kept channels
                cand[j] += 1
                m, key = build(cand)
                if key not in seen:
                    break
            if key is None or key in seen:
                continue
            seen.add(key)
            c, a, mc = score(m)
            scored += 1
            if 100 * (source_acc - a) <= max_drop + 1e-9 and mc < macs and (
                    best is None or mc < best[3]):
                best = (cand, c, a, mc)
        if best is None:
            break
        state, comp, acc, macs = best
        rounds += 1
        log(f"  round {rounds}: {macs / rp.count_macs(gm):.1%} MACs, calib {acc:.2%}")
    return comp, acc, macs, [LEVELS[lv] for lv in state], rounds, scored


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--models", default="vgg,resnet20")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    cache = rp.cache_root()
    names = [m for m in args.models.split(",") if m]
    sources = rp.load_sources(names, cache / "sources")
    train, train_ds, test_ds = rp.load_cifar(rp.data_root(args.data))
    select_idx, calib_idx = rp.split_train(train.labels, rp.DEFAULT_CALIB_FRAC, rp.DEFAULT_SEED)
    train_labels, test_labels = train_ds.labels.numpy(), test_ds.labels.numpy()
    (pick,) = split_per_class(train_labels[calib_idx], [NORM_PER_CLASS], seed=rp.DEFAULT_SEED)
    norm_idx = np.asarray(calib_idx)[pick]
    x_norm, _ = next(iter(train_ds.batches(len(norm_idx), norm_idx)))
    rows = []
    for name, (model, _) in sources.items():
        gm = api.trace(model, torch.zeros(*rp.INPUT_SHAPE))
        cg = api.channel_groups(gm)
        path = rp.profile_path(cache / "profiles", name, gm, rp.DEFAULT_PER_CLASS,
                               rp.DEFAULT_CALIB_FRAC, rp.DEFAULT_SEED)
        prof, _, _ = rp.get_profile(gm, train_ds, select_idx, train.class_names,
                                    rp.DEFAULT_PER_CLASS, path=path, reuse=True)
        src_macs = rp.count_macs(gm)
        for task in [t.split(",") for t in args.tasks.split(";") if t]:
            t0 = time.perf_counter()
            classes = api.resolve_classes(task, train.class_names, len(train.class_names))
            res = search_thresholds(gm, prof, classes, train_ds, calib_idx,
                                    Budget(max_acc_drop=args.budget),
                                    class_names=train.class_names, reestimate=True,
                                    reestimate_indices=norm_idx, cg=cg, source=name)
            cal = np.asarray(calib_idx)[rp.indices_of(train_labels[calib_idx], classes)]
            x_cal, y_cal = next(iter(train_ds.batches(len(cal), cal)))
            t_cal = torch.as_tensor([classes.index(int(y)) for y in y_cal])
            log(f"[{name}] {task}: grid {res.message}")
            comp, acc, macs, levels, rounds, scored = greedy(
                gm, cg, prof, classes, train.class_names, x_cal, t_cal, x_norm, *res.scale,
                res.source_accuracy, args.budget, log)
            idx = rp.indices_of(test_labels, classes)
            logits, labels = predict(gm, test_ds.batches(500, idx))
            src_test = task_accuracy(logits, labels, classes)
            grid_test = rp.component_accuracy(res.component.module, test_ds, idx, classes)
            layer_test = rp.component_accuracy(comp.module, test_ds, idx, classes)
            for variant, m_frac, c_acc, t_acc, detail in (
                    ("conv x linear grid", res.candidate.macs_frac, res.candidate.accuracy,
                     grid_test, scale_text(res.scale)),
                    ("per-layer greedy", macs / src_macs, acc, layer_test,
                     f"{rounds} rounds, {scored} scored; conv x" + "/".join(f"{v:g}"
                                                                           for v in levels))):
                rows.append([name, rp.task_label(task), variant, f"{m_frac:.1%}",
                             f"{100 * (c_acc - res.source_accuracy):+.2f}",
                             f"{100 * (t_acc - src_test):+.2f}", f"{src_test:.2%}", detail])
            log(f"[{name}] {task}: {time.perf_counter() - t0:.0f} s")
    headers = ["model", "task", "thresholds", "MACs", "calib delta", "test delta",
               "source test", "detail"]
    total = time.perf_counter() - t_start
    print(tabulate(rows, headers=headers, disable_numparse=True))
    print(f"total {total:.0f} s, {args.threads} thread(s)")
    out = args.out or cache / "experiment_per_layer.md"
    out.write_text(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
                   + f"\n\ntotal {total:.0f} s, {args.threads} thread(s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
