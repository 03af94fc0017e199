"""``mdafx export``: a component or assembled model file -> ONNX, verified before it lands
(checker, strict shape inference, onnxruntime parity at batch 1 and 3), or -> a
``torch.export`` archive (``.pt2``, reloaded and compared at batch 1 and 3)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import common

LATENCY_BATCHES = (1, 32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_file", metavar="MODEL", help="component or assembled model file")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="output file (default: MODEL with the format's suffix)")
    p.add_argument("--format", choices=("onnx", "pt2"),
                   help="onnx, or pt2 (torch.export archive, for torch users; loading one runs "
                        "pickle) (default: from the output's suffix, else onnx)")
    p.add_argument("--opset", type=common.positive_int, metavar="N",
                   help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--rtol", type=common.non_negative, default=1e-3,
                   help="parity: relative tolerance (default 1e-3)")
    p.add_argument("--atol", type=common.non_negative, default=1e-4,
                   help="parity: absolute tolerance (default 1e-4)")
    p.add_argument("--latency", action="store_true",
                   help="also measure the median onnxruntime latency at batch 1 and 32 (on "
                        "--threads threads, default torch's count)")
    common.add_force(p)


def run(args: argparse.Namespace) -> int:
    model_file = Path(args.model_file)
    fmt = args.format or ("pt2" if args.output and Path(args.output).suffix == ".pt2"
                          else "onnx")
    output = Path(args.output) if args.output else model_file.with_suffix(f".{fmt}")
    if fmt == "pt2" and (args.opset is not None or args.latency):
        raise common.UsageError("--opset and --latency go with ONNX, not --format pt2")
    common.require_files(model=model_file)
    common.check_outputs(args, [output], [model_file])
    import torch  # heavy: only when the command runs (`--help` stays light)

    from mdafx import api

    threads = getattr(args, "threads", None) or torch.get_num_threads()
    report, latency = api.export(api.load(model_file), output, format=fmt, opset=args.opset,
                                 check=not args.no_check, rtol=args.rtol, atol=args.atol,
                                 latency_batches=LATENCY_BATCHES if args.latency else (),
                                 threads=threads, overwrite=args.force)
    common.emit_json(args, {
        "command": "export", "format": fmt, "output": str(report.path), "opset": report.opset,
        "bytes": report.file_size, "exporter": report.exporter,
        "fallback_reason": report.fallback_reason,
        "parity": {str(b): {"max_abs_err": report.max_abs_err[b],
                            "max_rel_err": report.max_rel_err[b]}
                   for b in sorted(report.max_abs_err)} or None,
        "latency_ms": {str(b): ms for b, ms in latency.items()} or None,
        "threads": threads if latency else None})
    rows = [["file", str(report.path)], ["opset", report.opset],
            ["size", f"{report.file_size / 1024:.1f} KiB"],
            ["exporter", report.exporter + (f" ({report.fallback_reason})"
                                            if report.fallback_reason else "")]]
    for batch in sorted(report.max_abs_err):
        rows.append([f"parity batch {batch}", f"max abs err {report.max_abs_err[batch]:.2e}, "
                                              f"max rel err {report.max_rel_err[batch]:.2e}"])
    if not report.max_abs_err:
        rows.append(["parity", "not checked (--no-check)"])
    for batch, ms in latency.items():
        rows.append([f"latency batch {batch}",
                     f"{ms:.3f} ms (onnxruntime CPU, {threads} thread{'s' * (threads != 1)})"])
    common.say(args, *common.table(rows, [f"{fmt} export", ""]))
    common.say(args, f"wrote {report.path}", final=True)
    return common.EXIT_OK
