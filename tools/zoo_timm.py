"""mdafx on timm: one model per timm model family, the whole path, one row per model.

A family is a module of ``timm.list_modules()``; its model is the smallest variant (by parameter
count, built on the meta device) that torch.fx traces at a small input (``--tries`` candidates
are tried in order of size). Each model gets random weights made to matter, BatchNorm statistics
of random inputs, eval mode, and the smallest input among ``--sizes`` (``img_size=`` where the
constructor takes it) that gives ``[1, 10]`` logits. Then, in a fresh subprocess per model:

* trace (checked against the eager model), ChannelGroups, the barrier report;
* identity: a plan keeping everything and all classes equals the model;
* exactness: a random plan at ``--density`` and 3 classes, pruned vs masked (MDA.md §1.4);
* the MDA path: a profile on a tiny synthetic set (``--per-class`` random images per class) ->
  locate -> the component of 3 classes, which must equal the masked model of its plan;
* ONNX: the component exported, checked and compared with onnxruntime (mdafx.export_onnx).

Models run in float64 (ONNX in float32): deep random-weight attention stacks amplify float32
rounding through near-argmax softmaxes until two equal computations disagree.

Status: ``exact`` (all of the above within 1e-4 of the output scale), ``barrier-only`` (exact but
under 10% of the conv/linear channels prunable), ``wrong`` (a difference), ``crash`` (an error
past tracing), ``untraced`` (fx cannot trace the family's smallest variants).

    python tools/zoo_timm.py [--models resnet18,vit_tiny_patch16_224] [--out FILE.md] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "models")]

TOL = 1e-4
CLASSES = [3, 1, 7]


# ------------------------------------------------------------------------------ one model


def build(name: str, sizes: list[int]):
    """A random-weight ``name`` with 10 classes and the smallest working input size."""
    import timm
    import torch
    from zoo import calibrate_norms_, randomize_

    cfg = timm.get_pretrained_cfg(name)
    default = int(cfg.input_size[-1]) if cfg is not None else 224
    last: Exception | None = None
    for size in [s for s in sizes if s <= default] + [default]:
        try:
            try:
                model = timm.create_model(name, pretrained=False, num_classes=10, img_size=size)
            except TypeError:
                model = timm.create_model(name, pretrained=False, num_classes=10)
            randomize_(model)
            example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            calibrate_norms_(model, example)
            with torch.no_grad():
                out = model(example)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, 10):
                raise ValueError(f"output {getattr(out, 'shape', type(out))}")
            # float64: deep random attention nets amplify float32 rounding (summation order
            # changes with the pruned widths) through near-argmax softmaxes until two equal
            # computations disagree; in float64 the comparisons measure the rules, not rounding
            return model.double(), example.double(), size
        except Exception as e:  # too small for this architecture: the next size
            last = e
    raise RuntimeError(f"no input size works: {type(last).__name__}: {str(last)[:120]}")


def as_float32(module):
    """A float32 copy of a float64 component, as deployed. ``.float()`` casts its parameters and
    buffers; a graph traced with known sizes also holds the dtype it read from a tensor
    (``x.to(v.dtype)``, ``zeros(..., dtype=x.dtype)``) as a literal, which the float32 model
    would read as float32: those literals are cast too."""
    import torch
    import torch.fx as fx

    out = copy.deepcopy(module).float()
    if isinstance(out, fx.GraphModule):
        cast = lambda a: torch.float32 if a is torch.float64 else a  # noqa: E731
        for node in out.graph.nodes:
            node.args = fx.node.map_aggregate(node.args, cast)
            node.kwargs = fx.node.map_aggregate(node.kwargs, cast)
        out.recompile()
    return out


def _err(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def run_one(name: str, sizes: list[int], density: float, per_class: int) -> dict:
    import torch

    from mdafx.api import (build_profile, channel_groups, cut, export_onnx, masked_model,
                           plan_random, prune, source_analyses, trace)
    from mdafx.passes.channel_groups import ChannelGroups, barrier_report
    from mdafx.passes.locate import Thresholds
    from mdafx.passes.prune_channels import TaskPlan

    row: dict = {"model": name}
    t0 = time.perf_counter()
    try:
        model, example, size = build(name, sizes)
    except Exception as e:
        return {**row, "status": "untraced", "stage": "build", "note": str(e)[:150]}
    row["input"] = size
    try:
        gm = trace(model, example)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {**row, "status": "untraced", "stage": "trace", "note": first[:150]}
    stage = "channel groups"
    try:
        cg = channel_groups(gm)
        report = barrier_report(gm, cg)
        row["prunable"] = round(100 * report.share, 1)
        row["barriers"] = sum(c for _, c, _ in report.barriers)
        row["top barrier"] = (f"{report.barriers[0][0]}×{report.barriers[0][1]}: "
                              f"{report.barriers[0][2]}"[:70] if report.barriers else "-")
        # what keeps channels without being a barrier (LayerNorm, softmax across channels, ...)
        row["top kept by"] = (f"{report.freezes[0][0]}×{report.freezes[0][1]}"
                              if report.freezes else "-")
        x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(2),
                        dtype=example.dtype)
        stage = "identity"
        ident = prune(gm, plan_random(cg, 1.0, classes=list(range(10))), cg=cg, instruments=[])
        with torch.no_grad():
            row["identity err"] = _err(ident(x), model(x))
        stage = "prune"
        plan = plan_random(cg, density, seed=1, classes=CLASSES)
        pruned = prune(gm, plan, cg=cg, instruments=[])
        with torch.no_grad():
            row["pruned err"] = _err(pruned(x), masked_model(gm, plan, cg)(x))
        row["params"] = (f"{sum(p.numel() for p in gm.parameters()) / 1e6:.2f}M→"
                         f"{sum(p.numel() for p in pruned.parameters()) / 1e6:.2f}M")
        stage = "profile"
        g = torch.Generator().manual_seed(3)
        images = torch.randn(10 * per_class, *example.shape[1:], generator=g, dtype=example.dtype)
        labels = torch.arange(10).repeat(per_class)
        prof = build_profile(gm, [(images, labels)], 10, progress=False)
        stage = "locate + cut"
        am = source_analyses(gm, prof, cg)
        comp = cut(gm, prof, CLASSES, am=am)
        task_plan = am.get(TaskPlan(CLASSES, Thresholds()))
        with torch.no_grad():
            row["MDA err"] = _err(comp(x), masked_model(gm, task_plan, am.get(ChannelGroups))(x))
        row["layers"] = len(prof.layers)
        stage = "onnx"
        with tempfile.TemporaryDirectory() as tmp:  # ONNX in float32, as deployed
            export_onnx(as_float32(comp.module), Path(tmp) / "c.onnx", example.float())
        row["onnx"] = "ok"
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.update(status="crash", stage=stage, note=f"{type(e).__name__}: {first}"[:150])
        row["s"] = round(time.perf_counter() - t0, 1)
        return row
    errs = [row["identity err"], row["pruned err"], row["MDA err"]]
    row["status"] = ("wrong" if max(errs) > TOL else
                     "barrier-only" if row["prunable"] < 10 else "exact")
    row["s"] = round(time.perf_counter() - t0, 1)
    return row


# ------------------------------------------------------------------------------ the families


def candidates(module: str, limit: int) -> list[str]:
    """The ``limit`` smallest variants of a timm module, by parameter count (meta device)."""
    import timm
    import torch

    sized = []
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False, num_classes=10)
            sized.append((sum(p.numel() for p in m.parameters()), name))
        except Exception:
            continue
    return [n for _, n in sorted(sized)[:limit]]


def _worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--sizes", args.sizes,
           "--density", str(args.density), "--per-class", str(args.per_class),
           "--threads", str(args.threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if lines:
            return json.loads(lines[-1])
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "status": "crash", "stage": "process", "note": tail[:150]}
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "crash", "stage": "timeout",
                "note": f"over {args.timeout} s"}


COLUMNS = ["family", "model", "input", "status", "prunable", "barriers", "top barrier",
           "top kept by", "pruned err", "identity err", "MDA err", "onnx", "params", "s", "stage",
           "note"]


def _cell(row: dict, key: str) -> str:
    v = row.get(key, "")
    if isinstance(v, float) and key.endswith("err"):
        return f"{v:.1e}"
    if key == "prunable" and v != "":
        return f"{v:.0f}%"
    return str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated timm model names")
    ap.add_argument("--families", default="", help="comma-separated timm modules (default all)")
    ap.add_argument("--tries", type=int, default=3, help="smallest variants tried per family")
    ap.add_argument("--sizes", default="64,96,128,160")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model")
    ap.add_argument("--out", default="", help="also write the table as markdown here")
    ap.add_argument("--json", default="", help="also write the rows as JSON lines here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(run_one(args.worker, sizes, args.density, args.per_class)), flush=True)
        return 0
    import timm
    from tabulate import tabulate

    if args.models:
        plan = [(None, [m]) for m in args.models.split(",")]
    else:
        families = args.families.split(",") if args.families else timm.list_modules()
        plan = [(f, candidates(f, args.tries)) for f in families]
    rows = []
    for family, names in plan:
        row = None
        for name in names:
            row = _worker(name, args)
            if row.get("status") != "untraced":
                break
        if row is None:
            continue
        row["family"] = family or "-"
        rows.append(row)
        print(" | ".join(_cell(row, k) for k in COLUMNS), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    table = tabulate([[_cell(r, k) for k in COLUMNS] for r in rows], headers=COLUMNS,
                     tablefmt="github")
    counts = Counter(r["status"] for r in rows)
    summary = (f"{len(rows)} timm families: " + ", ".join(
        f"{counts.get(k, 0)} {k}" for k in ("exact", "barrier-only", "wrong", "crash",
                                            "untraced")))
    print(table)
    print(summary)
    if args.out:
        Path(args.out).write_text(table + "\n\n" + summary + "\n")
    return 1 if counts.get("wrong") or counts.get("crash") else 0


if __name__ == "__main__":
    raise SystemExit(main())
