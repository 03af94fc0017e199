"""mdafx model files, format v2: a module-level torch.fx graph in a safetensors file.

A file is a valid safetensors file. Its tensors are every parameter and buffer of the model
(non-persistent buffers included) under its qualified name. Its ``__metadata__`` holds
``format`` (``"mdafx-model"``), ``format_version`` (``"2"``), ``mdafx_version``, ``graph`` and
``metadata``. ``graph`` is JSON: the input spec (``[null, C, H, W]`` and dtype), each layer's
type and constructor arguments, each tensor's kind, and the fx nodes. ``metadata`` is the
caller's JSON dict.

What :func:`load_model` guarantees:

* nothing named in the file is imported, unpickled or called unless it is in the fixed tables of
  :mod:`mdafx.rules.storage`. Layer types, call targets and method names are looked up there,
  string literals are enum-like words, node names are identifiers and attribute paths dotted
  ``[A-Za-z0-9_-]`` atoms (fx writes all of them into the Python source it compiles);
* the header is checked before any tensor is allocated: its size (at most 100 MB), the dtypes,
  byte offsets that tile the file exactly, the total tensor bytes (at most ``max_bytes``), and
  an input of at most ``MAX_INPUT_ELEMENTS`` elements;
* each tensor fits the layer that holds it (a layer is built on the meta device from its
  arguments and must receive exactly its own parameters and buffers), and none is missing or
  extra;
* the result is a ``GraphModule`` of real ``torch.nn`` layers whose state_dict has the saved
  keys in the saved order, in eval mode, with ``tensor_meta`` on its nodes for a batch of 1,
  like a freshly traced model;
* every failure is a :class:`~mdafx.errors.FormatError` whose message starts with the path.

What it does not promise: that a crafted file is cheap. Loading runs the graph once on a zeros
batch of 1 to fill in shapes, and a crafted graph can make that run (or any later one) allocate a
lot (``x.repeat(...)``, a large ``interpolate``, ``"a" * n``): the limits bound the file and the
input, not the compute. Nor does it check that the weights are sensible.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import keyword
import math
import operator
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .errors import ExportError, FormatError, PreconditionError
from .fileio import atomic_output
from .ir import eval_mode, propagate_shapes
from .rules import storage

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "RESERVED_METADATA_KEYS", "DEFAULT_MAX_BYTES",
    "MAX_HEADER_BYTES", "MAX_INPUT_ELEMENTS", "LoadedModel", "save_model", "load_model",
]

FORMAT_NAME = "mdafx-model"
FORMAT_VERSION = 2
RESERVED_METADATA_KEYS = ("format_version", "mdafx_version")
MAX_HEADER_BYTES = 100 * 2**20       # safetensors' own limit
_ALIGNMENT = 64                      # bytes: what torch's CPU allocator guarantees
DEFAULT_MAX_BYTES = 8 * 2**30        # total tensor bytes; raise it with load_model(max_bytes=)
MAX_INPUT_ELEMENTS = 2**26           # C·H·W of the declared input (shapes are propagated on it)
MAX_INPUT_DIM = 65536
MAX_INT_LITERAL = 2**31              # integer arguments (sizes, dims, indices) in a stored graph
_ARITHMETIC = frozenset({operator.mul, operator.add, operator.iadd, operator.imul, "mul", "add",
                         "repeat", "expand"})

_HEADER_KEYS = {"format", "format_version", "mdafx_version", "graph", "metadata"}
_ZIP_MAGIC = b"PK\x03\x04"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")
_ATOM_RE = re.compile(r"^[A-Za-z0-9_\-]{1,200}$")  # features.0, block1-0 (fx quotes them)
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|meta)(:[0-9]{1,3})?$")
_MAX_ARG_DEPTH = 32

_DTYPES: dict[str, tuple[torch.dtype, str]] = {  # name in graph JSON -> (dtype, safetensors code)
    "float16": (torch.float16, "F16"), "bfloat16": (torch.bfloat16, "BF16"),
    "float32": (torch.float32, "F32"), "float64": (torch.float64, "F64"),
    "uint8": (torch.uint8, "U8"), "int8": (torch.int8, "I8"), "int16": (torch.int16, "I16"),
    "int32": (torch.int32, "I32"), "int64": (torch.int64, "I64"), "bool": (torch.bool, "BOOL"),
}
_DTYPE_BY_NAME = {name: dtype for name, (dtype, _) in _DTYPES.items()}
_NAME_BY_DTYPE = {dtype: name for name, (dtype, _) in _DTYPES.items()}
_DTYPE_BY_CODE = {code: dtype for dtype, code in _DTYPES.values()}
_CODE_BY_DTYPE = {dtype: code for dtype, code in _DTYPES.values()}
_MEMORY_FORMATS = {name: getattr(torch, name) for name in (
    "contiguous_format", "channels_last", "channels_last_3d", "preserve_format")}
_ENUMS = {"$dtype": _DTYPE_BY_NAME, "$memory_format": _MEMORY_FORMATS,
          "$layout": {"strided": torch.strided}}


def _mdafx_version() -> str:
    """The running mdafx's version, without importing ``mdafx.api``."""
    version = getattr(sys.modules.get("mdafx"), "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("mdafx")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class _Invalid(Exception):
    """A problem with the file being read; :func:`load_model` prefixes the path."""


@dataclass(frozen=True)
class _TensorInfo:
    kind: str  # "parameter" | "buffer"
    persistent: bool
    requires_grad: bool

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "persistent": self.persistent,
                "requires_grad": self.requires_grad}


@dataclass(frozen=True)
class LoadedModel:
    """A model read by :func:`load_model`.

    ``module`` is a module-level ``GraphModule`` in eval mode; ``metadata`` the saved dict plus
    ``format_version`` and ``mdafx_version`` (of the writer); ``input_shape`` has ``None`` for the
    batch dimension. Calling the object checks the input against the spec, then runs ``module``.
    """

    module: fx.GraphModule
    metadata: dict[str, Any]
    input_shape: tuple[int | None, ...]
    input_dtype: torch.dtype
    path: Path

    def __call__(self, x: torch.Tensor) -> Any:
        fits = (isinstance(x, torch.Tensor) and x.dtype == self.input_dtype
                and x.dim() == len(self.input_shape)
                and all(d is None or d == n for d, n in zip(self.input_shape, x.shape)))
        if not fits:
            got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
            want = tuple("B" if d is None else d for d in self.input_shape)
            raise PreconditionError(f"{self.path}: input {got} does not match {want} {self.input_dtype}")
        return self.module(x)


# --------------------------------------------------------------------------------------------
# Shared by save and load: names, input spec, layers, in-place ops
# --------------------------------------------------------------------------------------------

def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return f"invalid name {name!r}"
    if keyword.iskeyword(name) or name == "self":  # fx writes names into Python source
        return f"name {name!r} is reserved in Python"
    return None


def _path_problem(path: Any) -> str | None:
    if not isinstance(path, str) or len(path) > 1000:
        return f"invalid attribute path {path!r}"
    for atom in path.split("."):
        if not _ATOM_RE.match(atom) or keyword.iskeyword(atom) or atom.startswith("__"):
            return f"invalid attribute path {path!r}"
    return None


def _input_problem(shape: Any) -> str | None:
    if not isinstance(shape, (list, tuple)) or not 2 <= len(shape) <= 6 or shape[0] is not None:
        return f"input shape {shape!r} is not [null, dims...] with 1 to 5 dims"
    dims = shape[1:]
    if not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_INPUT_DIM
               for d in dims):
        return f"input shape {shape!r} has a dim outside [1, {MAX_INPUT_DIM}]"
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        return f"input shape {shape!r} exceeds {MAX_INPUT_ELEMENTS} elements per sample"
    return None


def _arg_problem(spec: storage.LayerSpec, args: Mapping[str, Any]) -> str | None:
    if set(args) != set(spec.args):
        return f"{spec.name} takes arguments {sorted(spec.args)}, got {sorted(args)}"
    bad = [f"{k}={v!r}" for k, v in args.items() if not storage.ARG_KINDS[k](v)]
    return f"{spec.name}: invalid arguments {', '.join(bad)}" if bad else None


def _construct_layer(spec: storage.LayerSpec, args: Mapping[str, Any]) -> nn.Module:
    """``spec.type(**args)`` on the meta device: no memory is allocated for its tensors."""
    plain = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    with torch.device("meta"):
        return spec.type(**plain)


def _layer_tensors(layer: nn.Module) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """Relative name -> (shape, kind, persistent) of every parameter and buffer of ``layer``."""
    out = {}
    for owner_name, owner in layer.named_modules(remove_duplicate=False):
        prefix = owner_name + "." if owner_name else ""
        for name, t in _own_tensors(owner):
            info = _info_of(owner, name, t)
            out[prefix + name] = (tuple(t.shape), info.kind, info.persistent)
    return out


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for table in (module._parameters, module._buffers)
            for n, t in table.items() if t is not None]


def _info_of(owner: nn.Module, name: str, t: torch.Tensor) -> _TensorInfo:
    if name in owner._parameters:
        return _TensorInfo("parameter", True, bool(t.requires_grad))
    return _TensorInfo("buffer", name not in owner._non_persistent_buffers_set, False)


def _is_inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    if node.op != "call_function":
        return False
    if node.target in storage.INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
        return True
    try:  # F.relu(x, True): inplace given by position
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature take no inplace flag
        return False
    return bound.arguments.get("inplace") is True


def _aliases_state(value: Any, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``value`` may share memory with a get_attr tensor (parameter or buffer)."""
    while isinstance(value, fx.Node):
        if value.op == "get_attr":
            return True
        is_view = (value.op == "call_function" and value.target in storage.VIEW_FUNCTIONS
                   or value.op == "call_method" and value.target in storage.VIEW_METHODS
                   or _is_inplace(value, modules))
        if not is_view or not value.args:
            return False
        value = value.args[0]
    return False


def _inplace_on_state(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> fx.Node | None:
    for node in graph.nodes:
        if _is_inplace(node, modules):
            target = node.args[0] if node.args else node.kwargs.get("input")
            if _aliases_state(target, modules):
                return node
    return None


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------

def save_model(module: fx.GraphModule, path: str | os.PathLike[str], metadata: Mapping[str, Any],
               example_input: torch.Tensor | None = None, *, overwrite: bool = False,
               check: bool = True) -> Path:
    """Write ``module`` (a module-level fx GraphModule) and ``metadata`` to ``path``.

    The input shape comes from the placeholder's ``tensor_meta`` unless ``example_input`` is
    given. ``metadata`` must be JSON-serialisable; its keys ``format_version`` and
    ``mdafx_version`` are reserved. Raises :class:`ExportError` naming the node (and layer path)
    for what a file cannot hold: a layer type not in ``storage.LAYERS``, a function or method not
    in the tables, a ``get_attr`` that is not a parameter or buffer, tied tensors, an in-place op
    on a parameter or buffer. With ``check`` the written file is loaded again and must give
    bit-identical outputs to ``module`` (eval mode) on the example and on a random batch of 3,
    else ExportError and nothing is written. Writes go through ``atomic_output``.
    """
    if not isinstance(module, fx.GraphModule):
        raise PreconditionError(f"save_model takes a torch.fx.GraphModule (mdafx.ir.trace), "
                        f"got {type(module).__name__}")
    path = Path(path)
    user_json = _metadata_json(metadata)
    input_shape, input_dtype, example = _input_spec(module, example_input)
    graph, tensors = _GraphEncoder(module).encode(input_shape, input_dtype)
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
              "mdafx_version": _mdafx_version(), "graph": _dumps(graph), "metadata": user_json}
    with atomic_output(path, overwrite=overwrite) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
        if check:
            try:
                loaded = _read(tmp, shown_as=path, max_bytes=sys.maxsize)
            except FormatError as e:
                raise ExportError(f"the written file does not load back ({e}); not written") from e
            _check_round_trip(module, loaded, example, path)
    return path


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


def _metadata_json(metadata: Mapping[str, Any]) -> str:
    if not isinstance(metadata, Mapping):
        raise PreconditionError(f"metadata must be a dict, got {type(metadata).__name__}")
    if not all(isinstance(k, str) for k in metadata):
        raise PreconditionError(f"metadata keys must be str, got {list(metadata)!r}")
    reserved = [k for k in RESERVED_METADATA_KEYS if k in metadata]
    if reserved:
        raise PreconditionError(f"metadata keys {reserved} are written by mdafx; do not pass them")
    try:
        return _dumps(dict(metadata))
    except (TypeError, ValueError) as e:
        raise PreconditionError(f"metadata is not JSON-serialisable: {e}") from e


def _input_spec(gm: fx.GraphModule, example: torch.Tensor | None
                ) -> tuple[list[int | None], torch.dtype, torch.Tensor]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or placeholders[0].args:
        raise ExportError(f"an mdafx model takes one tensor input without a default; the graph "
                          f"has placeholders {[n.name for n in placeholders]}")
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() < 2 or example.shape[0] < 1:
            raise PreconditionError("example_input must be a tensor with a batch dim and >= 1 more dim")
        shape, dtype = [None, *example.shape[1:]], example.dtype
    else:
        meta = placeholders[0].meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise ExportError(f"input {placeholders[0].name} has no shape: trace the model with "
                              f"mdafx.ir.trace(model, example) or pass example_input")
        shape, dtype = [None, *meta.shape[1:]], meta.dtype
    problem = _input_problem(shape)
    if problem or dtype not in _NAME_BY_DTYPE:
        raise ExportError(f"cannot store the input spec: {problem or f'input dtype {dtype}'}")
    if example is None:  # the round-trip check runs on it
        size = (1, *shape[1:])
        example = (torch.randn(size, generator=torch.Generator().manual_seed(0), dtype=dtype)
                   if dtype.is_floating_point else torch.zeros(size, dtype=dtype))
    return shape, dtype, example


class _GraphEncoder:
    """Turns a GraphModule into the graph JSON and the name -> tensor dict of the file."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules(remove_duplicate=False))
        self.layers = self._find_layers()
        self.tensors, self.infos = self._collect_tensors()

    def encode(self, input_shape: list[int | None], input_dtype: torch.dtype
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        bad = _inplace_on_state(self.gm.graph, self.modules)
        if bad is not None:
            raise ExportError(f"node {bad.name} ({bad.format_node()}) writes in place into a "
                              f"parameter or buffer; mdafx model files hold pure graphs")
        graph = {
            "input": {"shape": input_shape, "dtype": _NAME_BY_DTYPE[input_dtype]},
            "layers": {p: self._encode_layer(p, m) for p, m in self.layers.items()},
            "tensors": {n: info.to_json() for n, info in self.infos.items()},
            "nodes": [self._encode_node(n) for n in self.gm.graph.nodes],
        }
        return graph, self.tensors

    def _find_layers(self) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {}
        for path, module in self.modules.items():
            inside = any(p in layers for p in _prefixes(path))
            if path and not inside and type(module) in storage.LAYERS:
                layers[path] = module
        return layers

    def _collect_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, _TensorInfo]]:
        tensors, infos, owners = {}, {}, {}
        for path, module in self.modules.items():  # pre-order: state_dict order
            for attr, t in _own_tensors(module):
                name = f"{path}.{attr}" if path else attr
                problem = _path_problem(name)
                if problem:
                    raise ExportError(f"tensor {name!r}: {problem}")
                if t.dtype not in _CODE_BY_DTYPE or t.layout != torch.strided or t.is_quantized:
                    raise ExportError(f"tensor {name!r} ({t.dtype}, {t.layout}) cannot be stored")
                key = t.untyped_storage().data_ptr() if t.numel() else id(t)
                if key in owners:
                    raise ExportError(f"tensors {owners[key]!r} and {name!r} share memory; tied "
                                      f"tensors cannot be stored (clone one of them)")
                owners[key] = name
                tensors[name] = t.detach().to("cpu").contiguous()
                infos[name] = _info_of(module, attr, t)
        return tensors, infos

    def _encode_layer(self, path: str, layer: nn.Module) -> dict[str, Any]:
        spec = storage.LAYERS[type(layer)]
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.read_args(layer).items()}
        problem = _path_problem(path) or _arg_problem(spec, args)
        if problem:
            raise ExportError(f"layer {path!r}: {problem}")
        try:
            rebuilt = _layer_tensors(_construct_layer(spec, args))
        except Exception as e:
            raise ExportError(f"layer {path!r}: {spec.name}(**{args}) fails: {e}") from e
        if rebuilt != _layer_tensors(layer):  # the arguments must rebuild the same tensors
            raise ExportError(f"layer {path!r}: {spec.name}(**{args}) does not rebuild its "
                              f"tensors {_shapes(_layer_tensors(layer))} "
                              f"(got {_shapes(rebuilt)})")
        return {"type": spec.name, "args": args}

    def _encode_node(self, node: fx.Node) -> dict[str, Any]:
        problem = _name_problem(node.name)
        if problem:
            raise ExportError(f"node {node.format_node()}: {problem}")
        out: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op in ("get_attr", "call_module", "call_function", "call_method"):
            out["target"] = self._encode_target(node)
        if node.op != "placeholder":
            out["args"] = [self._encode_arg(a, node) for a in node.args]
        if node.kwargs:
            for key in node.kwargs:
                if _name_problem(key):
                    raise ExportError(f"node {node.format_node()}: keyword {key!r}")
            out["kwargs"] = {k: self._encode_arg(v, node) for k, v in node.kwargs.items()}
        return out

    def _encode_target(self, node: fx.Node) -> str:
        where = f"node {node.name} ({node.format_node()})"
        target = node.target
        if node.op == "get_attr":
            if target not in self.tensors:
                value = _resolve(self.gm, target)
                kind = "a plain tensor attribute: register_buffer it" if isinstance(
                    value, torch.Tensor) else f"a {type(value).__name__}, not a tensor"
                raise ExportError(f"{where}: get_attr {target!r} is {kind}")
        elif node.op == "call_module":
            if target not in self.layers:
                module = self.modules.get(target)
                what = f"{type(module).__module__}.{type(module).__qualname__}"
                raise ExportError(f"{where}: layer {target!r} is a {what}, which an mdafx "
                                  f"model file cannot hold (not in mdafx.rules.storage.LAYERS)")
        elif node.op == "call_function":
            name = storage.FUNCTION_NAMES.get(target)
            if name is None:
                what = f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}"
                raise ExportError(f"{where}: function {what} is not in "
                                  f"mdafx.rules.storage.FUNCTIONS")
            if name == "builtins.getattr" and _getattr_problem(node.args, node.kwargs):
                raise ExportError(f"{where}: {_getattr_problem(node.args, node.kwargs)}")
            return name
        elif target not in storage.METHODS:
            raise ExportError(f"{where}: method {target!r} is not in mdafx.rules.storage.METHODS")
        return target

    def _encode_arg(self, value: Any, node: fx.Node) -> Any:
        if isinstance(value, fx.Node):
            return {"$node": value.name}
        if value is None or isinstance(value, (bool, int)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, str):
            if not storage.WORD_RE.match(value):
                raise ExportError(f"node {node.format_node()}: string {value!r} is not an "
                                  f"enum-like word")
            return value
        if type(value) in (tuple, torch.Size):
            return {"$tuple": [self._encode_arg(v, node) for v in value]}
        if isinstance(value, list):
            return [self._encode_arg(v, node) for v in value]
        if isinstance(value, slice):
            return {"$slice": [self._encode_arg(v, node)
                               for v in (value.start, value.stop, value.step)]}
        if value is Ellipsis:
            return {"$ellipsis": None}
        if isinstance(value, dict) and all(isinstance(k, str) and storage.WORD_RE.match(k)
                                           for k in value):
            return {"$dict": [[k, self._encode_arg(v, node)] for k, v in value.items()]}
        tagged = _encode_enum(value)
        if tagged is None:
            raise ExportError(f"node {node.format_node()}: argument {value!r} "
                              f"({type(value).__name__}) cannot be stored")
        return tagged


def _encode_enum(value: Any) -> dict[str, str] | None:
    if isinstance(value, torch.device) and _DEVICE_RE.match(str(value)):
        return {"$device": str(value)}
    for tag, table in _ENUMS.items():
        for name, member in table.items():
            if value is member:
                return {tag: name}
    return None


def _getattr_problem(args: tuple, kwargs: Mapping[str, Any]) -> str | None:
    if (len(args) != 2 or kwargs or not isinstance(args[0], fx.Node)
            or args[1] not in storage.GETATTR_ATTRIBUTES):
        return (f"getattr may only read {sorted(storage.GETATTR_ATTRIBUTES)} of a node, "
                f"got args {args!r}")
    return None


def _prefixes(path: str) -> list[str]:
    atoms = path.split(".")
    return [".".join(atoms[:i]) for i in range(1, len(atoms))]


def _resolve(root: nn.Module, target: str) -> Any:
    value: Any = root
    for atom in target.split("."):
        value = getattr(value, atom, None)
    return value


def _shapes(tensors: Mapping[str, tuple[tuple[int, ...], str, bool]]) -> dict[str, list[int]]:
    return {name: list(shape) for name, (shape, _, _) in tensors.items()}


def _check_round_trip(module: fx.GraphModule, loaded: LoadedModel, example: torch.Tensor,
                      path: Path) -> None:
    inputs = [example]
    if example.is_floating_point():
        g = torch.Generator().manual_seed(0)
        inputs.append(torch.randn((3, *example.shape[1:]), generator=g, dtype=example.dtype))
    with eval_mode(module), torch.no_grad():
        for x in inputs:
            if not _same_outputs(module(x), loaded.module(x)):
                raise ExportError(f"{path}: the reloaded model does not reproduce the "
                                  f"module bit for bit at batch {x.shape[0]}; not written")


def _same_outputs(want: Any, got: Any) -> bool:
    want_leaves, want_spec = pytree.tree_flatten(want)
    got_leaves, got_spec = pytree.tree_flatten(got)
    return want_spec == got_spec and all(map(_same_leaf, want_leaves, got_leaves))


def _same_leaf(a: Any, b: Any) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return type(a) is type(b) and a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------

def load_model(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> LoadedModel:
    """Read a file written by :func:`save_model`; see the module docstring for the guarantees.

    ``max_bytes`` (default ``DEFAULT_MAX_BYTES``) bounds the total tensor bytes the file may
    declare. Raises :class:`FormatError` (message starting with ``path``) for anything that is
    not a valid, safe v2 file; ``OSError`` if the file cannot be opened.
    """
    path = Path(path)
    with open(path, "rb"):
        pass  # a missing file or a permission problem stays the usual OSError
    return _read(path, shown_as=path, max_bytes=DEFAULT_MAX_BYTES if max_bytes is None
                 else max_bytes)


def _read(path: Path, shown_as: Path, max_bytes: int) -> LoadedModel:
    try:
        return _read_unchecked(path, shown_as, max_bytes)
    except _Invalid as e:
        raise FormatError(f"{shown_as}: {e}") from e.__cause__
    except Exception as e:  # anything else a crafted file provokes is still a bad file
        raise FormatError(f"{shown_as}: corrupt mdafx model file ({type(e).__name__}: {e})") from e


def _read_unchecked(path: Path, shown_as: Path, max_bytes: int) -> LoadedModel:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header_len, header = _read_header(f, size)
    meta = _check_metadata(header.pop("__metadata__", None))
    index = _tensor_index(header, size - 8 - header_len, max_bytes)
    stored = _StoredGraph.parse(_parse_json(meta["graph"], "graph"), index)
    user = _parse_json(meta["metadata"], "metadata")
    if not isinstance(user, dict) or any(k in user for k in RESERVED_METADATA_KEYS):
        raise _Invalid("metadata is not a JSON object without reserved keys")
    tensors = _load_tensors(path, meta, index)
    gm = _build_module(stored, tensors)
    user.update(format_version=FORMAT_VERSION, mdafx_version=meta["mdafx_version"])
    return LoadedModel(module=gm, metadata=user, input_shape=stored.input_shape,
                       input_dtype=stored.input_dtype, path=shown_as)


def _read_header(f: Any, size: int) -> tuple[int, dict[str, Any]]:
    first = f.read(8)
    if first[:4] == _ZIP_MAGIC:
        raise _Invalid("an mdafx model file of format v1 (an exported ATen graph), which this "
                       "mdafx no longer reads; re-make it with `mdafx disassemble` / "
                       "`mdafx assemble` from the source model")
    if len(first) < 8:
        raise _Invalid(f"not an mdafx model file ({size} bytes, too short for a header)")
    header_len = int.from_bytes(first, "little")
    if header_len > MAX_HEADER_BYTES:
        raise _Invalid(f"not an mdafx model file (declared header of {header_len} bytes is over "
                       f"the {MAX_HEADER_BYTES}-byte limit)")
    if 8 + header_len > size:
        raise _Invalid(f"truncated, or not an mdafx model file: the header declares "
                       f"{header_len} bytes but the file has {size - 8} after the length")
    header = _parse_json(f.read(header_len), "safetensors header", not_ours=True)
    if not isinstance(header, dict):
        raise _Invalid("not an mdafx model file (the header is not a JSON object)")
    return header_len, header


def _parse_json(text: str | bytes, what: str, *, not_ours: bool = False) -> Any:
    def refuse_constant(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate keys in {keys[:10]}")
        return dict(pairs)

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=refuse_constant, object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        lead = "not an mdafx model file: " if not_ours else ""
        raise _Invalid(f"{lead}{what} is not valid JSON ({e})") from None


def _check_metadata(meta: Any) -> dict[str, str]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _Invalid(f"not an mdafx model file (a safetensors file without "
                       f"format={FORMAT_NAME!r} metadata)")
    version, writer = meta.get("format_version"), meta.get("mdafx_version")
    if not isinstance(version, str) or not re.fullmatch(r"[0-9]{1,6}", version):
        raise _Invalid(f"invalid format_version {version!r}")
    if int(version) > FORMAT_VERSION:
        raise _Invalid(f"written by mdafx {writer} in format v{version}; this mdafx "
                       f"({_mdafx_version()}) reads up to v{FORMAT_VERSION}; upgrade mdafx")
    if int(version) != FORMAT_VERSION:
        raise _Invalid(f"invalid format_version {version!r} (v1 files are zip archives)")
    if set(meta) != _HEADER_KEYS or not all(isinstance(v, str) for v in meta.values()):
        raise _Invalid(f"metadata keys {sorted(meta)} are not {sorted(_HEADER_KEYS)}")
    if len(writer) > 100:
        raise _Invalid("mdafx_version is over 100 characters")
    return meta


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _tensor_index(header: dict[str, Any], data_size: int, max_bytes: int) -> dict[str, _Entry]:
    """Name -> entry of every tensor, checked so that the entries tile the data exactly."""
    index: dict[str, _Entry] = {}
    total = 0
    for name, raw in header.items():
        problem = _path_problem(name)
        if problem:
            raise _Invalid(f"tensor {str(name)[:200]!r}: {problem}")
        entry = _parse_entry(name, raw)
        total += entry.end - entry.begin
        if total > max_bytes:
            raise _Invalid(f"the tensors declare more than max_bytes={max_bytes} bytes; pass a "
                           f"larger max_bytes to load_model if the file is trusted")
        index[name] = entry
    position = 0
    for name, entry in sorted(index.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise _Invalid(f"tensor {name!r}: bytes {entry.begin}..{entry.end} do not follow "
                           f"the previous tensor (ending at {position})")
        position = entry.end
    if position != data_size:
        raise _Invalid(f"truncated or padded: the tensors declare {position} bytes of data, the "
                       f"file holds {data_size}")
    return index


def _parse_entry(name: str, raw: Any) -> _Entry:
    ok = isinstance(raw, dict) and set(raw) == {"dtype", "shape", "data_offsets"}
    shape, offsets = (raw.get("shape"), raw.get("data_offsets")) if ok else (None, None)
    ok = (ok and isinstance(raw["dtype"], str) and raw["dtype"] in _DTYPE_BY_CODE
          and isinstance(shape, list) and len(shape) <= 8
          and all(_is_count(d) for d in shape) and isinstance(offsets, list)
          and len(offsets) == 2 and all(_is_count(o) for o in offsets))
    if not ok:
        raise _Invalid(f"tensor {name!r}: bad entry {str(raw)[:200]} (dtypes: "
                       f"{sorted(_DTYPE_BY_CODE)})")
    dtype = _DTYPE_BY_CODE[raw["dtype"]]
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise _Invalid(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} {dtype}")
    return _Entry(dtype, tuple(shape), begin, end)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


@dataclass(frozen=True)
class _StoredGraph:
    """The graph JSON, validated (everything but the nodes, which are checked as built)."""

    input_shape: tuple[int | None, ...]
    input_dtype: torch.dtype
    layers: dict[str, tuple[storage.LayerSpec, dict[str, Any]]]
    tensors: dict[str, _TensorInfo]
    nodes: list[Any]

    @classmethod
    def parse(cls, raw: Any, index: Mapping[str, _Entry]) -> _StoredGraph:
        if not isinstance(raw, dict) or set(raw) != {"input", "layers", "tensors", "nodes"}:
            raise _Invalid("graph is not an object with input, layers, tensors and nodes")
        spec = raw["input"]
        if not isinstance(spec, dict) or set(spec) != {"shape", "dtype"}:
            raise _Invalid(f"bad input spec {str(spec)[:200]}")
        problem = _input_problem(spec["shape"])
        if problem or not isinstance(spec["dtype"], str) or spec["dtype"] not in _DTYPE_BY_NAME:
            raise _Invalid(problem or f"unsupported input dtype {spec['dtype']!r}")
        if not isinstance(raw["nodes"], list):
            raise _Invalid("graph nodes are not a list")
        layers = _parse_layers(raw["layers"])
        tensors = _parse_tensors(raw["tensors"], index)
        _check_no_collisions(layers, tensors)
        return cls(tuple(spec["shape"]), _DTYPE_BY_NAME[spec["dtype"]], layers, tensors,
                   raw["nodes"])


def _parse_layers(raw: Any) -> dict[str, tuple[storage.LayerSpec, dict[str, Any]]]:
    if not isinstance(raw, dict):
        raise _Invalid("graph layers are not an object")
    layers = {}
    for path, layer in raw.items():
        problem = _path_problem(path)
        if problem:
            raise _Invalid(f"layer {str(path)[:200]!r}: {problem}")
        if not isinstance(layer, dict) or set(layer) != {"type", "args"}:
            raise _Invalid(f"layer {path!r}: not an object with type and args")
        spec = storage.LAYERS_BY_NAME.get(layer["type"]) if isinstance(layer["type"], str) else None
        if spec is None:
            raise _Invalid(f"layer {path!r}: unknown layer type {str(layer['type'])[:100]!r} "
                           f"(not in mdafx.rules.storage.LAYERS)")
        args = layer["args"]
        problem = _arg_problem(spec, args) if isinstance(args, dict) else "args is not an object"
        if problem:
            raise _Invalid(f"layer {path!r}: {problem}")
        layers[path] = (spec, args)
    return layers


def _parse_tensors(raw: Any, index: Mapping[str, _Entry]) -> dict[str, _TensorInfo]:
    if not isinstance(raw, dict) or set(raw) != set(index):
        names = set(raw) if isinstance(raw, dict) else set()
        raise _Invalid(f"graph tensors and file tensors differ: only in the graph "
                       f"{sorted(names - set(index))[:10]}, only in the file "
                       f"{sorted(set(index) - names)[:10]}")
    tensors = {}
    for name, info in raw.items():
        ok = (isinstance(info, dict) and set(info) == {"kind", "persistent", "requires_grad"}
              and info["kind"] in ("parameter", "buffer")
              and isinstance(info["persistent"], bool) and isinstance(info["requires_grad"], bool))
        # parameters are always persistent; buffers never require grad
        ok = ok and (info["persistent"] if info["kind"] == "parameter"
                     else not info["requires_grad"])
        if not ok:
            raise _Invalid(f"tensor {name!r}: bad info {str(info)[:200]}")
        tensors[name] = _TensorInfo(info["kind"], info["persistent"], info["requires_grad"])
    return tensors


def _check_no_collisions(layers: Mapping[str, Any], tensors: Mapping[str, _TensorInfo]) -> None:
    containers = {p for name in (*layers, *tensors) for p in _prefixes(name)}
    for path in layers:
        if path in tensors or any(p in layers for p in _prefixes(path)):
            raise _Invalid(f"layer {path!r} collides with a tensor or lies inside another layer")
    for name in tensors:
        if name in containers:
            raise _Invalid(f"tensor {name!r} collides with a module path")


def _load_tensors(path: Path, meta: Mapping[str, str],
                  index: Mapping[str, _Entry]) -> dict[str, torch.Tensor]:
    # NOTE: the reference reader parses the header again; comparing it with what was checked
    # above makes sure both describe the same file.
    with safetensors.safe_open(str(path), framework="pt") as f:
        if f.metadata() != meta or set(f.keys()) != set(index):
            raise _Invalid("the file changed while it was read")
        tensors = {}
        for name, entry in index.items():
            t = f.get_tensor(name)
            if t.dtype != entry.dtype or tuple(t.shape) != entry.shape:
                raise _Invalid(f"tensor {name!r}: read as {t.dtype} {tuple(t.shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _Invalid(f"tensor {name!r} holds NaN or infinite values")
            # NOTE: safetensors may hand out views packed back to back (unaligned); BLAS picks
            # its kernels by alignment, so such a weight computes a different last bit than the
            # saved one. A fresh copy (torch aligns to 64 bytes) makes the round trip
            # bit-exact; aligned views are kept as they are (no second copy of the model).
            if t.data_ptr() % _ALIGNMENT:
                t = t.clone(memory_format=torch.contiguous_format)
            tensors[name] = t
    return tensors


# --------------------------------------------------------------------------------------------
# Load: building the GraphModule
# --------------------------------------------------------------------------------------------

def _build_module(stored: _StoredGraph, tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name="MdafxModel")
    builder = _ModuleBuilder(gm, stored.layers)
    for name, info in stored.tensors.items():  # in state_dict order, so children keep theirs
        builder.add_tensor(name, info, tensors[name])
    for path in stored.layers:
        builder.layer(path)
    builder.check_complete()
    gm.graph = _GraphBuilder(stored).build()
    gm.graph.lint()
    modules = dict(gm.named_modules(remove_duplicate=False))
    bad = _inplace_on_state(gm.graph, modules)
    if bad is not None:
        raise _Invalid(f"node {bad.name} writes in place into a parameter or buffer")
    gm.eval()
    example = torch.zeros((1, *stored.input_shape[1:]), dtype=stored.input_dtype)
    try:
        propagate_shapes(gm, example)
    except Exception as e:
        raise _Invalid(f"the graph does not run on an input of shape {tuple(example.shape)}: "
                       f"{type(e).__name__}: {e}") from e
    return gm


class _ModuleBuilder:
    """Builds the module tree: layers from their specs, plain ``nn.Module`` containers."""

    def __init__(self, root: nn.Module, layers: Mapping[str, tuple[storage.LayerSpec, dict]]):
        self.root = root
        self.specs = layers
        self.built: dict[str, nn.Module] = {}

    def layer(self, path: str) -> nn.Module:
        if path not in self.built:
            spec, args = self.specs[path]
            try:
                layer = _construct_layer(spec, args)
            except Exception as e:
                raise _Invalid(f"layer {path!r}: {spec.name}(**{args}) fails: {e}") from e
            parent, _, attr = path.rpartition(".")
            self._attach(self.container(parent), attr, layer, path)
            self.built[path] = layer
        return self.built[path]

    def container(self, path: str) -> nn.Module:
        module = self.root
        for i, atom in enumerate(path.split(".") if path else ()):
            # NOTE: never a layer: no layer lies inside another, and a tensor inside a layer
            # goes to that layer (add_tensor), so containers are plain modules only.
            child = module._modules.get(atom)
            if child is None:
                child = nn.Module()
                self._attach(module, atom, child, ".".join(path.split(".")[:i + 1]))
            module = child
        return module

    def add_tensor(self, name: str, info: _TensorInfo, tensor: torch.Tensor) -> None:
        layer_path = next((p for p in _prefixes(name) if p in self.specs), None)
        if layer_path is None:
            owner_path, _, attr = name.rpartition(".")
            self._register(self.container(owner_path), attr, info, tensor, name)
            return
        layer = self.layer(layer_path)
        spec = self.specs[layer_path][0]
        relative = name[len(layer_path) + 1:]
        expected = _layer_tensors(layer).get(relative)
        if expected is None:
            raise _Invalid(f"tensor {name!r} is extra: layer {layer_path!r} ({spec.name}) has "
                           f"no {relative!r}")
        if (tuple(tensor.shape), info.kind, info.persistent) != expected:
            raise _Invalid(f"tensor {name!r} ({info.kind}, shape {list(tensor.shape)}) does not "
                           f"fit layer {layer_path!r} ({spec.name}), which expects a "
                           f"{expected[1]} of shape {list(expected[0])}")
        owner_path, _, attr = relative.rpartition(".")
        owner = layer.get_submodule(owner_path)
        if info.kind == "parameter":
            owner._parameters[attr] = _parameter(tensor, info, name)
        else:
            owner._buffers[attr] = tensor

    def check_complete(self) -> None:
        for path, layer in self.built.items():
            missing = [n for n, t in _named_tensors(layer) if t.is_meta]
            if missing:
                raise _Invalid(f"layer {path!r} ({self.specs[path][0].name}): tensors "
                               f"{[f'{path}.{n}' for n in missing]} are missing from the file")

    def _register(self, owner: nn.Module, attr: str, info: _TensorInfo, tensor: torch.Tensor,
                  name: str) -> None:
        value = _parameter(tensor, info, name) if info.kind == "parameter" else tensor
        try:
            if info.kind == "parameter":
                owner.register_parameter(attr, value)
            else:
                owner.register_buffer(attr, value, persistent=info.persistent)
        except (KeyError, TypeError) as e:  # an existing attribute: "training", "forward", ...
            raise _Invalid(f"tensor {name!r} cannot be registered: {e}") from e

    @staticmethod
    def _attach(parent: nn.Module, atom: str, child: nn.Module, path: str) -> None:
        try:
            parent.add_module(atom, child)
        except (KeyError, TypeError) as e:  # an existing attribute: "training", "graph", ...
            raise _Invalid(f"module path {path!r} collides with an attribute: {e}") from e


def _parameter(tensor: torch.Tensor, info: _TensorInfo, name: str) -> nn.Parameter:
    try:
        return nn.Parameter(tensor, requires_grad=info.requires_grad)
    except RuntimeError as e:  # requires_grad on an integer tensor
        raise _Invalid(f"tensor {name!r}: {e}") from e


def _named_tensors(layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*layer.named_parameters(remove_duplicate=False),
            *layer.named_buffers(remove_duplicate=False)]


class _GraphBuilder:
    """Builds the fx Graph node by node; every target comes from the fixed tables."""

    def __init__(self, stored: _StoredGraph) -> None:
        self.stored = stored
        self.graph = fx.Graph()
        self.env: dict[str, fx.Node] = {}
        self.done = False

    def build(self) -> fx.Graph:
        for raw in self.stored.nodes:
            if self.done:
                raise _Invalid("nodes after the output node")
            self._add(raw)
        if not self.done:
            raise _Invalid("the graph has no output node")
        return self.graph

    def _add(self, raw: Any) -> None:
        if not isinstance(raw, dict) or not set(raw) <= {"op", "name", "target", "args", "kwargs"}:
            raise _Invalid(f"bad node {str(raw)[:200]}")
        name, op = raw.get("name"), raw.get("op")
        problem = _name_problem(name) or (f"duplicate node name {name!r}" if name in self.env
                                          else None)
        if problem:
            raise _Invalid(f"node {str(name)[:100]!r}: {problem}")
        if (op == "placeholder") != (not self.env):
            raise _Invalid(f"node {name}: the one placeholder must be the first node")
        where = f"node {name}"
        target = self._target(op, raw.get("target"), raw, where)
        if op == "placeholder" and ("args" in raw or "kwargs" in raw):
            raise _Invalid(f"{where}: the placeholder takes no arguments")
        args = self._decode(raw.get("args", []), where, 0)
        kwargs = self._kwargs(raw.get("kwargs", {}), where)
        if not isinstance(args, list):
            raise _Invalid(f"{where}: args is not a list")
        if op == "output":
            if len(args) != 1 or kwargs:
                raise _Invalid(f"{where}: the output node takes one argument")
            self.done = True
        if target is getattr and _getattr_problem(tuple(args), kwargs):
            raise _Invalid(f"{where}: {_getattr_problem(tuple(args), kwargs)}")
        if op in ("call_function", "call_method") and any(
                isinstance(a, str) for a in args[:2]) and target is not getattr:
            # a string operand of an arithmetic op only repeats strings (memory, never a model)
            if target in _ARITHMETIC:
                raise _Invalid(f"{where}: a string operand of {str(raw.get('target'))[:60]}")
        self.env[name] = self.graph.create_node(op, target, tuple(args), kwargs, name=name)

    def _target(self, op: Any, target: Any, raw: Mapping[str, Any], where: str) -> Any:
        if op == "placeholder" or op == "output":
            return raw["name"] if op == "placeholder" else "output"
        known = isinstance(target, str)
        if op == "get_attr" and known and target in self.stored.tensors:
            return target
        if op == "call_module" and known and target in self.stored.layers:
            return target
        if op == "call_method" and known and target in storage.METHODS:
            return target
        if op == "call_function" and known and target in storage.FUNCTIONS:
            return storage.FUNCTIONS[target]
        table = {"get_attr": "a tensor of the file", "call_module": "a layer of the file",
                 "call_method": "mdafx.rules.storage.METHODS",
                 "call_function": "mdafx.rules.storage.FUNCTIONS"}.get(op)
        if table is None:
            raise _Invalid(f"{where}: unknown op {str(op)[:100]!r}")
        raise _Invalid(f"{where}: {op} target {str(target)[:100]!r} is not in {table}")

    def _kwargs(self, raw: Any, where: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise _Invalid(f"{where}: kwargs is not an object")
        for key in raw:
            if _name_problem(key):
                raise _Invalid(f"{where}: keyword {key[:100]!r}: {_name_problem(key)}")
        return {k: self._decode(v, where, 0) for k, v in raw.items()}

    def _decode(self, value: Any, where: str, depth: int) -> Any:
        if depth > _MAX_ARG_DEPTH:
            raise _Invalid(f"{where}: arguments nested deeper than {_MAX_ARG_DEPTH}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_LITERAL:
            raise _Invalid(f"{where}: integer literal {value} out of range "
                           f"(|n| <= {MAX_INT_LITERAL})")
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, str):
            if not storage.WORD_RE.match(value):
                raise _Invalid(f"{where}: string {value[:100]!r} is not an enum-like word")
            return value
        if isinstance(value, list):
            return [self._decode(v, where, depth + 1) for v in value]
        if not isinstance(value, dict) or len(value) != 1:
            raise _Invalid(f"{where}: invalid argument {str(value)[:200]}")
        (tag, payload), = value.items()
        return self._decode_tagged(tag, payload, where, depth)

    def _decode_tagged(self, tag: str, payload: Any, where: str, depth: int) -> Any:
        if tag == "$node":
            if not isinstance(payload, str) or payload not in self.env:
                raise _Invalid(f"{where}: refers to {str(payload)[:100]!r}, which is not an "
                               f"earlier node")
            return self.env[payload]
        if tag in ("$tuple", "$slice", "$dict") and isinstance(payload, list):
            items = [self._decode(v, where, depth + 1) for v in payload]
            if tag == "$tuple":
                return tuple(items)
            if tag == "$slice" and len(items) == 3:
                return slice(*items)
            if tag == "$dict" and all(isinstance(i, list) and len(i) == 2
                                      and isinstance(i[0], str) for i in items):
                return dict(items)  # keys are words: _decode checked them as strings
        if tag == "$ellipsis" and payload is None:
            return Ellipsis
        if tag == "$float" and payload in ("inf", "-inf", "nan"):
            return float(payload)
        if tag in _ENUMS and isinstance(payload, str) and payload in _ENUMS[tag]:
            return _ENUMS[tag][payload]
        if tag == "$device" and isinstance(payload, str) and _DEVICE_RE.match(payload):
            return torch.device(payload)
        raise _Invalid(f"{where}: invalid argument {{{str(tag)[:50]!r}: {str(payload)[:100]}}}")
