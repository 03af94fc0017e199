"""One self-describing file for mdafx components and assembled models.

``save_model(model, path, metadata, example_input)`` writes any ``nn.Module`` (in mdafx: an fx
``GraphModule``) to one file; ``load_model(path)`` gives back a callable module plus its metadata,
without the source model's Python class and without unpickling anything.

Design: torch.export as the tracer, not as the file format
-----------------------------------------------------------
``torch.export.export`` is used to lower the model to an ATen graph with a dynamic batch dimension
(``torch.export.Dim``), but ``torch.export.save`` / ``torch.export.load`` are **not** used as the
carrier, because loading a crafted ``.pt2`` file runs arbitrary code:

- its docstring says so ("uses pickle under the hood ... Never load data from an untrusted
  source");
- ``torch/export/pt2_archive/_package.py`` calls ``torch.load(..., weights_only=False)`` on any
  weight or constant whose JSON config says ``use_pickle: true``, and ``pickle.loads`` on opaque
  constants; ``_export/serde/serialize.py:deserialize_torch_artifact`` retries a failed
  ``weights_only=True`` load with ``weights_only=False``;
- verified on torch 2.14.1: a ``.pt2`` whose weights config was flipped to ``use_pickle`` and
  whose weight payload was a pickle with ``__reduce__ -> os.system`` ran the command inside
  ``torch.export.load`` (the load then failed, after the payload had run);
- its graph deserializer also resolves any ``torch.*`` attribute path as a call target and
  parses symbolic shapes with sympy, so even without pickle the graph itself would need
  vetting.

The mdafx file is therefore a plain zip (stored, never compressed) of JSON and raw bytes::

    mdafx.json    {"format": "mdafx-model", "format_version", "mdafx_version", "metadata"}
    graph.json    input spec, output structure, nodes (placeholder/get_attr/call_function/output)
    tensors.json  name -> kind, dtype, shape, byte range (safetensors-like index)
    tensors.bin   the raw little-endian tensor bytes, back to back

Loading reads no pickle (tensors come from ``torch.frombuffer``), and builds the fx graph itself
from vetted pieces only:

- call targets are ATen ``OpOverload`` s (``aten.<op>.<overload>``) or a short table of
  ``operator`` functions for symbolic sizes. ATen ops with a free-form string argument
  (``aten::save``, ``aten::from_file``, ``aten::_print``, ...) are refused: only known enum-like
  string arguments (``approximate``, ``rounding_mode``, ...) are allowed, with a restricted
  character set;
- node names, attribute paths and keyword names must match ``[A-Za-z0-9_]`` patterns, because fx
  turns them into Python source (``GraphModule.recompile``); literals are only JSON scalars,
  lists, tuples, ``torch.dtype`` / ``layout`` / ``memory_format`` names and plain device strings.

The format version is read first; a newer version is refused before anything else is parsed.
Any other malformed content is a :class:`~mdafx.errors.FormatError` naming the file. What this
does *not* promise: ATen kernels are not hardened against adversarial shapes (a crafted file can
still ask for a huge allocation), as with any model format that runs tensor programs.

The loaded model is an ATen-level ``torch.fx.GraphModule`` in eval semantics: batch norm and
dropout are frozen as they were at save time (``model.eval()`` is applied while exporting), and
``train()`` does not change them. Parameters and buffers keep their original qualified names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import keyword
import math
import operator
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx

from mdafx.errors import ExportError, FormatError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LoadedModel",
    "atomic_output",
    "export_program",
    "lift_batch_norms",
    "load_model",
    "mdafx_version",
    "save_model",
]

FORMAT_NAME = "mdafx-model"
FORMAT_VERSION = 1
RESERVED_METADATA_KEYS = ("format_version", "mdafx_version")

_HEADER = "mdafx.json"
_GRAPH = "graph.json"
_INDEX = "tensors.json"
_TENSORS = "tensors.bin"
_ENTRIES = (_HEADER, _GRAPH, _INDEX, _TENSORS)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")
_ATTR_ATOM_RE = re.compile(r"^[A-Za-z0-9_]{1,200}$")
_OP_RE = re.compile(r"^aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu|meta)(:[0-9]{1,3})?$")
_STR_LITERAL_RE = re.compile(r"^[A-Za-z0-9_,. \->]{0,256}$")
# NOTE: ATen string arguments are a code/file-path channel (aten::save(filename),
# aten::from_file(filename)); only these enum-like ones may appear in a graph.
_ENUM_STR_ARGS = frozenset({
    "approximate", "rounding_mode", "padding", "mode", "reduce", "reduction", "interpolation",
    "padding_mode", "indexing", "side", "equation", "padding_side", "pad_mode",
})
_PY_FUNCTIONS: dict[str, Any] = {
    f"operator.{name}": getattr(operator, name)
    for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg",
                 "eq", "ne", "lt", "le", "gt", "ge")
}
_PY_FUNCTIONS.update({
    "math.ceil": math.ceil, "math.floor": math.floor, "math.trunc": math.trunc,
    "torch.sym_int": torch.sym_int, "torch.sym_float": torch.sym_float,
    "torch.sym_max": torch.sym_max, "torch.sym_min": torch.sym_min, "torch.sym_not": torch.sym_not,
})
_PY_FUNCTION_NAMES = {id(fn): name for name, fn in _PY_FUNCTIONS.items()}
# Runtime shape asserts carry free-form messages; they are dropped at save time.
_DROPPED_ASSERTS = frozenset({
    torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_async.msg})

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float16", "bfloat16", "float32", "float64", "complex64", "complex128",
                 "uint8", "int8", "int16", "int32", "int64", "bool")
}
_LAYOUTS = {name: getattr(torch, name) for name in ("strided", "sparse_coo", "_mkldnn")
            if hasattr(torch, name)}
_MEMORY_FORMATS = {name: getattr(torch, name) for name in (
    "contiguous_format", "channels_last", "channels_last_3d", "preserve_format")}


def mdafx_version() -> str:
    """``mdafx.__version__`` if set, else the installed package version, else ``0+unknown``."""
    version = getattr(sys.modules.get("mdafx"), "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("mdafx")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------------------------
# Atomic writes (shared with mdafx.export)
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and move it to ``path``.

    On any exception (including KeyboardInterrupt) the temp file is removed and ``path`` is
    untouched. Without ``overwrite`` an existing ``path`` is refused (``FileExistsError``),
    both before writing and, via ``os.link``, atomically at the end.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path}: file exists; pass overwrite=True to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
        _fsync_dir(parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _link_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path}: file appeared while writing; not replaced") from None
    except OSError:  # filesystems without hard links
        if os.path.lexists(path):
            raise FileExistsError(f"{path}: file appeared while writing; not replaced") from None
        os.replace(tmp, path)


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# Export: nn.Module -> ExportedProgram (ATen graph, dynamic batch)
# --------------------------------------------------------------------------------------------

def export_program(model: torch.nn.Module,
                   example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` ``model`` in eval mode with a dynamic batch dimension.

    The training flag of ``model`` is restored afterwards. A batch of 1 is doubled for tracing
    (torch.export specialises sizes 0 and 1).
    """
    _check_example(example_input)
    traced_input = example_input
    if example_input.shape[0] < 2:
        traced_input = torch.cat([example_input, example_input], dim=0)
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(
            model, (traced_input,), dynamic_shapes=({0: torch.export.Dim("batch")},),
            strict=False)
    except Exception as e:
        raise ExportError(
            f"torch.export failed for {type(model).__name__} with input "
            f"{tuple(example_input.shape)}: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)


def _check_example(example_input: Any) -> None:
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError(f"example_input needs a non-empty batch dimension, got shape "
                         f"{tuple(example_input.shape)}")


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TensorEntry:
    name: str
    kind: str  # "parameter" | "buffer" | "constant"
    tensor: torch.Tensor
    persistent: bool = True


def save_model(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    example_input: torch.Tensor,
    *,
    overwrite: bool = False,
    check: bool = True,
) -> Path:
    """Write ``model`` (any nn.Module / fx GraphModule) and ``metadata`` to one file.

    ``metadata`` must be JSON-serialisable (it round-trips through JSON: tuples come back as
    lists); ``format_version`` and ``mdafx_version`` are added and may not be given. With
    ``check`` the written file is loaded again and must reproduce ``model`` bit for bit on the
    example and on a random batch of 3, else :class:`ExportError` and nothing is written.
    Returns ``path``. Raises ``FileExistsError`` if ``path`` exists and not ``overwrite``.
    """
    path = Path(path)
    header = _make_header(metadata)
    _check_example(example_input)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path}: file exists; pass overwrite=True to replace it")
    ep = export_program(model, example_input)
    with atomic_output(path, overwrite=overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(_HEADER, _dumps(header))
            graph, tensors = _encode_program(ep, example_input)
            zf.writestr(_GRAPH, _dumps(graph))
            zf.writestr(_INDEX, _dumps(_write_tensors(zf, tensors)))
        if check:
            _check_round_trip(model, _read(tmp, shown_as=path), example_input, path)
    return path


def _make_header(metadata: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    bad = [k for k in metadata if not isinstance(k, str)]
    if bad:
        raise TypeError(f"metadata keys must be str, got {bad!r}")
    reserved = [k for k in RESERVED_METADATA_KEYS if k in metadata]
    if reserved:
        raise ValueError(f"metadata keys {reserved} are written by mdafx; do not pass them")
    for key, value in metadata.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata[{key!r}] is not JSON-serialisable: {e}") from e
    version = mdafx_version()
    full = {**metadata, "format_version": FORMAT_VERSION, "mdafx_version": version}
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "mdafx_version": version,
            "metadata": full}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


def _encode_program(ep: torch.export.ExportedProgram,
                    example_input: torch.Tensor) -> tuple[dict[str, Any], list[_TensorEntry]]:
    from torch.export.graph_signature import InputKind, OutputKind

    specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    bad_out = [s for s in ep.graph_signature.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if bad_out:
        raise ExportError(f"exported graph mutates state ({bad_out[0].kind.name} "
                          f"{bad_out[0].target}); mdafx files hold inference graphs only")
    tensors: list[_TensorEntry] = []
    nodes: list[dict[str, Any]] = []
    user_inputs: list[str] = []
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                user_inputs.append(node.name)
                nodes.append({"op": "placeholder", "name": node.name})
                continue
            tensors.append(_tensor_entry(ep, spec, node))
            nodes.append({"op": "get_attr", "name": node.name, "target": spec.target})
        elif node.op == "call_function":
            if node.target in _DROPPED_ASSERTS and not node.users:
                continue  # LoadedModel checks the input spec instead
            nodes.append(_encode_node(node))
        elif node.op == "output":
            nodes.append({"op": "output", "name": node.name,
                          "args": [_encode_arg(a, node) for a in node.args]})
        else:
            raise ExportError(f"unsupported node in exported graph: {node.format_node()}")
    if len(user_inputs) != 1:
        raise ExportError(f"expected one tensor input, the exported graph has {user_inputs}")
    graph = {
        "input": {"name": user_inputs[0], "dtype": _dtype_name(example_input.dtype),
                  "shape": [None, *example_input.shape[1:]]},
        "output": _encode_out_spec(ep.call_spec.out_spec),
        "nodes": nodes,
    }
    return graph, tensors


def _tensor_entry(ep: torch.export.ExportedProgram, spec: Any, node: torch.fx.Node) -> _TensorEntry:
    from torch.export.graph_signature import InputKind

    target = spec.target
    if spec.kind == InputKind.PARAMETER:
        return _TensorEntry(target, "parameter", ep.state_dict[target])
    if spec.kind == InputKind.BUFFER:
        if spec.persistent:
            return _TensorEntry(target, "buffer", ep.state_dict[target], persistent=True)
        return _TensorEntry(target, "buffer", ep.constants[target], persistent=False)
    constant = ep.constants.get(target) if target is not None else None
    if spec.kind == InputKind.CONSTANT_TENSOR and isinstance(constant, torch.Tensor):
        return _TensorEntry(target, "constant", ep.constants[target], persistent=False)
    raise ExportError(f"unsupported graph input {spec.kind.name} {target!r} "
                      f"({node.format_node()}): mdafx files hold tensors only")


def _encode_node(node: torch.fx.Node) -> dict[str, Any]:
    out: dict[str, Any] = {
        "op": "call_function",
        "name": node.name,
        "target": _encode_target(node),
        "args": [_encode_arg(a, node) for a in node.args],
        "kwargs": {k: _encode_arg(v, node) for k, v in node.kwargs.items()},
    }
    module = _source_module(node)
    if module:
        out["module"] = module
    return out


def _source_module(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _type in reversed(list(stack.values())):
        if isinstance(path, str) and path and not path.startswith("_empty"):
            return path
    return None


def _encode_target(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        name = f"aten.{target._opname}.{target._overloadname}"
        problem = _op_problem(target)
        if problem:
            raise ExportError(f"{node.format_node()}: {problem}")
        return name
    name = _PY_FUNCTION_NAMES.get(id(target))
    if name is None:
        raise ExportError(f"{node.format_node()}: call target {target!r} cannot be stored in an "
                          f"mdafx file (only ATen ops and symbolic-size arithmetic)")
    return name


def _op_problem(op: torch._ops.OpOverload) -> str | None:
    for arg in op._schema.arguments:
        if "str" in str(arg.type) and arg.name not in _ENUM_STR_ARGS:
            return f"{op} takes a free-form string argument {arg.name!r}; refused"
    return None


def _encode_arg(value: Any, node: torch.fx.Node) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, str) and not _STR_LITERAL_RE.match(value):
            raise ExportError(f"{node.format_node()}: string literal {value!r} not allowed")
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.fx.Node):
        return {"$node": value.name}
    if isinstance(value, list):
        return [_encode_arg(v, node) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [_encode_arg(v, node) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$dict": [[k, _encode_arg(v, node)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"$dtype": _dtype_name(value)}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.layout):
        return {"$layout": _enum_name(value, _LAYOUTS, node)}
    if isinstance(value, torch.memory_format):
        return {"$memory_format": _enum_name(value, _MEMORY_FORMATS, node)}
    raise ExportError(f"{node.format_node()}: argument {value!r} ({type(value).__name__}) "
                      f"cannot be stored in an mdafx file")


def _enum_name(value: Any, table: Mapping[str, Any], node: torch.fx.Node) -> str:
    for name, member in table.items():
        if member == value:
            return name
    raise ExportError(f"{node.format_node()}: unsupported {type(value).__name__} {value}")


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if _DTYPES.get(name) != dtype:
        raise ExportError(f"dtype {dtype} cannot be stored in an mdafx file")
    return name


def _encode_out_spec(spec: Any) -> dict[str, Any]:
    if spec.is_leaf():
        return {"kind": "tensor"}
    children = spec.children()
    if not all(child.is_leaf() for child in children):
        raise ExportError(f"nested model outputs are not supported: {spec}")
    if spec.type in (tuple, list):
        return {"kind": spec.type.__name__, "n": len(children)}
    if spec.type is dict and all(isinstance(k, str) and _NAME_RE.match(k) for k in spec.context):
        return {"kind": "dict", "keys": list(spec.context)}
    raise ExportError(f"model output type {spec.type} is not supported (tensor, tuple, list, "
                      f"dict of tensors)")


def _write_tensors(zf: zipfile.ZipFile, tensors: list[_TensorEntry]) -> dict[str, Any]:
    index: dict[str, Any] = {}
    offset = 0
    with zf.open(_TENSORS, "w", force_zip64=True) as out:
        for entry in tensors:
            data = _tensor_bytes(entry)
            out.write(data)
            index[entry.name] = {
                "kind": entry.kind,
                "dtype": _dtype_name(entry.tensor.dtype),
                "shape": list(entry.tensor.shape),
                "offset": offset,
                "nbytes": len(data),
                "requires_grad": bool(entry.tensor.requires_grad),
                "persistent": entry.persistent,
            }
            offset += len(data)
    return {"byteorder": "little", "tensors": index}


def _tensor_bytes(entry: _TensorEntry) -> bytes:
    t = entry.tensor
    dense = t.layout == torch.strided and not t.is_quantized
    if not dense or type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise ExportError(f"tensor {entry.name!r} ({type(t).__name__}, {t.layout}) cannot be "
                          f"stored: dense tensors only")
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover - big-endian hosts
        raise ExportError("mdafx files are little-endian; big-endian hosts are not supported")
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _check_round_trip(model: torch.nn.Module, loaded: LoadedModel,
                      example_input: torch.Tensor, path: Path) -> None:
    inputs = [example_input]
    if example_input.is_floating_point():
        g = torch.Generator().manual_seed(0)
        inputs.append(torch.randn((3, *example_input.shape[1:]), generator=g,
                                  dtype=example_input.dtype))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in inputs:
                want = _flat_outputs(model(x))
                got = _flat_outputs(loaded(x))
                if len(want) != len(got) or not all(
                        a.shape == b.shape and a.dtype == b.dtype
                        and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
                        for a, b in zip(want, got)):
                    raise ExportError(f"{path}: reloaded model does not reproduce "
                                      f"{type(model).__name__} at batch {x.shape[0]}; not written")
    finally:
        model.train(was_training)


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for _, v in sorted(out.items())]
    return list(out)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model read by :func:`load_model`.

    ``module`` is an ATen-level ``torch.fx.GraphModule``; ``metadata`` the saved dict (with
    ``format_version`` and ``mdafx_version``); calling the object checks the input against
    ``input_shape`` (``None`` = any batch size) and ``input_dtype``, then runs ``module``.
    """

    module: torch.fx.GraphModule
    metadata: dict[str, Any]
    input_shape: tuple[int | None, ...]
    input_dtype: torch.dtype
    path: Path

    def __call__(self, x: torch.Tensor) -> Any:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.path}: expected a tensor input, got {type(x).__name__}")
        shape_ok = x.dim() == len(self.input_shape) and all(
            want is None or want == got for want, got in zip(self.input_shape, x.shape))
        if not shape_ok or x.dtype != self.input_dtype:
            want_shape = tuple("B" if d is None else d for d in self.input_shape)
            raise ValueError(f"{self.path}: input {tuple(x.shape)} {x.dtype} does not match the "
                             f"saved input spec {want_shape} {self.input_dtype}")
        return self.module(x)


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read a file written by :func:`save_model`; never unpickles, never imports model code.

    Raises :class:`FormatError` (naming ``path``) for corrupt, truncated, unsafe or
    newer-format files; ``OSError`` if the file cannot be opened.
    """
    path = Path(path)
    with open(path, "rb"):
        pass  # surface missing file / permissions as the usual OSError
    return _read(path, shown_as=path)


class _BatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """A BatchNorm over dim 1 of any rank >= 2 (what ``aten.batch_norm`` accepts)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"batch norm expects an input of rank >= 2, got {input.dim()}")


_NORM_ATTRS = ("weight", "bias", "running_mean", "running_var")


def lift_batch_norms(gm: torch.fx.GraphModule) -> list[str]:
    """Make a loaded model's batch norms follow ``train()``/``eval()`` again; returns the
    qualified names of the norms lifted.

    A loaded graph calls ``aten.batch_norm(x, weight, bias, running_mean, running_var,
    training=False, momentum, eps, cudnn)`` on ``get_attr`` tensors, so training it updates the
    affine weights but never uses batch statistics. Each such call whose four tensors are
    ``<owner>.weight/bias/running_mean/running_var`` of one submodule ``<owner>`` that holds
    nothing else (plus ``num_batches_tracked``) and that no other node reads becomes
    ``call_module(<owner>)`` of a BatchNorm module owning the *same* tensor objects, so the
    state_dict keys and values are unchanged and ``save_model`` (which exports in eval mode)
    writes the same ``training=False`` call back. Other calls are left as they are. In eval mode
    the lifted model computes exactly what the loaded one did.
    """
    lifted = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        x, *tensors = node.args[:5]
        training, momentum, eps = node.args[5:8]
        if training or not all(isinstance(t, torch.fx.Node) and t.op == "get_attr"
                               and len(t.users) == 1 for t in tensors):
            continue
        owners = {t.target.rpartition(".")[0] for t in tensors}
        attrs = [t.target.rpartition(".")[2] for t in tensors]
        if len(owners) != 1 or attrs != list(_NORM_ATTRS):
            continue
        owner = owners.pop()
        if not owner:
            continue
        holder = gm.get_submodule(owner)
        names = set(holder._parameters) | set(holder._buffers)
        if names - {*_NORM_ATTRS, "num_batches_tracked"} or holder._modules:
            continue
        weight, bias, mean, var = (getattr(holder, a) for a in _NORM_ATTRS)
        bn = _BatchNorm(mean.numel(), eps=float(eps), momentum=momentum)
        bn.weight, bn.bias = weight, bias
        bn.running_mean, bn.running_var = mean, var
        if "num_batches_tracked" in holder._buffers:
            bn.num_batches_tracked = holder.num_batches_tracked
        bn.train(gm.training)
        parent, _, leaf = owner.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, bn)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(owner, (x,))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for t in tensors:
            gm.graph.erase_node(t)
        lifted.append(owner)
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted


def _read(path: Path, shown_as: Path) -> LoadedModel:
    try:
        with zipfile.ZipFile(path, "r") as zf:
            header = _read_header(zf, shown_as)
            graph = _read_json(zf, _GRAPH, shown_as)
            index = _read_json(zf, _INDEX, shown_as)
            tensors = _decode_tensors(index, zf.read(_TENSORS), shown_as)
            module, input_shape, input_dtype = _build_module(graph, tensors, shown_as)
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{shown_as}: corrupt or truncated mdafx model file "
                          f"({type(e).__name__}: {e})") from e
    return LoadedModel(module=module, metadata=header["metadata"], input_shape=input_shape,
                       input_dtype=input_dtype, path=shown_as)


def _read_header(zf: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    infos = zf.infolist()
    names = [info.filename for info in infos]
    if _HEADER not in names:
        raise FormatError(f"{path}: not an mdafx model file (no {_HEADER})")
    header = _read_json(zf, _HEADER, path)
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not an mdafx model file (format is "
                          f"{header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("format_version")
    writer = header.get("mdafx_version", "unknown")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise FormatError(f"{path}: written by mdafx {writer}, format v{version}; this mdafx "
                          f"({mdafx_version()}) reads up to v{FORMAT_VERSION}; upgrade mdafx")
    if sorted(names) != sorted(_ENTRIES):
        raise FormatError(f"{path}: unexpected archive entries {sorted(names)}")
    compressed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise FormatError(f"{path}: compressed entries {compressed} (mdafx writes stored entries)")
    if not isinstance(header.get("metadata"), dict):
        raise FormatError(f"{path}: metadata is not a JSON object")
    return header


def _read_json(zf: zipfile.ZipFile, name: str, path: Path) -> Any:
    def refuse_constant(token: str) -> Any:
        raise FormatError(f"{path}: {name}: non-standard JSON constant {token}")

    try:
        return json.loads(zf.read(name).decode("utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: {name} is not valid JSON: {e}") from e


def _decode_tensors(index: Any, blob: bytes, path: Path) -> dict[str, tuple[dict, torch.Tensor]]:
    if not isinstance(index, dict) or index.get("byteorder") != "little":
        raise FormatError(f"{path}: {_INDEX}: missing or unsupported byteorder")
    entries = index.get("tensors")
    if not isinstance(entries, dict):
        raise FormatError(f"{path}: {_INDEX}: 'tensors' is not an object")
    out: dict[str, tuple[dict, torch.Tensor]] = {}
    for name, info in entries.items():
        _check_attr_path(name, path)
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            offset, nbytes = int(info["offset"]), int(info["nbytes"])
            kind = info["kind"]
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: {_INDEX}: bad entry for tensor {name!r}: {e!r}") from e
        if kind not in ("parameter", "buffer", "constant"):
            raise FormatError(f"{path}: tensor {name!r}: unknown kind {kind!r}")
        if any(d < 0 for d in shape):
            raise FormatError(f"{path}: tensor {name!r}: negative size in {shape}")
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes != expected or offset < 0 or offset + nbytes > len(blob):
            raise FormatError(f"{path}: tensor {name!r}: {nbytes} bytes at offset {offset} do not "
                              f"fit shape {shape} {dtype} in a {len(blob)}-byte {_TENSORS}")
        if nbytes == 0:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            raw = bytearray(memoryview(blob)[offset:offset + nbytes])
            tensor = torch.frombuffer(raw, dtype=dtype)
            tensor = tensor.reshape(shape)
        out[name] = (info, tensor)
    return out


def _check_name(name: Any, path: Path) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise FormatError(f"{path}: invalid node name {name!r}")
    return name


def _check_attr_path(target: Any, path: Path) -> str:
    if not isinstance(target, str) or not all(_ATTR_ATOM_RE.match(a) for a in target.split(".")):
        raise FormatError(f"{path}: invalid attribute path {target!r}")
    return target


def _resolve_target(name: Any, path: Path, node_name: str) -> Any:
    if not isinstance(name, str):
        raise FormatError(f"{path}: node {node_name}: invalid call target {name!r}")
    if name in _PY_FUNCTIONS:
        return _PY_FUNCTIONS[name]
    match = _OP_RE.match(name)
    if not match:
        raise FormatError(f"{path}: node {node_name}: call target {name!r} is not an allowed "
                          f"ATen op or symbolic-size function")
    try:
        op = getattr(getattr(torch.ops.aten, match.group(1)), match.group(2))
    except (AttributeError, RuntimeError) as e:
        raise FormatError(f"{path}: node {node_name}: unknown ATen op {name!r} "
                          f"(written by a newer torch?)") from e
    if not isinstance(op, torch._ops.OpOverload):
        raise FormatError(f"{path}: node {node_name}: {name!r} is not an ATen op overload")
    problem = _op_problem(op)
    if problem:
        raise FormatError(f"{path}: node {node_name}: {problem}")
    return op


def _decode_arg(value: Any, env: Mapping[str, torch.fx.Node], path: Path, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if not _STR_LITERAL_RE.match(value):
            raise FormatError(f"{path}: node {where}: string literal {value!r} not allowed")
        return value
    if isinstance(value, list):
        return [_decode_arg(v, env, path, where) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise FormatError(f"{path}: node {where}: invalid argument {value!r}")
    (tag, payload), = value.items()
    if tag == "$node":
        if payload not in env:
            raise FormatError(f"{path}: node {where}: refers to unknown or later node {payload!r}")
        return env[payload]
    if tag == "$tuple" and isinstance(payload, list):
        return tuple(_decode_arg(v, env, path, where) for v in payload)
    if tag == "$dict" and isinstance(payload, list):
        return {_check_name(k, path): _decode_arg(v, env, path, where) for k, v in payload}
    if tag == "$float" and payload in ("inf", "-inf", "nan"):
        return float(payload)
    if tag == "$dtype" and payload in _DTYPES:
        return _DTYPES[payload]
    if tag == "$device" and isinstance(payload, str) and _DEVICE_RE.match(payload):
        return torch.device(payload)
    if tag == "$layout" and payload in _LAYOUTS:
        return _LAYOUTS[payload]
    if tag == "$memory_format" and payload in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[payload]
    raise FormatError(f"{path}: node {where}: invalid argument {value!r}")


def _build_module(graph_json: Any, tensors: Mapping[str, tuple[dict, torch.Tensor]],
                  path: Path) -> tuple[torch.fx.GraphModule, tuple[int | None, ...], torch.dtype]:
    if not isinstance(graph_json, dict) or not isinstance(graph_json.get("nodes"), list):
        raise FormatError(f"{path}: {_GRAPH}: no node list")
    spec = graph_json.get("input")
    try:
        input_dtype = _DTYPES[spec["dtype"]]
        input_shape = tuple(None if d is None else int(d) for d in spec["shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: {_GRAPH}: bad input spec {spec!r}") from e
    if not input_shape or input_shape[0] is not None:
        raise FormatError(f"{path}: {_GRAPH}: input spec {spec!r} has no batch dimension")

    root = torch.nn.Module()
    for name, (info, tensor) in tensors.items():
        owner_path, _, attr = name.rpartition(".")
        owner = _make_submodule(root, owner_path)
        if hasattr(owner, attr):
            raise FormatError(f"{path}: tensor {name!r} clashes with another attribute")
        if info["kind"] == "parameter":
            grad = bool(info.get("requires_grad")) and tensor.is_floating_point()
            owner.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=grad))
        else:
            owner.register_buffer(attr, tensor)

    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    seen_output = False
    placeholders = 0
    for raw in graph_json["nodes"]:
        if not isinstance(raw, dict):
            raise FormatError(f"{path}: {_GRAPH}: node entry is not an object: {raw!r}")
        if seen_output:
            raise FormatError(f"{path}: {_GRAPH}: nodes after the output node")
        op, name = raw.get("op"), _check_name(raw.get("name"), path)
        if name in env:
            raise FormatError(f"{path}: {_GRAPH}: duplicate node name {name!r}")
        if op == "placeholder":
            if name != spec.get("name") or keyword.iskeyword(name) or name == "self":
                raise FormatError(f"{path}: placeholder {name!r} is not a valid declared input")
            placeholders += 1
            node = graph.placeholder(name)
        elif op == "get_attr":
            target = _check_attr_path(raw.get("target"), path)
            if target not in tensors:
                raise FormatError(f"{path}: node {name}: get_attr {target!r} has no tensor")
            node = graph.get_attr(target)
        elif op == "call_function":
            target = _resolve_target(raw.get("target"), path, name)
            args = _decode_arg({"$tuple": raw.get("args")}, env, path, name)
            kwargs_raw = raw.get("kwargs", {})
            if not isinstance(kwargs_raw, dict):
                raise FormatError(f"{path}: node {name}: kwargs is not an object")
            kwargs = {_check_name(k, path): _decode_arg(v, env, path, name)
                      for k, v in kwargs_raw.items()}
            node = graph.call_function(target, args, kwargs)
            module = raw.get("module")
            if isinstance(module, str) and len(module) < 1000:
                node.meta["mdafx.source_module"] = module
        elif op == "output":
            args = _decode_arg({"$tuple": raw.get("args")}, env, path, name)
            if len(args) != 1:
                raise FormatError(f"{path}: output node must have one argument")
            node = graph.output(_restructure_output(args[0], graph_json.get("output"), path))
            seen_output = True
        else:
            raise FormatError(f"{path}: node {name}: unsupported op {op!r}")
        env[name] = node
    if not seen_output or placeholders != 1:
        raise FormatError(f"{path}: {_GRAPH}: graph needs exactly one input and one output")

    gm = torch.fx.GraphModule(root, graph, class_name="MdafxModel")
    # NOTE: GraphModule copies every tensor attribute as a persistent buffer; restore the saved
    # persistence so state_dict() has the same keys as the source model.
    for name, (info, _) in tensors.items():
        if info["kind"] != "parameter" and not info.get("persistent", True):
            owner_path, _, attr = name.rpartition(".")
            with contextlib.suppress(AttributeError):
                gm.get_submodule(owner_path)._non_persistent_buffers_set.add(attr)
    gm.graph.lint()
    gm.eval()
    return gm, input_shape, input_dtype


def _make_submodule(root: torch.nn.Module, owner_path: str) -> torch.nn.Module:
    module = root
    if not owner_path:
        return module
    for atom in owner_path.split("."):
        child = module._modules.get(atom)
        if child is None:
            if hasattr(module, atom):
                raise FormatError(f"attribute path clash at {owner_path!r}")
            child = torch.nn.Module()
            module.add_module(atom, child)
        module = child
    return module


def _restructure_output(flat: Any, out_spec: Any, path: Path) -> Any:
    if not isinstance(flat, (list, tuple)) or not isinstance(out_spec, dict):
        raise FormatError(f"{path}: output spec {out_spec!r} does not match the output node")
    kind = out_spec.get("kind")
    if kind == "tensor" and len(flat) == 1:
        return flat[0]
    if kind in ("tuple", "list") and len(flat) == out_spec.get("n"):
        return tuple(flat) if kind == "tuple" else list(flat)
    keys = out_spec.get("keys")
    if kind == "dict" and isinstance(keys, list) and len(keys) == len(flat):
        return {_check_name(k, path): v for k, v in zip(keys, flat)}
    raise FormatError(f"{path}: output spec {out_spec!r} does not match the output node")
