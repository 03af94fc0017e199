"""Benchmark MDA's assembly (MDA.md §2) on components of the cached CIFAR-10 source models.

    python tools/bench_assembly.py [--data DIR] [--threads 1] [--no-latency]
                                   [--out .cache/bench_assembly.md]

Components (disassembled as in ``tools/reproduce.py``, same split, profiles and thresholds; a
profile saved by reproduce.py is reused unless ``--fresh-profile``):

* vgg{cat, dog} + resnet20{airplane, ship}, parallel layout (different architectures);
* vgg{airplane, automobile, ship, truck, horse} + resnet20{bird, cat, deer, dog, frog},
  parallel: the two five-class halves reassembled into a ten-class model;
* vgg{cat, dog} + vgg{airplane, ship} and resnet20{cat, dog} + resnet20{airplane, ship}, each
  in the merged layout (alignment padding, MDA §2.2: needs isomorphic components, i.e. the same
  architecture) and in the parallel layout.

Scale factors (MDA §2.1) are calibrated per component on the *calibration* part of the training
split (disjoint from the profiling pool; never the test split), on the images of the
component's own classes. Columns:

* ``baseline``: each source model's accuracy on its own task's test images (argmax over the
  task's logits), weighted by the number of test images of each task;
* ``components``: the same for the components (what disassembly alone costs);
* ``assembled`` / ``+ scaling``: the assembled model on the test images of the union of the
  tasks (argmax over all its logits) without and with the scale factors (MDA's ablation);
* params (for the merged layout also the non-zero ones: the padding kernels are zeros), MACs at
  batch 1 (FlopCounterMode, FLOPs / 2, counting the padding), and the median onnxruntime CPU
  latency at batch 1 and 64 of the scaled model (``export_onnx`` then ``onnx_latency``, with
  ``--threads`` intra-op threads).
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

import common  # noqa: E402
from mdafx import api  # noqa: E402
from mdafx.assembly import Calibration, assemble  # noqa: E402
from mdafx.data import ArrayDataset  # noqa: E402
from mdafx.evaluation import predict, task_accuracy  # noqa: E402
from mdafx.passes.locate import Thresholds  # noqa: E402
from mdafx.passes.logit_scaling import calibrate_scales  # noqa: E402

CAT_DOG = ("cat", "dog")
AIRPLANE_SHIP = ("airplane", "ship")


@dataclass(frozen=True)
class Part:
    """The component of ``task`` disassembled from source ``source``."""

    source: str
    task: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.source}{{{', '.join(self.task)}}}"


@dataclass(frozen=True)
class Spec:
    parts: tuple[Part, ...]
    layout: str = "parallel"

    @property
    def label(self) -> str:
        return " + ".join(p.label for p in self.parts)


def default_specs(vgg: str = "vgg", resnet: str = "resnet20") -> list[Spec]:
    return [
        Spec((Part(vgg, CAT_DOG), Part(resnet, AIRPLANE_SHIP)), "parallel"),
        Spec((Part(vgg, common.FIVE_A), Part(resnet, common.FIVE_B)), "parallel"),
        Spec((Part(vgg, CAT_DOG), Part(vgg, AIRPLANE_SHIP)), "merged"),
        Spec((Part(vgg, CAT_DOG), Part(vgg, AIRPLANE_SHIP)), "parallel"),
        Spec((Part(resnet, CAT_DOG), Part(resnet, AIRPLANE_SHIP)), "merged"),
        Spec((Part(resnet, CAT_DOG), Part(resnet, AIRPLANE_SHIP)), "parallel"),
    ]


@dataclass
class SourceInfo:
    params: int
    macs: int
    profile_seconds: float
    profile_loaded: bool
    latency_ms: tuple[float, float] | None = None


@dataclass
class PartInfo:
    component: api.Component
    n_test: int
    source_acc: float
    component_acc: float
    scales: torch.Tensor
    fallbacks: dict
    n_calib: int


@dataclass
class BenchReport:
    sources: dict[str, SourceInfo]
    parts: dict[Part, PartInfo]
    rows: list[dict] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)


def _latency(module: torch.nn.Module, path: Path, metadata: dict, threads: int,
             iters: int) -> tuple[float, float]:
    from mdafx.deployment import export_onnx, onnx_latency

    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(module, path, torch.zeros(*common.INPUT_SHAPE), metadata, overwrite=True)
    b1 = onnx_latency(path, 1, warmup=10, iters=max(iters, 50), threads=threads)
    b64 = onnx_latency(path, 64, warmup=3, iters=iters, threads=threads)
    return b1, b64


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


def bench_assembly(sources: dict[str, torch.nn.Module], train_ds: ArrayDataset,
                   select_idx: np.ndarray, calib_idx: np.ndarray, test_ds: ArrayDataset,
                   class_names: Sequence[str], specs: Sequence[Spec], *,
                   per_class: int = common.DEFAULT_PER_CLASS, thresholds: Thresholds = Thresholds(),
                   profile_dir: Path | None = None, reuse_profile: bool = True,
                   calib_frac: float = common.DEFAULT_CALIB_FRAC, seed: int = common.DEFAULT_SEED,
                   latency: bool = True, latency_specs: Sequence[int] | None = None,
                   onnx_dir: Path | None = None, latency_iters: int = 20, threads: int = 1,
                   batch_size: int = 256, progress: bool = False) -> BenchReport:
    """Disassemble every part of ``specs``, calibrate, assemble, score; see module docstring.

    ``latency_specs`` restricts the ONNX export + latency to those spec positions (all when
    ``None``); ``latency=False`` skips it (and the sources' latency) entirely.
    """
    class_names = list(class_names)
    test_labels = test_ds.labels.numpy()
    calib_labels = train_ds.labels.numpy()[calib_idx]
    used = list(dict.fromkeys(p.source for s in specs for p in s.parts))
    report = BenchReport({}, {}, thresholds=dict(vars(thresholds)))
    onnx_dir = onnx_dir or Path("out")

    located = {}
    for name in used:
        gm = api.trace(sources[name], torch.zeros(*common.INPUT_SHAPE))
        path = None if profile_dir is None else common.profile_path(
            profile_dir, name, gm, per_class, calib_frac, seed)
        prof, prof_s, loaded = common.get_profile(gm, train_ds, select_idx, class_names, per_class,
                                              path=path, reuse=reuse_profile,
                                              batch_size=batch_size, progress=progress)
        am = api.source_analyses(gm, prof)
        logits, labels = predict(gm, test_ds.batches(500))
        located[name] = (gm, prof, am, logits, labels)
        info = SourceInfo(common.count_params(gm), common.count_macs(gm), prof_s, loaded)
        if latency:
            info.latency_ms = _latency(gm, onnx_dir / f"source_{_slug(name)}.onnx",
                                       {"source": name}, threads, latency_iters)
        report.sources[name] = info

    for part in dict.fromkeys(p for s in specs for p in s.parts):
        gm, prof, am, src_logits, src_labels = located[part.source]
        comp = api.cut(gm, prof, list(part.task), thresholds=thresholds,
                       class_names=class_names, source=part.source, am=am)
        idx = common.indices_of(test_labels, comp.classes)
        src_acc = task_accuracy(src_logits[idx], src_labels[idx], comp.classes)
        comp_acc = common.component_accuracy(comp.module, test_ds, idx, comp.classes)
        cal = calib_idx[np.isin(calib_labels, comp.classes)]
        if len(cal) == 0:
            raise ValueError(f"no calibration images of {part.label}'s classes")
        cal_logits, cal_labels = predict(comp.module, train_ds.batches(500, cal))
        position = {c: k for k, c in enumerate(comp.classes)}
        positions = torch.tensor([position[int(y)] for y in cal_labels.tolist()])
        sf = calibrate_scales(cal_logits, positions)
        comp.metadata["scales"] = sf.factors.tolist()
        report.parts[part] = PartInfo(comp, len(idx), src_acc, comp_acc, sf.factors,
                                      dict(sf.fallbacks), len(cal))

    for k, spec in enumerate(specs):
        infos = [report.parts[p] for p in spec.parts]
        comps = [i.component for i in infos]
        n = np.array([i.n_test for i in infos], dtype=float)
        plain = assemble(comps, None, layout=spec.layout)
        scaled = assemble(comps, Calibration.scaling([i.scales for i in infos]),
                          layout=spec.layout)
        union = [class_names.index(c) for c in scaled.class_names]
        idx = common.indices_of(test_labels, union)
        position = {c: j for j, c in enumerate(union)}
        accs = []
        for asm in (plain, scaled):
            logits, labels = predict(asm.module, test_ds.batches(500, idx))
            target = torch.tensor([position[int(y)] for y in labels.tolist()])
            accs.append(float((logits.argmax(1) == target).float().mean()))
        params = common.count_params(scaled.module)
        nonzero = sum(int((p != 0).sum()) for p in scaled.module.parameters())
        row = {
            "label": spec.label, "layout": spec.layout, "classes": list(scaled.class_names),
            "n_test": int(len(idx)),
            "baseline": float(np.dot(n, [i.source_acc for i in infos]) / n.sum()),
            "components": float(np.dot(n, [i.component_acc for i in infos]) / n.sum()),
            "assembled": accs[0], "scaled": accs[1],
            "params": params, "params_nonzero": nonzero,
            "macs": common.count_macs(scaled.module), "latency_ms": None,
        }
        if latency and (latency_specs is None or k in latency_specs):
            meta = {"layout": scaled.layout, "class_names": scaled.class_names,
                    "class_map": scaled.class_map, "scales": scaled.metadata["scales"]}
            path = onnx_dir / f"{k:02d}_{spec.layout}_{_slug(spec.label)}.onnx"
            row["latency_ms"] = _latency(scaled.module, path, meta, threads, latency_iters)
        report.rows.append(row)
    return report


HEADERS = ["union task", "layout", "test imgs", "baseline", "components", "assembled",
           "+ scaling", "params", "MACs", "ORT b1", "ORT b64"]


def table_rows(report: BenchReport) -> list[list[str]]:
    rows = []
    for r in report.rows:
        params = common.human(r["params"])
        if r["params_nonzero"] != r["params"]:
            params += f" ({common.human(r['params_nonzero'])} nonzero)"
        lat = r["latency_ms"]
        rows.append([
            r["label"], r["layout"], r["n_test"], f"{r['baseline']:.2%}",
            f"{r['components']:.2%}", f"{r['assembled']:.2%}", f"{r['scaled']:.2%}", params,
            common.human(r["macs"]),
            "-" if lat is None else f"{lat[0]:.2f} ms", "-" if lat is None else f"{lat[1]:.1f} ms",
        ])
    return rows


def notes(report: BenchReport) -> list[str]:
    out = []
    for name, s in report.sources.items():
        line = (f"source {name}: {common.human(s.params)} params, {common.human(s.macs)} MACs, profile "
                f"{'loaded' if s.profile_loaded else 'computed'} in {s.profile_seconds:.1f} s")
        if s.latency_ms is not None:
            line += f", ORT {s.latency_ms[0]:.2f} ms (b1) / {s.latency_ms[1]:.1f} ms (b64)"
        out.append(line)
    for part, info in report.parts.items():
        scales = ", ".join(f"{c}={s:.3f}" for c, s in zip(part.task, info.scales.tolist()))
        line = (f"{part.label}: source {info.source_acc:.2%} -> component "
                f"{info.component_acc:.2%} on {info.n_test} test images, "
                f"{common.human(info.component.params)} params; scales ({info.n_calib} calibration "
                f"images) {scales}")
        if info.fallbacks:
            line += "; fallbacks: " + "; ".join(f"{part.task[c]}: {why}"
                                                 for c, why in info.fallbacks.items())
        out.append(line)
    return out


def format_report(report: BenchReport, tablefmt: str = "simple") -> str:
    table = tabulate(table_rows(report), headers=HEADERS, tablefmt=tablefmt,
                     disable_numparse=True)
    bullet = "- " if tablefmt == "github" else "  "
    return table + "\n\n" + "\n".join(bullet + line for line in notes(report))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.common_args(ap)
    ap.add_argument("--vgg", default="vgg", help="cached VGG-style source (default %(default)s)")
    ap.add_argument("--resnet", default="resnet20",
                    help="cached ResNet source (default %(default)s)")
    ap.add_argument("--fresh-profile", action="store_true",
                    help="profile again even if a saved profile of the same model and split "
                         "exists")
    ap.add_argument("--no-latency", action="store_true", help="skip ONNX export and latency")
    ap.add_argument("--latency-iters", type=int, default=20,
                    help="timed onnxruntime runs at batch 64 (batch 1: at least 50)")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown copy of the table (default <cache>/bench_assembly.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = common.cache_root()
    loaded = common.load_sources([args.vgg, args.resnet], cache / "sources")
    root = common.data_root(args.data)
    train, train_ds, test_ds = common.load_cifar(root)
    select_idx, calib_idx = common.split_train(train.labels, args.calib_frac, args.seed)
    thresholds = Thresholds().scaled(args.threshold_scale)

    t0 = time.perf_counter()
    report = bench_assembly(
        {k: m for k, (m, _) in loaded.items()}, train_ds, select_idx, calib_idx, test_ds,
        train.class_names, default_specs(args.vgg, args.resnet), per_class=args.per_class,
        thresholds=thresholds, profile_dir=cache / "profiles",
        reuse_profile=not args.fresh_profile, calib_frac=args.calib_frac, seed=args.seed,
        latency=not args.no_latency, onnx_dir=cache / "bench_assembly",
        latency_iters=args.latency_iters, threads=args.threads, batch_size=args.batch_size,
        progress=sys.stderr.isatty())
    total = time.perf_counter() - t0
    print(format_report(report))
    header = (f"MDA assembly on CIFAR-10 (tools/bench_assembly.py): {args.per_class} profiling "
              f"samples per class, thresholds x{args.threshold_scale:g}, scale factors "
              f"calibrated on {len(calib_idx)} held-out training images "
              f"({args.calib_frac:.0%} per class, seed {args.seed}); accuracies on the CIFAR-10 "
              f"test images of the union task; {args.threads} thread(s); total {total:.0f} s.")
    out = args.out or cache / "bench_assembly.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# MDA assembly\n\n" + header + "\n\n" + format_report(report, "github")
                   + "\n")
    print(f"\ntotal {total:.0f} s; markdown written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
