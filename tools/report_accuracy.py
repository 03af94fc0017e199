"""Issue #6: component accuracy at MDA's default thresholds vs accuracy-targeted thresholds.

    python tools/report_accuracy.py [--data DIR] [--models vgg,resnet20] [--budget 1.0]
                                    [--threads 1] [--out .cache/report_accuracy.md]
                                    [--compare-parametrisations] [--finetune-epochs 0]

For each cached source model (tools/train_sources.py) and each task ({cat, dog},
{airplane, ship}, {automobile, truck}, {airplane, automobile, ship, truck, horse}):

* the CIFAR-10 *training* split is divided per class exactly as tools/reproduce.py does
  (``split_per_class``, seed 0): a selection part (90%) from which the model is profiled once
  (MDA §1.1-1.2, 50 most confident samples per class; the profile is shared with
  tools/reproduce.py under .cache/profiles/) and a disjoint calibration part (10% = 500 images
  per class);
* four components per task:
  - ``MDA defaults``: thresholds conv 0.3/0.2, linear 0.4/0.3;
  - ``defaults + norms``: the same, BatchNorm statistics re-estimated (passes/reestimate_norms.py)
    on 50 calibration images of *every* class (why every class: mdafx/search.py);
  - ``targeted``: ``mdafx.search.search_thresholds`` with the budget "at most ``--budget``
    points below the source on the task's calibration images", over the default grid of conv x
    linear threshold multipliers (``mdafx.search.DEFAULT_SCALES``);
  - ``targeted + norms``: the same search, every scored candidate re-estimated first;
* every component and the source are scored on the CIFAR-10 *test* images of the task (the only
  use of the test split); ``source test acc`` is the source's argmax over the task's logits.
  ``calib acc`` is the component on the task's calibration images, with its difference to the
  source there in brackets (what the search sees).

The goal column says whether the component is within 1 point of the source on the test images
(or better) at no more than half the source's MACs (batch 1, FlopCounterMode, MACs = FLOPs/2).

``--compare-parametrisations`` adds, per model and task, the same two searches over one global
multiplier (``mdafx.search.GLOBAL_SCALES``), to compare with the conv x linear grid.
``--finetune-epochs N`` (default 0 = off) additionally fine-tunes the MDA-defaults component
(norms re-estimated) with distillation (mdafx/finetune.py, lr 0.01, batch 64, the source as
teacher) on the task's selection images with the sources' augmentation; held out: the task's
calibration images. ``--tasks`` restricts the tasks (e.g. ``--tasks 'cat,dog'``).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from mdafx import api  # noqa: E402
from mdafx.data import split_per_class  # noqa: E402
from mdafx.ir import count_macs  # noqa: E402
from mdafx.search import (DEFAULT_SCALES, GLOBAL_SCALES, Budget,  # noqa: E402
                          norm_batches, scale_text, search_thresholds)
from mdafx.evaluation import predict, task_accuracy  # noqa: E402
from mdafx.passes.locate import Thresholds  # noqa: E402
from mdafx.passes.reestimate_norms import reestimate_batch_norms  # noqa: E402

TASKS = common.TASKS[:4]
HEADERS = ["model", "task", "variant", "thresholds", "params", "MACs", "calib acc",
           "test acc", "source test acc", "delta (pp)", "goal"]
NORM_PER_CLASS = 50     # calibration images per class (all classes) that re-estimate the norms


def _test_acc(module, test_ds, idx, classes) -> float:
    return common.component_accuracy(module, test_ds, idx, classes)


def report_model(name: str, model: torch.nn.Module, train_ds, select_idx: np.ndarray,
                 calib_idx: np.ndarray, test_ds, class_names: Sequence[str], *,
                 tasks=TASKS, budget: Budget = Budget(max_acc_drop=1.0),
                 per_class: int = common.DEFAULT_PER_CLASS, profile_file: Path | None = None,
                 scales=DEFAULT_SCALES, compare: bool = False, finetune_epochs: int = 0,
                 seed: int = 0, norm_per_class: int = NORM_PER_CLASS, log=print) -> dict:
    """Rows (one per task and variant), the search tables, and the parametrisation comparison
    of one source model."""
    gm = api.trace(model, torch.zeros(*common.INPUT_SHAPE))
    prof, prof_s, loaded = common.get_profile(gm, train_ds, select_idx, class_names, per_class,
                                          path=profile_file, reuse=True)
    log(f"[{name}] profile {'loaded' if loaded else 'computed'} ({prof_s:.1f} s)")
    am = api.source_analyses(gm, prof)
    test_labels = test_ds.labels.numpy()
    src_logits, src_labels = predict(gm, test_ds.batches(500))
    src_params, src_macs = common.count_params(gm), count_macs(gm, common.INPUT_SHAPE)
    train_labels = train_ds.labels.numpy()
    out = {"name": name, "source_params": src_params, "source_macs": src_macs,
           "source_test_acc": float((src_logits.argmax(1) == src_labels).float().mean()),
           "rows": [], "searches": [], "compare": [], "finetune": []}

    # the norms are re-estimated on images of every class (see mdafx/search.py), 50 per class
    (pick,) = split_per_class(train_labels[calib_idx], [norm_per_class], seed=seed)
    norm_idx = np.asarray(calib_idx)[pick]
    x_norm, _ = next(iter(train_ds.batches(len(norm_idx), norm_idx)))
    for task in tasks:
        t0 = time.perf_counter()
        classes = api.resolve_classes(list(task), list(class_names), len(class_names))
        idx = common.indices_of(test_labels, classes)
        src_acc = task_accuracy(src_logits[idx], src_labels[idx], classes)
        task_calib = np.asarray(calib_idx)[common.indices_of(train_labels[calib_idx], classes)]

        def row(variant, comp, thresholds_text, calib_acc, calib_delta):
            acc = _test_acc(comp.module, test_ds, idx, classes)
            params, macs = comp.params, count_macs(comp.module, common.INPUT_SHAPE)
            delta = 100 * (acc - src_acc)
            ok = delta >= -1.0 - 1e-9 and macs <= 0.5 * src_macs
            out["rows"].append({
                "model": name, "task": common.task_label(task), "variant": variant,
                "thresholds": thresholds_text, "params": params, "params_rel": params / src_params,
                "macs": macs, "macs_rel": macs / src_macs, "calib_acc": calib_acc,
                "calib_delta": calib_delta, "test_acc": acc, "source_acc": src_acc,
                "delta": delta, "goal": ok})
            return delta

        # MDA's defaults, scored on calibration too so the columns compare like for like
        logits, labels = predict(gm, train_ds.batches(500, task_calib))
        source_calib = task_accuracy(logits, labels, classes)
        comp = api.cut(gm, prof, classes, class_names=list(class_names), source=name, am=am)
        cal = common.component_accuracy(comp.module, train_ds, task_calib, classes)
        row("MDA defaults", comp, "MDA", cal, 100 * (cal - source_calib))
        reestimate_batch_norms(comp.module, norm_batches(x_norm, 250, seed))
        cal = common.component_accuracy(comp.module, train_ds, task_calib, classes)
        row("defaults + norms", comp, "MDA", cal, 100 * (cal - source_calib))
        if finetune_epochs:
            out["finetune"].append(_finetune(name, gm, comp, classes, train_ds, select_idx,
                                             task_calib, test_ds, idx, src_acc,
                                             finetune_epochs, seed, task))

        grids = {"conv x linear": scales}
        if compare:
            grids["global"] = GLOBAL_SCALES
        for grid, grid_scales in grids.items():
            for variant, reest in (("targeted", False), ("targeted + norms", True)):
                ts = time.perf_counter()
                res = search_thresholds(gm, prof, classes, train_ds, calib_idx, budget,
                                        class_names=class_names, reestimate=reest,
                                        reestimate_indices=norm_idx, scales=grid_scales,
                                        seed=seed, am=am, source=name)
                seconds = time.perf_counter() - ts
                flag = "" if res.met else " NOT MET"
                if grid == "conv x linear":
                    delta = row(variant, res.component, scale_text(res.scale) + flag,
                                res.candidate.accuracy, 0.0 - res.candidate.acc_drop)
                    out["searches"].append((f"{name} {common.task_label(task)} {variant}", res))
                else:
                    delta = 100 * (_test_acc(res.component.module, test_ds, idx, classes)
                                   - src_acc)
                out["compare"].append({
                    "model": name, "task": common.task_label(task), "norms": reest, "grid": grid,
                    "candidates": len(res.candidates),
                    "scored": sum(c.accuracy is not None and c.same_as is None
                                  for c in res.candidates),
                    "met": res.met, "best": scale_text(res.scale),
                    "macs_rel": res.candidate.macs_frac,
                    "calib_delta": 0.0 - res.candidate.acc_drop, "test_delta": delta,
                    "seconds": seconds})
        log(f"[{name}] {common.task_label(task)}: {time.perf_counter() - t0:.0f} s")
    return out


def _finetune(name, gm, comp, classes, train_ds, select_idx, task_calib, test_ds, test_idx,
              src_acc, epochs, seed, task) -> dict:
    """Distil the source into ``comp`` (MDA defaults, norms re-estimated) on the task's
    selection images with the source's augmentation; held out: the task's calibration images."""
    from mdafx.data import ArrayDataset
    from mdafx.distillation import distill as finetune

    aug = ArrayDataset(train_ds.images.numpy(), train_ds.labels.numpy(), augment=True, pad=2)
    task_sel = np.asarray(select_idx)[common.indices_of(train_ds.labels.numpy()[select_idx], classes)]
    module, rep = finetune(comp.module, [(gm, classes)], aug, task_sel, epochs=epochs, lr=0.01,
                           seed=seed, eval_dataset=train_ds, eval_indices=task_calib)
    acc = _test_acc(module, test_ds, test_idx, classes)
    return {"model": name, "task": common.task_label(task), "epochs": epochs,
            "calib_before": rep.acc_before, "calib_after": rep.acc_after, "test_after": acc,
            "source_acc": src_acc, "seconds": rep.seconds, "train_images": rep.train_images,
            "macs_rel": count_macs(module, common.INPUT_SHAPE) / count_macs(gm, common.INPUT_SHAPE)}


def format_rows(rows: list[dict], tablefmt: str = "simple") -> str:
    table = [[r["model"], r["task"], r["variant"], r["thresholds"],
              f"{common.human(r['params'])} ({r['params_rel']:.1%})",
              f"{common.human(r['macs'])} ({r['macs_rel']:.1%})",
              f"{r['calib_acc']:.2%} ({r['calib_delta']:+.2f})",
              f"{r['test_acc']:.2%}", f"{r['source_acc']:.2%}", f"{r['delta']:+.2f}",
              "yes" if r["goal"] else "no"] for r in rows]
    return tabulate(table, headers=HEADERS, tablefmt=tablefmt, disable_numparse=True)


def format_compare(rows: list[dict], tablefmt: str = "simple") -> str:
    table = [[r["model"], r["task"], "yes" if r["norms"] else "no", r["grid"],
              f"{r['candidates']} ({r['scored']})", r["best"] + ("" if r["met"] else " NOT MET"),
              f"{r['macs_rel']:.1%}", f"{r['calib_delta']:+.2f}", f"{r['test_delta']:+.2f}",
              f"{r['seconds']:.0f} s"] for r in rows]
    return tabulate(table, headers=["model", "task", "norms", "grid", "candidates (scored)",
                                    "chosen", "MACs", "calib delta", "test delta", "time"],
                    tablefmt=tablefmt, disable_numparse=True)


def format_finetune(rows: list[dict], tablefmt: str = "simple") -> str:
    table = [[r["model"], r["task"], f"{r['macs_rel']:.1%}", r["epochs"], r["train_images"],
              f"{r['calib_before']:.2%}", f"{r['calib_after']:.2%}", f"{r['test_after']:.2%}",
              f"{r['source_acc']:.2%}", f"{r['seconds']:.0f} s"] for r in rows]
    return tabulate(table, headers=["model", "task", "MACs", "epochs", "train imgs",
                                    "calib before", "calib after", "test after", "source test",
                                    "time"],
                    tablefmt=tablefmt, disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="folder containing cifar10/ (default: $MDAFX_DATA, "
                                   "else ../shared/data)")
    ap.add_argument("--models", default=",".join(common.DEFAULT_MODELS),
                    help="comma-separated cached source models (default %(default)s)")
    ap.add_argument("--budget", type=float, default=1.0,
                    help="max accuracy drop on calibration, in points (default %(default)s)")
    ap.add_argument("--per-class", type=int, default=common.DEFAULT_PER_CLASS,
                    help="profiling samples per class (default %(default)s)")
    ap.add_argument("--calib-frac", type=float, default=common.DEFAULT_CALIB_FRAC,
                    help="share of each class's training images for calibration (default "
                         "%(default)s = 500 per class)")
    ap.add_argument("--seed", type=int, default=common.DEFAULT_SEED, help="split and search seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--compare-parametrisations", action="store_true",
                    help="also measure global vs per-type threshold multipliers")
    ap.add_argument("--tasks", default=None,
                    help="only these tasks: ';'-separated, classes ','-separated, e.g. "
                         "'cat,dog;airplane,ship' (default: the four tasks)")
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="fine-tune the MDA-defaults components (norms re-estimated) this many "
                         "epochs with distillation (default 0: off)")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown copy (default <cache>/report_accuracy.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    cache = common.cache_root()
    sources = common.load_sources(names, cache / "sources")
    train, train_ds, test_ds = common.load_cifar(common.data_root(args.data))
    select_idx, calib_idx = common.split_train(train.labels, args.calib_frac, args.seed)
    budget = Budget(max_acc_drop=args.budget)
    tasks = TASKS if args.tasks is None else [tuple(c.strip() for c in t.split(","))
                                              for t in args.tasks.split(";") if t.strip()]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    reports = []
    for name, (model, _) in sources.items():
        gm = api.trace(model, torch.zeros(*common.INPUT_SHAPE))
        path = common.profile_path(cache / "profiles", name, gm, args.per_class, args.calib_frac,
                               args.seed)
        reports.append(report_model(name, model, train_ds, select_idx, calib_idx, test_ds,
                                    train.class_names, tasks=tasks, budget=budget,
                                    per_class=args.per_class,
                                    profile_file=path, compare=args.compare_parametrisations,
                                    finetune_epochs=args.finetune_epochs, seed=args.seed,
                                    log=log))
    total = time.perf_counter() - t_start
    rows = [r for rep in reports for r in rep["rows"]]
    header = (f"Component accuracy, MDA defaults vs accuracy-targeted thresholds (budget: "
              f"<= {args.budget:g} pt below the source on {args.calib_frac:.0%} of each class's "
              f"training images held out for calibration; profile: {args.per_class} samples per "
              f"class from the rest; seed {args.seed}). Test acc on the CIFAR-10 test images of "
              f"the task; goal = within 1 pt of the source on test at <= 50% of its MACs. "
              f"{args.threads} thread(s), total {total:.0f} s.")
    sources_line = "; ".join(f"{rep['name']}: {common.human(rep['source_params'])} params, "
                             f"{common.human(rep['source_macs'])} MACs, test acc "
                             f"{rep['source_test_acc']:.2%}" for rep in reports)
    print(header)
    print(sources_line)
    print(format_rows(rows))
    md = ["# Issue #6: accuracy-targeted disassembly", "", header, "", sources_line, "",
          format_rows(rows, "github"), ""]
    sections = (
        ("compare", format_compare, "parametrisation: smallest component within the budget on "
         "calibration, conv x linear grid (default) vs one global multiplier",
         "Parametrisation: one global multiplier vs conv x linear"),
        ("finetune", format_finetune, "fine-tuning the MDA-defaults components, norms "
         "re-estimated (distillation, mdafx/finetune.py)",
         "Fine-tuning the MDA-defaults components (norms re-estimated)"))
    for key, fmt, caption, title in sections:
        section = [r for rep in reports for r in rep[key]]
        if section:  # empty unless --compare-parametrisations / --finetune-epochs
            print(f"\n{caption}")
            print(fmt(section))
            md += [f"## {title}", "", fmt(section, "github"), ""]
    md += ["## Search trade-offs (calibration split)", ""]
    for label, res in (s for rep in reports for s in rep["searches"]):
        md += [f"### {label}", "", res.table("github"), ""]
    out = args.out or cache / "report_accuracy.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    print(f"\ntotal {total:.0f} s; markdown written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
