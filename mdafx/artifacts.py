"""Component and assembled-model files: the objects behind ``mdafx.modelfile`` files.

A component file holds the component's module-level graph and weights (``mdafx.modelfile``) and
metadata: ``kind: "component"``, the source's name, the task's class indices and names, the input
format its source was trained on, the recipe that cut it (thresholds, recovery steps), params,
MACs, calibration accuracy. An assembled file: ``kind: "assembled"``, its layout, class names and
class map, the input format, and every component's metadata. Provenance (the source model's spec
and weights path) is recorded for people to read; nothing in a file is ever imported or run, and
every later step (merged assembly, fine-tuning, export) works from the file alone.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from .assembly import Assembled
from .data import InputFormat
from .disassembly import Component
from .errors import FormatError
from .fileio import describe_os_error
from .ir import shape_of
from .modelfile import (FORMAT_NAME, MAX_HEADER_BYTES, RESERVED_METADATA_KEYS, LoadedModel,
                        load_model, save_model)
from .profiling import PROFILE_FORMAT

__all__ = ["file_kind", "load", "load_component", "onnx_summary", "save"]

KINDS = ("component", "assembled")


def save(model: Component | Assembled, path: str | os.PathLike, *, overwrite: bool = False,
         metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` with its metadata (plus ``metadata``) to ``path`` atomically."""
    kind = "assembled" if isinstance(model, Assembled) else "component"
    meta = {**model.metadata, **(metadata or {}), "kind": kind}
    for key in RESERVED_METADATA_KEYS:  # a loaded model's: the writer records its own
        meta.pop(key, None)
    if isinstance(model, Component):
        meta.update(classes=list(model.classes), class_names=list(model.class_names),
                    source=model.source)
    return save_model(model.module, path, meta, overwrite=overwrite)


def _class_names(loaded: LoadedModel) -> list[str]:
    names = loaded.metadata.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FormatError(f"{loaded.path}: not an mdafx component (its metadata has no class "
                          "names)")
    if len(set(names)) != len(names):
        raise FormatError(f"{loaded.path}: its class names repeat a class: {names}")
    width = _output_width(loaded)
    if width is not None and width != len(names):
        raise FormatError(f"{loaded.path}: the model outputs {width} logits but its metadata "
                          f"names {len(names)} classes")
    return names


def _output_width(loaded: LoadedModel) -> int | None:
    out = next(n for n in loaded.module.graph.nodes if n.op == "output").args[0]
    shape = shape_of(out) if hasattr(out, "meta") else None
    if shape is None or len(shape) != 2:
        raise FormatError(f"{loaded.path}: the model's output is not [batch, classes] logits")
    return shape[1]


def load(path: str | os.PathLike, *, max_bytes: int | None = None) -> Component | Assembled:
    """The Component or Assembled model stored at ``path`` (by its metadata's ``kind``)."""
    loaded = load_model(path, max_bytes=max_bytes)
    meta = loaded.metadata
    names = _class_names(loaded)
    kind = meta.get("kind", "component")
    if kind not in KINDS:
        raise FormatError(f"{loaded.path}: unknown kind {kind!r} (expected one of {KINDS})")
    fmt = _input_format(loaded)
    if kind == "assembled":
        return Assembled(loaded.module, names, list(meta.get("class_map") or []), fmt,
                         str(meta.get("layout", "parallel")), meta)
    classes = meta.get("classes", list(range(len(names))))
    if (not isinstance(classes, list) or len(classes) != len(names)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                       for c in classes)):
        raise FormatError(f"{loaded.path}: its class indices {classes!r} do not fit its "
                          f"{len(names)} class names")
    return Component(loaded.module, list(classes), names,
                     str(meta.get("source") or Path(path).stem), (1, *loaded.input_shape[1:]),
                     {**meta, "input": fmt.to_dict()})


def load_component(path: str | os.PathLike) -> Component:
    """A file as a Component, for assembling: an assembled file becomes a component whose
    classes are its outputs."""
    model = load(path)
    if isinstance(model, Component):
        return model
    return Component(model.module, list(range(len(model.class_names))), model.class_names,
                     Path(path).stem, (1, model.input_format.channels, *model.input_format.size),
                     {**model.metadata, "input": model.input_format.to_dict()})


def _input_format(loaded: LoadedModel) -> InputFormat:
    raw = loaded.metadata.get("input")
    shape = loaded.input_shape
    try:
        fmt = InputFormat.from_dict(raw) if raw else InputFormat(
            (int(shape[2]), int(shape[3])), int(shape[1]), (0.0,) * int(shape[1]),
            (1.0,) * int(shape[1]))
    except Exception as e:
        raise FormatError(f"{loaded.path}: bad input format in its metadata: {e}") from e
    if (fmt.channels, *fmt.size) != tuple(shape[1:]):
        raise FormatError(f"{loaded.path}: its metadata's input format {fmt.to_dict()} does not "
                          f"match the graph's input {tuple(shape[1:])}")
    return fmt


def file_kind(path: str | os.PathLike) -> str:
    """What the file at ``path`` is, told by its content (never its name): ``"profile"``,
    ``"model"`` (a component or assembled model) or ``"onnx"``. A v1 model file (a zip holding
    ``mdafx.json``) is a ``"model"``, for ``load_model`` to refuse with its own message;
    anything else is a FormatError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            raw = f.read(n) if 0 < n <= min(MAX_HEADER_BYTES, size - 8) else b""
        if head[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(path) as z:
                if "mdafx.json" in z.namelist():  # a v1 model file: load_model says so
                    return "model"
            raise FormatError(f"{path}: a zip archive: a torch.save file, or an mdafx profile "
                              "of the previous format, which this mdafx no longer reads (run "
                              "`mdafx analyse` again)")
    except zipfile.BadZipFile:
        raise FormatError(f"{path}: not an mdafx file (a damaged zip archive)") from None
    except OSError as e:
        raise FormatError(describe_os_error(e, path)) from e
    if raw[:1] == b"{":  # a safetensors header: its format says whose file it is
        try:
            meta = json.loads(raw.decode("utf-8")).get("__metadata__") or {}
        except (UnicodeDecodeError, ValueError, AttributeError):
            meta = {}
        kinds = {PROFILE_FORMAT: "profile", FORMAT_NAME: "model"}
        if isinstance(meta, dict) and meta.get("format") in kinds:
            return kinds[meta["format"]]
        raise FormatError(f"{path}: a safetensors file, but neither an mdafx profile nor an "
                          "mdafx model file")
    if head[:1] == b"\x08":  # an ONNX ModelProto starts with field 1, ir_version (a varint)
        return "onnx"
    raise FormatError(f"{path}: not an mdafx profile, model file or ONNX file")


def onnx_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The opset, inputs and outputs (name, element type, shape with ``batch`` for a dynamic
    axis) and metadata of an ONNX file; a FormatError when it does not parse."""
    import onnx

    from .deployment import read_onnx_metadata

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise FormatError(f"{path}: not a readable ONNX file ({type(e).__name__}: "
                          f"{str(e)[:200]})") from e

    def values(infos):
        out = []
        for v in infos:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type),
                        "shape": dims})
        return out

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "ir_version": proto.ir_version, "inputs": values(proto.graph.input),
            "outputs": values(proto.graph.output), "metadata": read_onnx_metadata(path)}
