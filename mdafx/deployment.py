"""ONNX export with verification: checker, strict shape inference, onnxruntime parity.

``export_onnx`` lowers any ``nn.Module`` (in mdafx: a component or assembled fx GraphModule)
with ``torch.onnx.export`` and only moves the file into place once it has passed:

1. ``onnx.checker.check_model(full_check=True)``;
2. ``onnx.shape_inference.infer_shapes(check_type=True, strict_mode=True, data_prop=True)``;
3. (``check=True``) onnxruntime on CPU vs torch at batch 1 and batch 3, failing when any element
   has ``|ort - torch| > atol + rtol * |torch|`` (numpy ``allclose``), and on any non-finite
   output of either (a NaN model never passes as "equal").

This module is the only place where a model is lowered to ATen (``torch.export``): mdafx files
keep module-level graphs.

The exporter is the dynamo-based one (the default of ``torch.onnx.export``), fed with the same
``torch.export`` program that :mod:`mdafx.serialize` stores (eval mode, dynamic batch axis named
``batch``). Only if it raises does mdafx retry with the TorchScript exporter (``dynamo=False``);
the report then says ``exporter="torchscript"`` and why. The input is named ``input`` and the
outputs ``output`` (or ``output_<i>`` when there are several).

The metadata dict is stored in ``ModelProto.metadata_props``: one string prop per key, its
value JSON-encoded (``read_onnx_metadata`` reverses it). ``mdafx_version`` is added if missing.

``export_pt2`` writes the same ``torch.export`` program as a ``.pt2`` archive
(``torch.export.save``) for PyTorch runtimes (``torch.export.load(path).module()``, AOTInductor),
with the metadata as the extra file ``mdafx.json`` (``read_pt2_metadata``). It is verified the
same way: the file is loaded back and its outputs compared with the model's at batch 1 and 3.
Loading a ``.pt2`` file runs pickle (``torch.export.load`` says so): load only files you made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdafx.errors import ExportError, PreconditionError
from mdafx.fileio import atomic_output, check_outputs
from mdafx.ir import eval_mode

__all__ = ["ExportReport", "FORMATS", "export", "export_onnx", "export_program", "export_pt2",
           "onnx_latency", "onnxruntime_logits", "read_onnx_metadata", "read_pt2_metadata"]

INPUT_NAME = "input"
PARITY_BATCH_SIZES = (1, 3)
_TWO_GIB = 2**31
OPSETS = range(18, 24)
"""Opsets the dynamo exporter writes (a request outside them is refused before any work)."""
FORMATS = ("onnx", "pt2")
PT2_METADATA = "mdafx.json"  # the extra file of a .pt2 archive that holds the metadata


def mdafx_version() -> str:
    """The installed mdafx version (``0+unknown`` when it is not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("mdafx")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def export_program(model: torch.nn.Module,
                   example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` ``model`` in eval mode with a dynamic batch dimension (a batch of 1 is
    doubled for tracing: torch.export specialises sizes 0 and 1)."""
    traced_input = example_input
    if example_input.shape[0] < 2:
        traced_input = torch.cat([example_input, example_input], dim=0)
    with eval_mode(model):
        try:
            return torch.export.export(
                model, (traced_input,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                strict=False)
        except Exception as e:
            raise ExportError(
                f"torch.export failed for {type(model).__name__} with input "
                f"{tuple(example_input.shape)}: {type(e).__name__}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well it matches torch.

    ``max_abs_err`` / ``max_rel_err`` map batch size to the worst error over all outputs
    (empty when ``check=False``); the relative error is ``|ort - torch| / |torch|`` over the
    elements where ``|torch| > atol`` (elsewhere only the absolute error is meaningful).
    """

    path: Path
    opset: int | None  # None for a .pt2 file
    file_size: int
    max_abs_err: dict[int, float]
    max_rel_err: dict[int, float]
    exporter: str  # "dynamo" or "torchscript" (ONNX), "torch.export" (.pt2)
    fallback_reason: str | None = None

    def __str__(self) -> str:
        errs = ", ".join(f"b{b}: abs {self.max_abs_err[b]:.2e} rel {self.max_rel_err[b]:.2e}"
                         for b in sorted(self.max_abs_err)) or "parity not checked"
        via = self.exporter
        if self.fallback_reason:
            via += f" (fallback: {self.fallback_reason})"
        opset = "" if self.opset is None else f"opset {self.opset}, "
        return f"{self.path}: {opset}{self.file_size / 2**20:.2f} MiB, exporter {via}; {errs}"


def _output_names(model: torch.nn.Module, example_input: torch.Tensor) -> list[str]:
    """``output`` for one output, else ``output_0``, ``output_1``, ... (the model in eval mode
    is run once on the example to count them)."""
    with torch.no_grad():
        n_outputs = len(_flat(model(example_input)))
    return ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    metadata: Mapping[str, Any] | None = None,
    check: bool = True,
    opset: int | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    *,
    overwrite: bool = False,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` (dynamic batch axis), verified before it lands.

    The checker and strict shape inference always run; ``check`` adds the onnxruntime parity
    check at batch 1 and 3. Any failure raises :class:`ExportError` and leaves no file (the
    model is written to a temp file next to ``path`` and moved into place at the end).
    ``opset=None`` takes the exporter's default. Raises ``OutputError`` if ``path`` exists and
    not ``overwrite``.
    """
    import onnx

    path = Path(path)
    if opset is not None and opset not in OPSETS:
        raise PreconditionError(f"ONNX opset {opset} is not supported: mdafx exports opsets "
                                f"{OPSETS.start}..{OPSETS.stop - 1}")
    props = _metadata_props(metadata or {})
    check_outputs([path], overwrite=overwrite)
    with eval_mode(model):
        output_names = _output_names(model, example_input)
        proto, exporter, reason = _to_proto(model, example_input, opset, output_names)
        onnx.helper.set_model_props(proto, {**_existing_props(proto), **props})
        _verify_proto(proto, path)
        if opset is not None and _opset(proto) != opset:
            raise ExportError(f"{path}: asked for opset {opset} but the exporter wrote opset "
                              f"{_opset(proto)}; file not written")
        if proto.ByteSize() >= _TWO_GIB:
            raise ExportError(f"{path}: model is over 2 GiB; external data is not supported")
        with atomic_output(path, overwrite=overwrite) as tmp:
            onnx.save_model(proto, str(tmp))
            abs_errs: dict[int, float] = {}
            rel_errs: dict[int, float] = {}
            if check:
                abs_errs, rel_errs = _parity(model, tmp, example_input, output_names, rtol, atol,
                                             shown_as=path)
            size = tmp.stat().st_size
    return ExportReport(path=path, opset=_opset(proto), file_size=size, max_abs_err=abs_errs,
                        max_rel_err=rel_errs, exporter=exporter, fallback_reason=reason)


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, each value JSON-decoded (raw string if not JSON)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    return out


def onnx_latency(path: str | os.PathLike[str], batch_size: int = 1, warmup: int = 10,
                 iters: int = 50, *, threads: int | None = None) -> float:
    """Median onnxruntime (CPU) latency of one inference, in milliseconds.

    The input is random, with ``batch_size`` in the dynamic batch axis; all other input dims
    must be static. ``threads`` sets ``intra_op_num_threads`` (``None``: onnxruntime default).
    """
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise PreconditionError("need batch_size >= 1, iters >= 1, warmup >= 0")
    session = _session(path, threads)
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        shape = list(arg.shape)
        if shape and not isinstance(shape[0], int):
            shape[0] = batch_size
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ExportError(f"{path}: input {arg.name} has non-static dims {arg.shape}")
        feeds[arg.name] = rng.standard_normal(shape).astype(_numpy_dtype(arg.type, path))
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------

def _metadata_props(metadata: Mapping[str, Any]) -> dict[str, str]:
    props: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise PreconditionError(f"metadata keys must be str, got {key!r}")
        try:
            props[key] = json.dumps(value, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise PreconditionError(f"metadata[{key!r}] is not JSON-serialisable: {e}") from e
    props.setdefault("mdafx_version", json.dumps(mdafx_version()))
    return props


def _existing_props(proto: Any) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _to_proto(model: torch.nn.Module, example_input: torch.Tensor, opset: int | None,
              output_names: list[str]) -> tuple[Any, str, str | None]:
    try:
        ep = export_program(model, example_input)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep, (example_input,), None, dynamo=True, input_names=[INPUT_NAME],
                output_names=output_names, opset_version=opset, verbose=False)
        return program.model_proto, "dynamo", None
    except Exception as e:
        dynamo_error = f"{type(e).__name__}: {_first_line(e)}"
    try:
        return _torchscript_proto(model, example_input, opset, output_names), "torchscript", \
            f"dynamo exporter failed ({dynamo_error})"
    except Exception as e:
        raise ExportError(f"ONNX export of {type(model).__name__} failed with both exporters; "
                          f"dynamo: {dynamo_error}; torchscript: {type(e).__name__}: "
                          f"{_first_line(e)}") from e


def _torchscript_proto(model: torch.nn.Module, example_input: torch.Tensor, opset: int | None,
                       output_names: list[str]) -> Any:
    import io

    import onnx

    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *output_names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example_input,), buffer, dynamo=False,
                          input_names=[INPUT_NAME], output_names=output_names,
                          dynamic_axes=axes, opset_version=opset or 17)
    return onnx.load_from_string(buffer.getvalue())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _verify_proto(proto: Any, path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"{path}: onnx.checker rejected the exported model: {e}") from e
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                          data_prop=True)
    except Exception as e:
        raise ExportError(f"{path}: strict ONNX shape inference failed: {e}") from e


def _opset(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _session(path: str | os.PathLike[str], threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


def _run_onnxruntime(path: Path, inputs: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """Outputs of the ONNX model at ``path`` for each input batch (one session for all)."""
    session = _session(path, None)
    return [session.run(None, {INPUT_NAME: x}) for x in inputs]


def _parity(model: torch.nn.Module, onnx_path: Path, example_input: torch.Tensor,
            output_names: Sequence[str], rtol: float, atol: float,
            shown_as: Path) -> tuple[dict[int, float], dict[int, float]]:
    return _compare(model, lambda xs: _run_onnxruntime(onnx_path, [x.detach().cpu().numpy()
                                                                  for x in xs]),
                    example_input, output_names, rtol, atol, shown_as, "onnxruntime")


def _compare(model: torch.nn.Module, run, example_input: torch.Tensor,
             output_names: Sequence[str], rtol: float, atol: float, shown_as: Path,
             runtime: str) -> tuple[dict[int, float], dict[int, float]]:
    """Worst errors of ``run`` (input batches -> per batch, a list of numpy outputs) against
    ``model`` at :data:`PARITY_BATCH_SIZES`; any element off raises :class:`ExportError`."""
    abs_errs: dict[int, float] = {}
    rel_errs: dict[int, float] = {}
    failures = []
    inputs = [_random_batch(example_input, batch) for batch in PARITY_BATCH_SIZES]
    outputs = run(inputs)
    for batch, x, got in zip(PARITY_BATCH_SIZES, inputs, outputs):
        with torch.no_grad():
            want = [t.detach().cpu().numpy() for t in _flat(model(x))]
        if len(got) != len(want):
            raise ExportError(f"{shown_as}: the {runtime} model has {len(got)} outputs, torch "
                              f"{len(want)}")
        abs_errs[batch] = rel_errs[batch] = 0.0
        for name, w, g in zip(output_names, want, got):
            if w.shape != g.shape:
                failures.append(f"batch {batch} {name}: shape {g.shape} vs torch {w.shape}")
                continue
            if not (np.isfinite(w).all() and np.isfinite(g).all()):
                failures.append(f"batch {batch} {name}: non-finite outputs (torch "
                                f"{int((~np.isfinite(w)).sum())}, {runtime} "
                                f"{int((~np.isfinite(g)).sum())} of {w.size})")
                continue
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            ref = np.abs(w.astype(np.float64))
            big = ref > atol
            max_abs = float(diff.max(initial=0.0))
            max_rel = float(np.max(diff[big] / ref[big], initial=0.0))
            abs_errs[batch] = max(abs_errs[batch], max_abs)
            rel_errs[batch] = max(rel_errs[batch], max_rel)
            bad = ~np.isclose(g, w, rtol=rtol, atol=atol)
            if bad.any():
                failures.append(f"batch {batch} {name}: {int(bad.sum())}/{bad.size} elements off, "
                                f"max abs err {max_abs:.3e}, max rel err {max_rel:.3e}")
    if failures:
        raise ExportError(f"{shown_as}: {runtime} does not match torch (rtol={rtol}, "
                          f"atol={atol}); file not written: " + "; ".join(failures))
    return abs_errs, rel_errs


def _random_batch(example_input: torch.Tensor, batch: int) -> torch.Tensor:
    shape = (batch, *example_input.shape[1:])
    g = torch.Generator().manual_seed(batch)
    if example_input.is_floating_point():
        return torch.randn(shape, generator=g, dtype=example_input.dtype)
    index = torch.arange(batch) % example_input.shape[0]
    return example_input[index]


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def _numpy_dtype(ort_type: str, path: str | os.PathLike[str]) -> Any:
    table = {"tensor(float)": np.float32, "tensor(double)": np.float64,
             "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
             "tensor(bool)": np.bool_}
    if ort_type not in table:
        raise ExportError(f"{path}: input type {ort_type} is not supported by onnx_latency")
    return table[ort_type]


def onnxruntime_logits(path: str | os.PathLike[str], batches) -> torch.Tensor:
    """The outputs of the ONNX model at ``path`` (onnxruntime, CPU) on ``(x, ...)`` batches."""
    session = _session(path, None)
    name = session.get_inputs()[0].name
    return torch.from_numpy(np.concatenate([session.run(None, {name: x.numpy()})[0]
                                            for x, *_ in batches]))


def export_pt2(model: torch.nn.Module, path: str | os.PathLike[str],
               example_input: torch.Tensor, metadata: Mapping[str, Any] | None = None,
               check: bool = True, rtol: float = 1e-3, atol: float = 1e-4, *,
               overwrite: bool = False) -> ExportReport:
    """``model`` as a ``torch.export`` archive at ``path`` (``.pt2``, dynamic batch axis), with
    ``metadata`` as JSON in its extra file ``mdafx.json``. ``check`` loads the written file
    back with ``torch.export.load`` and compares its outputs with ``model``'s at batch 1 and 3
    (``rtol``/``atol`` as for ONNX); a failure raises :class:`ExportError` and leaves no file.
    Loading a ``.pt2`` runs pickle: load only files you made."""
    path = Path(path)
    props = _metadata_props(metadata or {})
    check_outputs([path], overwrite=overwrite)
    with eval_mode(model):
        names = _output_names(model, example_input)
        program = export_program(model, example_input)
        extra = {PT2_METADATA: json.dumps({k: json.loads(v) for k, v in props.items()},
                                          sort_keys=True)}
        with atomic_output(path, overwrite=overwrite) as tmp:
            try:
                with open(tmp, "wb") as f:
                    torch.export.save(program, f, extra_files=extra)
            except Exception as e:
                raise ExportError(f"{path}: torch.export.save failed: {type(e).__name__}: "
                                  f"{_first_line(e)}") from e
            abs_errs: dict[int, float] = {}
            rel_errs: dict[int, float] = {}
            if check:
                loaded = _load_pt2(tmp, path).module()
                abs_errs, rel_errs = _compare(
                    model, lambda xs: [[t.detach().numpy() for t in _flat(loaded(x))]
                                       for x in xs],
                    example_input, names, rtol, atol, path, "torch.export.load")
            size = tmp.stat().st_size
    return ExportReport(path=path, opset=None, file_size=size, max_abs_err=abs_errs,
                        max_rel_err=rel_errs, exporter="torch.export")


def _load_pt2(path: Path, shown_as: Path, extra_files: dict | None = None):
    try:
        with torch.no_grad():
            return torch.export.load(path, extra_files=extra_files)
    except Exception as e:
        raise ExportError(f"{shown_as}: torch.export.load cannot read it: {type(e).__name__}: "
                          f"{_first_line(e)}") from e


def read_pt2_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata :func:`export_pt2` stored in a ``.pt2`` file (``{}`` when it has none).
    This loads the program, which runs pickle: read only files you made."""
    extra = {PT2_METADATA: ""}
    _load_pt2(Path(path), Path(path), extra)
    text = extra[PT2_METADATA]
    if isinstance(text, bytes):
        text = text.decode()
    return json.loads(text) if text else {}


def export(model, path: str | os.PathLike[str], *, format: str = "onnx",
           opset: int | None = None, check: bool = True, rtol: float = 1e-3, atol: float = 1e-4,
           latency_batches: Sequence[int] = (), threads: int | None = None,
           overwrite: bool = False) -> tuple[ExportReport, dict[int, float]]:
    """A component or assembled model (or any traced GraphModule) with its metadata as ONNX
    (``format="onnx"``, verified as :func:`export_onnx` says; with ``latency_batches``, the
    median onnxruntime latency (ms) at each batch size on ``threads`` intra-op threads) or as a
    ``torch.export`` archive (``format="pt2"``, :func:`export_pt2`; no opset, no latency)."""
    from mdafx.ir import input_shape

    if format not in FORMATS:
        raise PreconditionError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    if format == "pt2" and (opset is not None or latency_batches):
        raise PreconditionError("an opset and onnxruntime latency go with ONNX, not pt2")
    module = getattr(model, "module", model)
    example = torch.zeros(1, *input_shape(module)[1:])
    metadata = getattr(model, "metadata", None)
    if format == "pt2":
        return export_pt2(module, path, example, metadata=metadata, check=check, rtol=rtol,
                          atol=atol, overwrite=overwrite), {}
    report = export_onnx(module, path, example, metadata=metadata,
                         check=check, opset=opset, rtol=rtol, atol=atol, overwrite=overwrite)
    latency = {b: onnx_latency(path, b, threads=threads) for b in latency_batches}
    return report, latency
