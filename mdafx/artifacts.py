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
from .deployment import read_onnx_metadata
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
        _check_class_map(loaded, names)
        return Assembled(loaded.module, names, list(meta["class_map"]), fmt,
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


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_class_map(loaded: LoadedModel, names: list[str]) -> None:
    """An assembled file's class map names each output and its sources consistently."""
    meta = loaded.metadata
    comps, cmap = meta.get("components"), meta.get("class_map")
    ok = isinstance(comps, list) and all(isinstance(c, dict) for c in comps) and \
        isinstance(cmap, list) and len(cmap) == len(names)
    for entry, name in zip(cmap if ok else [], names):
        sources = entry.get("sources") if isinstance(entry, dict) else None
        ok = ok and entry.get("name") == name and isinstance(sources, list) and bool(sources) \
            and all(isinstance(e, dict) and _is_index(e.get("component"))
                    and e["component"] < len(comps) and _is_index(e.get("source_class"))
                    for e in sources)
    if not ok:
        raise FormatError(f"{loaded.path}: an assembled model whose class map does not match "
                          "its classes and components")


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
    if not raw and 0 < n <= MAX_HEADER_BYTES and n > size - 8 and head[:1] != b"\x08":
        raise FormatError(f"{path}: truncated, or not an mdafx file: its header declares {n} "
                          f"bytes but the file has {size - 8} after the length")
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
    """The opset, inputs and outputs (name, element type, shape: a dynamic axis by its name)
    and metadata of an ONNX file; a FormatError when it does not parse."""
    import onnx

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


def info(path: str | os.PathLike) -> dict[str, Any]:
    """What an mdafx file holds (the ``info`` command), told apart by content: for a profile
    its classes, samples, layers and record; for a component or assembled model its classes,
    params, MACs, input format, recipe and calibration (layout, class map and components of an
    assembled one); for an ONNX file its opset, inputs, outputs and metadata. Recorded source
    specs are provenance only: nothing a file names is imported or run."""
    from .ir import count_macs
    from .profiling import Profile

    kind = file_kind(path)
    if kind == "onnx":
        return {"kind": "onnx", **onnx_summary(path)}
    if kind == "profile":
        prof = Profile.load(path)
        rec = prof.record
        cal = rec.get("calibration") if isinstance(rec.get("calibration"), dict) else None
        return {"kind": "profile", "classes": prof.class_names,
                "samples_per_class": prof.samples_per_class,
                "layers": [{"name": n, "weight_shape": prof.weight_shapes[n],
                            "groups": prof.groups[n]} for n in prof.layers],
                "source": rec.get("source"), "input": rec.get("input"), "data": rec.get("data"),
                "calibration": None if cal is None else {
                    **{k: cal.get(k) for k in ("holdout", "seed", "images")},
                    "held_out": len(cal.get("indices") or [])}}
    model = load(path)
    meta = model.metadata
    assembled = isinstance(model, Assembled)
    out = {"kind": "assembled" if assembled else "component", "classes": model.class_names,
           "params": model.params, "macs": count_macs(model.module),
           "input": model.input_format.to_dict() if assembled else meta.get("input"),
           "mdafx_version": meta.get("mdafx_version"), "calibration": meta.get("calibration"),
           "finetune": meta.get("finetune")}
    if assembled:
        comps = [c for c in meta.get("components") or [] if isinstance(c, dict)]
        out.update(layout=model.layout, class_map=model.class_map,
                   components=[{"source": c.get("source"), "classes": c.get("class_names")}
                               for c in comps])
    else:
        out.update(source=model.source, source_classes=model.classes,
                   provenance={k: meta.get(k) for k in ("model", "model_args", "weights")},
                   thresholds=meta.get("thresholds"), recipe=meta.get("recipe"),
                   search=meta.get("search"),
                   params_source=meta.get("params_source"), macs_source=meta.get("macs_source"))
    return out
