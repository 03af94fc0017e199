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
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mdafx import api, ir  # noqa: E402
from mdafx.data import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    ArrayDataset,
    load_imagefolder,
    resolve_data_root,
    split_per_class,
)
from mdafx.evaluation import predict, task_accuracy  # noqa: E402
from mdafx.profiling import Profile, model_fingerprint  # noqa: E402
from mdafx.passes.locate import Thresholds  # noqa: E402

DEFAULT_MODELS = ("vgg", "resnet20")
FIVE_A = ("airplane", "automobile", "ship", "truck", "horse")
FIVE_B = ("bird", "cat", "deer", "dog", "frog")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
TASKS: tuple[tuple[str, ...], ...] = (
    ("cat", "dog"),
    ("airplane", "ship"),
    ("automobile", "truck"),
    FIVE_A,
    CIFAR10_CLASSES,
)
DEFAULT_PER_CLASS = 50      # 1% of CIFAR-10's 5000 training images per class (MDA §1.1)
DEFAULT_CALIB_FRAC = 0.1    # share of each class's training images held out for calibration
DEFAULT_SEED = 0
INPUT_SHAPE = (1, 3, 32, 32)


# --------------------------------------------------------------------------------- locations


def cache_root() -> Path:
    """``$MDAFX_CACHE`` if set, else ``<repo>/.cache`` (as tools/train_sources.py)."""
    env = os.environ.get("MDAFX_CACHE")
    return Path(env).expanduser() if env else ROOT / ".cache"


def data_root(arg: str | None) -> Path:
    """``--data``, else ``$MDAFX_DATA``, else ``<repo>/../shared/data`` when it holds cifar10/."""
    root = resolve_data_root(arg)
    if root is None:
        fallback = ROOT.parent / "shared" / "data"
        root = fallback if (fallback / "cifar10").is_dir() else None
    if root is None or not (root / "cifar10").is_dir():
        raise SystemExit(f"no CIFAR-10 at {root}/cifar10: pass --data DIR or set MDAFX_DATA to "
                         "the folder that holds cifar10/")
    return root


def task_label(task: Sequence[str]) -> str:
    return "all ten" if tuple(task) == CIFAR10_CLASSES else "{" + ", ".join(task) + "}"


# ------------------------------------------------------------------------------------ sources


def load_sources(names: Sequence[str],
                 sources_dir: Path) -> dict[str, tuple[torch.nn.Module, dict]]:
    """``name -> (model in eval mode, its .json info)`` for models cached by train_sources.py.

    Exits with a message naming the command to run when a model is not cached.
    """
    out = {}
    missing = [n for n in names if not ((sources_dir / f"{n}.pt").is_file()
                                        and (sources_dir / f"{n}.json").is_file())]
    if missing:
        raise SystemExit(
            f"source model(s) {', '.join(missing)} not cached in {sources_dir}: train them first "
            f"with\n    python tools/train_sources.py --data <folder holding cifar10/> "
            f"--models {','.join(missing)} --threads 1\n"
            "(the .json appears when a model is done)")
    for name in names:
        info = json.loads((sources_dir / f"{name}.json").read_text())
        arch = info["architecture"]
        module_name, factory_name = arch["factory"].rsplit(".", 1)
        factory = getattr(importlib.import_module(module_name), factory_name)
        model = factory(**arch["kwargs"])
        state = torch.load(sources_dir / f"{name}.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        out[name] = (model.eval(), info)
    return out


def split_train(labels: np.ndarray, calib_frac: float = DEFAULT_CALIB_FRAC,
                seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(selection indices, calibration indices): disjoint, stratified per class."""
    select, calib = split_per_class(labels, [1.0 - calib_frac, calib_frac], seed=seed)
    return select, calib


# ------------------------------------------------------------------------------- measurements


count_params = ir.count_params


def count_macs(module: torch.nn.Module, input_shape: Sequence[int] = INPUT_SHAPE) -> int:
    """MACs of one forward at the CIFAR input shape (mdafx.ir.count_macs)."""
    return ir.count_macs(module, input_shape)


def profile_path(profile_dir: Path, name: str, gm: torch.fx.GraphModule, per_class: int,
                 calib_frac: float, seed: int) -> Path:
    """Where the profile of ``gm`` for this sample selection lives (model fingerprint in the
    name, so a retrained model never picks up a stale profile)."""
    fingerprint, _ = model_fingerprint(gm)
    return profile_dir / (f"{name}-n{per_class}-calib{calib_frac:g}-seed{seed}-"
                          f"{fingerprint[:12]}.pt")


def get_profile(gm: torch.fx.GraphModule, train_ds: ArrayDataset, select_idx: np.ndarray,
                class_names: Sequence[str], per_class: int, *, path: Path | None = None,
                reuse: bool = False, batch_size: int = 256, progress: bool = False
                ) -> tuple[Profile, float, bool]:
    """(profile, seconds, loaded): load ``path`` if ``reuse`` and it exists, else profile ``gm``
    on ``select_idx`` of ``train_ds`` and save to ``path`` (when given)."""
    if reuse and path is not None and path.is_file():
        t0 = time.perf_counter()
        prof = Profile.load(path)
        prof.check_matches(gm)
        return prof, time.perf_counter() - t0, True
    t0 = time.perf_counter()
    prof = api.profile(gm, train_ds, list(class_names), per_class=per_class,
                       indices=select_idx.tolist(), batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.save(path)
    return prof, seconds, False


def component_accuracy(module: torch.nn.Module, test_ds: ArrayDataset, test_idx: np.ndarray,
                       classes: Sequence[int], batch_size: int = 500) -> float:
    """Accuracy of a component (logits of ``classes``, in that order) on ``test_idx``."""
    logits, labels = predict(module, test_ds.batches(batch_size, test_idx))
    position = {c: p for p, c in enumerate(classes)}
    target = torch.tensor([position[int(y)] for y in labels.tolist()])
    return float((logits.argmax(1) == target).float().mean())


def indices_of(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    return np.flatnonzero(np.isin(np.asarray(labels), np.asarray(list(classes))))


# ------------------------------------------------------------------------------------ the core


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
    cg = api.channel_groups(gm)
    prof, prof_s, loaded = get_profile(gm, train_ds, select_idx, class_names, per_class,
                                       path=profile_file, reuse=reuse_profile,
                                       batch_size=batch_size, progress=progress)
    t0 = time.perf_counter()
    masks = api.locate(gm, prof, thresholds, cg)
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
        comp = api.disassemble(gm, masks, list(task), class_names=list(class_names),
                               source=name, cg=cg)
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


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


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


def common_args(ap: argparse.ArgumentParser) -> None:
    """Flags both tools share (same defaults: the same data split and profiles)."""
    ap.add_argument("--data", help="folder containing cifar10/ (default: $MDAFX_DATA, "
                                   "else ../shared/data)")
    ap.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                    help="profiling samples per class (default %(default)s = 1%% of 5000)")
    ap.add_argument("--calib-frac", type=float, default=DEFAULT_CALIB_FRAC,
                    help="share of each class's training images held out for calibration; the "
                         "rest is the sample-selection pool (default %(default)s)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split seed")
    ap.add_argument("--threshold-scale", type=float, default=1.0,
                    help="multiply MDA's alpha/beta thresholds (conv 0.3/0.2, linear 0.4/0.3) "
                         "by this (default 1.0)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--batch-size", type=int, default=256, help="profiling batch size")


def load_cifar(root: Path) -> tuple:
    train = load_imagefolder(root / "cifar10" / "train")
    test = load_imagefolder(root / "cifar10" / "test")
    if train.class_names != test.class_names:
        raise SystemExit("train and test class folders differ")
    train_ds = ArrayDataset(train.images, train.labels, CIFAR10_MEAN, CIFAR10_STD)
    test_ds = ArrayDataset(test.images, test.labels, CIFAR10_MEAN, CIFAR10_STD)
    return train, train_ds, test_ds


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
