"""Reproduce MDA's disassembly (MDA.md §1) on the cached CIFAR-10 source models.

    python tools/reproduce.py [--data DIR] [--models vgg,resnet20] [--per-class 50]
                              [--threshold-scale 1.0] [--threads 1] [--out .cache/reproduce.md]

For each source model (trained and cached by ``tools/train_sources.py``):

1. the CIFAR-10 *training* split is divided per class (``split_per_class``, seeded) into a
   sample-selection part (``1 - --calib-frac``) and a disjoint calibration part
   (``--calib-frac``; only ``tools/bench_assembly.py`` uses it, but both tools split the same
   way so the parts are identical);
2. the model is profiled once (MDA §1.1-1.2): from the selection part, the ``--per-class``
   samples per class with the highest true-label probability (default 50 = 1% of CIFAR-10's
   5000 training images per class, MDA's default), whose contributions are accumulated. The
   profile is saved under ``.cache/profiles/`` (``--reuse-profile`` loads it instead);
3. channel masks are located once (§1.3) with MDA's thresholds times ``--threshold-scale``;
4. each task is disassembled (§1.4) and scored on the CIFAR-10 *test* images of its classes.

Tasks: {cat, dog}, {airplane, ship}, {automobile, truck}, a five-class task and all ten. The
five-class task is the four vehicle classes plus horse (airplane, automobile, ship, truck,
horse): the complement (bird, cat, deer, dog, frog) is then all animals, which is the 5/5 split
``tools/bench_assembly.py`` reassembles into a ten-class model.

Columns: ``source acc`` is the source model on the task's test images predicting the argmax
over the task's logits only (``mdafx.training.task_accuracy``), ``component acc`` the component
on the same images, ``delta`` their difference in percentage points; params and MACs (batch 1,
``torch.utils.flop_counter.FlopCounterMode``, MACs = FLOPs / 2) are absolute and relative to
the source; ``channels kept`` counts the prunable channels (coupled groups' roots) kept;
``time`` is the task's disassembly (pruning) time. The profiling (analysis) and locate times are
printed under each table. A markdown copy goes to ``--out``.

The functions (``load_sources``, ``split_train``, ``reproduce_model``, ``format_report``) take
models and datasets, so tests can run them on tiny models and data.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DEFAULT_MODELS, DEFAULT_PER_CLASS, INPUT_SHAPE, TASKS,  # noqa: E402
                    ArrayDataset, cache_root, common_args,
                    component_accuracy, count_macs, count_params, data_root, get_profile,
                    human, indices_of, load_cifar, load_sources, profile_path, split_train,
                    task_label)
from mdafx import api  # noqa: E402
from mdafx.evaluation import predict, task_accuracy  # noqa: E402
from mdafx.passes.locate import Thresholds  # noqa: E402


@dataclass
class ModelReport:
    name: str
    source_params: int
    source_macs: int
    source_test_acc: float
    profile_seconds: float
    profile_loaded: bool
    profile_file: str | None
    locate_seconds: float
    samples_per_class: list[int]
    thresholds: dict
    kept_barriers: list[str]
    rows: list[dict] = field(default_factory=list)


def reproduce_model(name: str, model: torch.nn.Module, train_ds: ArrayDataset,
                    select_idx: np.ndarray, test_ds: ArrayDataset,
                    class_names: Sequence[str], tasks: Sequence[Sequence[str]] = TASKS, *,
                    per_class: int = DEFAULT_PER_CLASS, thresholds: Thresholds = Thresholds(),
                    profile_file: Path | None = None, reuse_profile: bool = False,
                    batch_size: int = 256, progress: bool = False) -> ModelReport:
    """Profile ``model`` once, locate once, disassemble every task, score on ``test_ds``."""
    gm = api.trace(model, torch.zeros(*INPUT_SHAPE))
    prof, prof_s, loaded = get_profile(gm, train_ds, select_idx, class_names, per_class,
                                       path=profile_file, reuse=reuse_profile,
                                       batch_size=batch_size, progress=progress)
    t0 = time.perf_counter()
    am = api.source_analyses(gm, prof)
    masks = api.locate(gm, prof, thresholds, am=am)
    locate_s = time.perf_counter() - t0

    test_labels = test_ds.labels.numpy()
    src_logits, src_labels = predict(gm, test_ds.batches(500))
    src_params, src_macs = count_params(gm), count_macs(gm)
    report = ModelReport(
        name=name, source_params=src_params, source_macs=src_macs,
        source_test_acc=float((src_logits.argmax(1) == src_labels).float().mean()),
        profile_seconds=prof_s, profile_loaded=loaded,
        profile_file=None if profile_file is None else str(profile_file),
        locate_seconds=locate_s, samples_per_class=list(prof.samples_per_class),
        thresholds=dict(vars(thresholds)), kept_barriers=list(masks.kept_barriers))
    for task in tasks:
        t0 = time.perf_counter()
        comp = api.cut(gm, prof, list(task), thresholds=thresholds,
                       class_names=list(class_names), source=name, am=am)
        seconds = time.perf_counter() - t0
        classes = comp.classes
        idx = indices_of(test_labels, classes)
        src_acc = task_accuracy(src_logits[idx], src_labels[idx], classes)
        comp_acc = component_accuracy(comp.module, test_ds, idx, classes)
        params, macs = comp.params, count_macs(comp.module)
        report.rows.append({
            "task": task_label(task), "classes": list(task), "n_test": int(len(idx)),
            "source_acc": src_acc, "component_acc": comp_acc, "delta": comp_acc - src_acc,
            "params": params, "params_rel": params / src_params,
            "macs": macs, "macs_rel": macs / src_macs,
            "channels_kept": comp.metadata["channels_kept"],
            "channels_total": comp.metadata["channels_total"],
            "seconds": seconds,
        })
    return report


# --------------------------------------------------------------------------------- formatting

HEADERS = ["task", "test imgs", "source acc", "component acc", "delta (pp)", "params",
           "MACs", "channels kept", "time"]


def table_rows(report: ModelReport) -> list[list[str]]:
    rows = []
    for r in report.rows:
        rows.append([
            r["task"], r["n_test"], f"{r['source_acc']:.2%}", f"{r['component_acc']:.2%}",
            f"{100 * r['delta']:+.2f}",
            f"{human(r['params'])} ({r['params_rel']:.1%})",
            f"{human(r['macs'])} ({r['macs_rel']:.1%})",
            f"{r['channels_kept']}/{r['channels_total']} "
            f"({r['channels_kept'] / max(1, r['channels_total']):.1%})",
            f"{r['seconds']:.2f} s",
        ])
    return rows


def format_report(reports: Sequence[ModelReport], tablefmt: str = "simple",
                  title_prefix: str = "") -> str:
    """One table per source model, with the source's size and the analysis times under it."""
    parts = []
    for rep in reports:
        th = ", ".join(f"{k}={v:g}" for k, v in rep.thresholds.items())
        title = (f"{title_prefix}{rep.name}: {human(rep.source_params)} params, "
                 f"{human(rep.source_macs)} MACs, test acc {rep.source_test_acc:.2%}")
        how = "loaded from " + rep.profile_file if rep.profile_loaded else "computed"
        notes = [
            f"profile ({how}): {rep.profile_seconds:.1f} s for "
            f"{sum(rep.samples_per_class)} samples "
            f"({min(rep.samples_per_class)}-{max(rep.samples_per_class)} per class); "
            f"locate: {rep.locate_seconds:.2f} s; thresholds {th}",
        ]
        if rep.kept_barriers:
            notes.append(f"barriers (all channels kept): {', '.join(rep.kept_barriers)}")
        table = tabulate(table_rows(rep), headers=HEADERS, tablefmt=tablefmt,
                         disable_numparse=True)
        sep = "\n\n" if tablefmt == "github" else "\n"
        parts.append(title + sep + table + sep + sep.join(notes))
    return "\n\n".join(parts)


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(ap)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated cached source models (default %(default)s)")
    ap.add_argument("--reuse-profile", action="store_true",
                    help="load a saved profile of the same model and split instead of profiling")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown copy of the tables (default <cache>/reproduce.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    cache = cache_root()
    sources = load_sources(names, cache / "sources")
    root = data_root(args.data)
    train, train_ds, test_ds = load_cifar(root)
    select_idx, _ = split_train(train.labels, args.calib_frac, args.seed)
    thresholds = Thresholds().scaled(args.threshold_scale)
    progress = sys.stderr.isatty()

    t_start = time.perf_counter()
    reports = []
    for name, (model, info) in sources.items():
        gm = api.trace(model, torch.zeros(*INPUT_SHAPE))
        path = profile_path(cache / "profiles", name, gm, args.per_class, args.calib_frac,
                            args.seed)
        print(f"[{name}] profiling, locating and disassembling {len(TASKS)} tasks ...",
              file=sys.stderr, flush=True)
        rep = reproduce_model(name, model, train_ds, select_idx, test_ds, train.class_names,
                              per_class=args.per_class, thresholds=thresholds,
                              profile_file=path, reuse_profile=args.reuse_profile,
                              batch_size=args.batch_size, progress=progress)
        reports.append(rep)
        print(format_report([rep]) + "\n", flush=True)
    total = time.perf_counter() - t_start

    header = (f"MDA disassembly on CIFAR-10 (tools/reproduce.py): selection pool "
              f"{len(select_idx)} training images ({1 - args.calib_frac:.0%} per class, seed "
              f"{args.seed}), {args.per_class} samples per class profiled, thresholds x"
              f"{args.threshold_scale:g}, {args.threads} thread(s); accuracies on the CIFAR-10 "
              f"test images of each task; total {total:.0f} s.")
    out = args.out or cache / "reproduce.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = "# " + "MDA disassembly\n\n" + header + "\n\n" + format_report(
        reports, tablefmt="github", title_prefix="## ") + "\n"
    out.write_text(md)
    print(f"total {total:.0f} s; markdown written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
