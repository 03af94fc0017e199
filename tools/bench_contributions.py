"""Benchmark the cheap contribution form (MDA §1.2) against the reference's naive form.

For each model (torchvision ``vgg16_bn`` at 32×32 and ``resnet50`` at 224×224 by default, random
weights, ``--num-classes`` outputs, random inputs and labels, all seeded) it measures, each in a
fresh worker subprocess:

- ``inference``: plain eval-mode forward over the samples;
- ``cheap``: :func:`passes.contributions.contributions` (box sums, chunked ``W·S`` for ``K > 1``
  convs; Linear and 1×1 convs keep only the per-class sums ``Σ S⁺``, ``Σ S⁻`` and return a
  ``FactoredContribution`` that shares the layer's weight, so their ``[C, O, I]`` never exists;
  ``--forward-batch N`` makes it run the model on slices of N rows of each batch, which bounds
  the activations alive at once — off by default, so every phase sees the same forward);
- ``naive``: :func:`passes.contributions.naive_contributions` (``unfold`` and the ``B×O×I×H×W``
  product per layer), under ``--naive-timeout``; running out of memory (``--mem-limit-gb``
  caps the workers' data segment via ``RLIMIT_DATA``) or time is reported, not raised.

Memory: after the untimed warm-up the worker returns the allocator's free heap to the OS (glibc
``malloc_trim(0)``), resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` ← 5) right
before the measured phase and reports ``VmHWM − VmRSS_before``: the peak resident memory that
the phase added on top of the model and the pre-generated inputs. (Without the trim, a phase
could reuse pages the warm-up forward touched and freed, and its peak would read too low: ~0
for inference, and less than its own ``A`` for the cheap form.) "A MB" is what the result
holds beyond the model (dense ``[C, O, I/g]`` tensors of ``K > 1`` convs plus the float64 class
sums of factored layers), part of that peak; "dense A MB" is the ``C·Σ O·I/g`` float32 tensors
that the naive form holds (and the cheap form held before factoring).

Accuracy (after the measurements, not timed): per layer, ``max|A_cheap − A_naive| /
max|A_naive|`` (the table shows the worst layer), with a factored ``A_cheap`` densified one class
at a time (``FactoredContribution.for_class``), and the masks the two A's induce (MDA §1.3,
per class c and output channel o): ``R = (A − min_i A) / (max_i A − min_i A + ε)``, α-mask
``1[R > α]``, and the β-mask of the input channels for an all-ones output mask,
``1[minmax_i(Σ_o 1[R > α]) > β]``.


Example::

    python tools/bench_contributions.py --samples 20 --batch 10 --threads 1 \
        --naive-timeout 300 --mem-limit-gb 12
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODELS: dict[str, int] = {"vgg16_bn": 32, "resnet50": 224}  # name -> default input size
MODES = ("inference", "cheap", "naive")
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# worker side (one measurement per process)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(match.group(1)) / 1024


def _trim_heap() -> bool:
    """Give the allocator's free heap back to the OS (glibc ``malloc_trim``), so that a phase
    cannot hide its memory in pages that the warm-up touched and freed."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(args: argparse.Namespace) -> tuple[Any, list[tuple[Any, Any]]]:
    import torch
    import torch.fx
    import torchvision

    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=args.num_classes)
    gm = torch.fx.symbolic_trace(model.eval())
    gen = torch.Generator().manual_seed(args.seed + 1)
    size = args.size or MODELS[args.model]
    x = torch.randn(args.samples, 3, size, size, generator=gen)
    y = torch.randint(0, args.num_classes, (args.samples,), generator=gen)
    batches = [(x[i:i + args.batch], y[i:i + args.batch])
               for i in range(0, args.samples, args.batch)]
    return gm, batches


def _masks(a: Any, alpha: float, beta: float, eps: float) -> tuple[Any, Any, Any]:
    """``R``, the α-mask ``[O, I]`` and the β-mask ``[I]`` of one class's ``A[O, I]`` (for an
    all-ones output mask)."""
    lo = a.amin(1, keepdim=True)
    r = (a - lo) / (a.amax(1, keepdim=True) - lo + eps)
    b = r > alpha
    n = b.sum(0).double()
    n = (n - n.min()) / (n.max() - n.min() + eps)
    return r, b, n > beta


def _compare(cheap_path: str, naive: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mdafx.passes.contributions import FactoredContribution

    cheap = torch.load(cheap_path, map_location="cpu", weights_only=True, mmap=True)
    cheap = {k: FactoredContribution.from_dict(v) if FactoredContribution.is_dict(v) else v
             for k, v in cheap.items()}
    worst, worst_layer = 0.0, ""
    alpha_diff = alpha_total = beta_diff = beta_total = 0
    gap = 0.0
    for name, a_naive in naive.items():
        a_cheap = cheap[name]
        diff = scale = 0.0
        for c in range(a_naive.shape[0]):  # per class keeps the temporaries to one [O, I]
            an = a_naive[c].double()
            ac = (a_cheap.for_class(c) if isinstance(a_cheap, FactoredContribution)
                  else a_cheap[c]).double()
            diff = max(diff, (ac - an).abs().max().item())
            scale = max(scale, an.abs().max().item())
            rn, bn, mn = _masks(an, args.alpha, args.beta, args.eps)
            _, bc, mc = _masks(ac, args.alpha, args.beta, args.eps)
            differ = bn != bc
            if differ.any():  # how close to the threshold the disagreeing entries are
                gap = max(gap, (rn[differ] - args.alpha).abs().max().item())
            alpha_diff += int(differ.sum())
            alpha_total += bn.numel()
            beta_diff += int((mn != mc).sum())
            beta_total += mn.numel()
        rel = diff / scale if scale > 0 else diff
        if rel >= worst:
            worst, worst_layer = rel, name
    return {"max_rel_diff": worst, "worst_layer": worst_layer, "alpha_diff": alpha_diff,
            "alpha_total": alpha_total, "alpha_gap": gap, "beta_diff": beta_diff,
            "beta_total": beta_total}


def _limit_data(gb: float | None) -> None:
    """Soft ``RLIMIT_DATA`` for the measured phase only (``None``: back to the hard limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = hard if gb is None else int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mdafx.passes.contributions import FactoredContribution, class_contributions, naive_contributions

    torch.set_num_threads(args.threads)
    gm, batches = _build(args)
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    with torch.no_grad():  # one-time costs (allocator, kernel selection) out of every phase
        for x, _ in batches[:args.warmup]:
            gm(x)
    trimmed = _trim_heap()
    measured = _reset_peak()
    rss_before = _status_mib("VmRSS")
    if args.mem_limit_gb:
        _limit_data(args.mem_limit_gb)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if args.worker == "inference":
                for x, _ in batches:
                    gm(x)
                a = None
            elif args.worker == "cheap":
                a = class_contributions(gm, batches, args.num_classes, progress=False,
                                  chunk_bytes=args.chunk_mb * MIB,
                                  forward_batch=args.forward_batch)
            else:
                a = naive_contributions(gm, batches, args.num_classes, progress=False)
    except (RuntimeError, MemoryError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {**result, "status": f"OOM (>{args.mem_limit_gb:g} GB)" if args.mem_limit_gb
                else "OOM", "detail": str(err).splitlines()[0][:200]}
    finally:
        if args.mem_limit_gb:
            _limit_data(None)
    result["time_s"] = time.perf_counter() - start
    peak = _status_mib("VmHWM") if measured else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(status="ok", peak_mib=peak - rss_before,
                  peak_method=("VmHWM after clear_refs" if measured else "ru_maxrss (no reset)")
                  + (", heap trimmed" if trimmed else ""), heap_trimmed=trimmed)
    if a is not None:
        result["layers"] = len(a)
        result["factored"] = sum(isinstance(t, FactoredContribution) for t in a.values())
        result["a_mib"] = sum(t.nbytes if isinstance(t, FactoredContribution)
                              else t.numel() * t.element_size() for t in a.values()) / MIB
        result["dense_a_mib"] = sum(t.numel() for t in a.values()) * 4 / MIB
        if args.worker == "cheap":
            torch.save({k: t.to_dict() if isinstance(t, FactoredContribution) else t
                        for k, t in a.items()}, args.cheap_out)
        else:
            del gm, batches
            result.update(_compare(args.cheap_out, a, args))
    return result


# ---------------------------------------------------------------------------------------------
# driver side


def _run_worker(args: argparse.Namespace, model: str, mode: str, cheap_out: str,
                timeout: float | None) -> dict[str, Any]:
    fd, out = tempfile.mkstemp(suffix=".json", dir=args.workdir)
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--model", model,
           "--json-out", out, "--cheap-out", cheap_out]
    for key in ("samples", "batch", "num_classes", "seed", "warmup", "threads", "chunk_mb",
                "alpha", "beta", "eps", "mem_limit_gb", "size", "forward_batch"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout >{timeout:g}s"}
    try:
        if proc.returncode != 0:
            if proc.returncode < 0:
                return {"status": f"killed (signal {-proc.returncode}, OOM?)"}
            print(proc.stderr[-4000:], file=sys.stderr)
            tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
            return {"status": f"error rc={proc.returncode}: {tail[0][:80]}"}
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(num: dict[str, Any], den: dict[str, Any], key: str) -> str:
    if num.get("status") != "ok" or den.get("status") != "ok" or not den.get(key):
        return "-"
    return f"{num[key] / den[key]:.1f}x"


def drive(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    os.makedirs(args.workdir, exist_ok=True)
    perf_rows, acc_rows, threads, trimmed = [], [], None, None
    for model in args.models:
        cheap_out = os.path.join(args.workdir, f"{model}.cheap.pt")
        runs: dict[str, dict[str, Any]] = {}
        for mode in MODES:
            timeout = args.naive_timeout if mode == "naive" else None
            print(f"[{model}] {mode} ...", file=sys.stderr, flush=True)
            runs[mode] = _run_worker(args, model, mode, cheap_out, timeout)
            threads = runs[mode].get("threads", threads)
            trimmed = runs[mode].get("heap_trimmed", trimmed)
        if os.path.exists(cheap_out):
            os.unlink(cheap_out)
        inf, cheap, naive = runs["inference"], runs["cheap"], runs["naive"]
        size = args.size or MODELS[model]
        perf_rows.append([
            f"{model} {size}x{size}",
            f"{cheap.get('layers')} ({cheap.get('factored')} factored)"
            if cheap.get("status") == "ok" else cheap.get("status"),
            _fmt(cheap.get("a_mib"), ".0f"), _fmt(cheap.get("dense_a_mib"), ".0f"),
            _fmt(inf.get("time_s"), ".2f"), _fmt(cheap.get("time_s"), ".2f"),
            _fmt(naive.get("time_s"), ".2f") if naive["status"] == "ok" else naive["status"],
            _ratio(naive, cheap, "time_s"), _ratio(cheap, inf, "time_s"),
            _fmt(inf.get("peak_mib"), ".0f"), _fmt(cheap.get("peak_mib"), ".0f"),
            _fmt(naive.get("peak_mib"), ".0f"), _ratio(naive, cheap, "peak_mib")])
        if naive.get("status") == "ok":
            acc_rows.append([
                model, f"{naive['max_rel_diff']:.2e} ({naive['worst_layer']})",
                "yes" if naive["alpha_diff"] == 0 else "no",
                f"{naive['alpha_diff']}/{naive['alpha_total']}"
                + (f" (|R−α| ≤ {naive['alpha_gap']:.1e})" if naive["alpha_diff"] else ""),
                "yes" if naive["beta_diff"] == 0 else "no",
                f"{naive['beta_diff']}/{naive['beta_total']}"])
        else:
            acc_rows.append([model, f"naive: {naive['status']}", "-", "-", "-", "-"])
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads: {threads}, "
          f"samples: {args.samples}, batch: {args.batch}, classes: {args.num_classes}, "
          f"chunk budget: {args.chunk_mb} MiB, cheap forward batch: "
          f"{args.forward_batch or args.batch}, peak memory: VmHWM − VmRSS before the phase, "
          f"heap trimmed after warm-up: {trimmed} (fresh subprocess per measurement)")
    print(tabulate(perf_rows, headers=[
        "model", "layers", "A MB", "dense A MB", "infer s", "cheap s", "naive s",
        "naive/cheap time", "cheap/infer time", "infer peak MB", "cheap peak MB", "naive peak MB",
        "naive/cheap mem"], tablefmt="github"))
    print()
    print(tabulate(acc_rows, headers=[
        "model", "max|ΔA|/max|A| (worst layer)", f"α-masks equal (α={args.alpha})",
        "α entries differing", f"β-masks equal (β={args.beta})", "β entries differing"],
        tablefmt="github"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--size", type=int, default=None, help="input size (default: per model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed forward batches per worker")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunk-mb", type=int, default=256, help="cheap form's chunk budget")
    p.add_argument("--forward-batch", type=int, default=None,
                   help="cheap form: run the model on slices of this many rows of each batch "
                        "(default: whole batches, like inference and naive)")
    p.add_argument("--naive-timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="RLIMIT_DATA of each worker (an allocation beyond it reports OOM)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--beta", type=float, default=0.2)
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mdafx-bench"))
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    p.add_argument("--cheap-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        with open(args.json_out, "w") as f:
            json.dump(result, f)
    else:
        drive(args)


if __name__ == "__main__":
    main()
