"""``mdafx info FILE``: what an mdafx file holds, told apart by content (never by its name).

A profile (classes, samples, layers, what it was computed on), a component or assembled model
(classes, source, params, MACs, input format, recipe, calibration; the layout and class map of
an assembled one) or an exported ONNX file (inputs, outputs, opset, metadata). Recorded source
specs are printed as provenance: nothing a file names is imported or run.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a profile, model file or ONNX file")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _fmt(d: dict | None) -> str:
    if not d:
        return "-"
    return (f"{d['size'][0]}x{d['size'][1]}, {d['channels']} channels, mean "
            f"{_text(d['mean'])}, std {_text(d['std'])}")


def _provenance(meta: dict) -> str:
    if not meta.get("model"):
        return "-"
    args = meta.get("model_args") or []
    return (_text(meta["model"]) + (f" {_text(args)}" if args else "")
            + f", weights {_text(meta.get('weights'))} (recorded only, never run)")


def _profile(path: str) -> tuple[dict, list[str]]:
    from mdafx import api

    prof = api.Profile.load(path)
    rec, cal = prof.record, prof.record.get("calibration") or {}
    info = {"kind": "profile", "classes": prof.class_names,
            "samples_per_class": prof.samples_per_class,
            "layers": [{"name": n, "weight_shape": prof.weight_shapes[n],
                        "groups": prof.groups[n]} for n in prof.layers],
            "source": rec.get("source"), "input": rec.get("input"), "data": rec.get("data"),
            "calibration": {k: cal.get(k) for k in ("holdout", "seed", "images")} | {
                "held_out": len(cal.get("indices") or [])} if cal else None}
    lines = [*common.table([[c, n, s] for c, (n, s) in enumerate(
                 zip(prof.class_names, prof.samples_per_class))], ["#", "class", "profiled"]), "",
             *common.table([[layer["name"], "x".join(map(str, layer["weight_shape"])),
                             layer["groups"]] for layer in info["layers"]],
                           ["layer", "weight", "groups"]), "",
             *common.table([["source", _provenance(rec.get("source") or {})],
                            ["input", _fmt(rec.get("input"))], ["data", rec.get("data") or "-"],
                            ["calibration split", f"{len(cal.get('indices') or [])} of "
                             f"{cal.get('images')} images (holdout {cal.get('holdout')}, seed "
                             f"{cal.get('seed')})" if cal else "none (analysed with --holdout 0)"]],
                           ["profile", ""])]
    return info, lines


def _model(path: str) -> tuple[dict, list[str]]:
    from mdafx import api

    model = api.load(path)
    meta, assembled = model.metadata, not isinstance(model, api.Component)
    fmt = model.input_format.to_dict() if assembled else meta.get("input")
    macs = api.count_macs(model.module)
    info = {"kind": "assembled" if assembled else "component", "classes": model.class_names,
            "params": model.params, "macs": macs, "input": fmt,
            "mdafx_version": meta.get("mdafx_version"), "calibration": meta.get("calibration"),
            "finetune": meta.get("finetune")}
    rows = [["kind", info["kind"]], ["classes", ", ".join(model.class_names)]]
    if assembled:
        comps = [c for c in meta.get("components") or [] if isinstance(c, dict)]
        info.update(layout=model.layout, class_map=model.class_map,
                    components=[{"source": c.get("source"), "classes": c.get("class_names")}
                                for c in comps])
        rows += [["layout", model.layout], ["components", "; ".join(
            f"#{k} {_text(c.get('source'))}: {_text(c.get('class_names'))}"
            for k, c in enumerate(comps))]]
    else:
        info.update(source=model.source, source_classes=model.classes,
                    provenance={k: meta.get(k) for k in ("model", "model_args", "weights")},
                    thresholds=meta.get("thresholds"), search=meta.get("search"),
                    params_source=meta.get("params_source"), macs_source=meta.get("macs_source"))
        rows += [["source classes", ", ".join(map(str, model.classes))],
                 ["source", model.source], ["source model", _provenance(meta)],
                 ["thresholds", _text(meta.get("thresholds") or "-")]]
        if meta.get("search"):
            rows.append(["search", _text({k: meta["search"].get(k)
                                          for k in ("scale", "budget", "met")})])
    of_source = {k: meta.get(f"{k}_source") if not assembled and isinstance(
        meta.get(f"{k}_source"), int) else None for k in ("params", "macs")}
    rows += [["params", f"{model.params:,}" + (f" ({model.params / of_source['params']:.1%} "
                                               "of the source)" if of_source["params"] else "")],
             ["MACs", f"{macs:,}" + (f" ({macs / of_source['macs']:.1%} of the source)"
                                     if of_source["macs"] else "")], ["input", _fmt(fmt)]]
    cal = meta.get("calibration")
    if isinstance(cal, dict) and "accuracy" in cal:
        rows.append(["calibration accuracy", f"{common.pct(cal.get('accuracy'))} (source "
                     f"{common.pct(cal.get('source_accuracy'))}) on {cal.get('images')} images"])
    elif isinstance(cal, dict):
        rows.append(["calibration", f"{_text(cal.get('samples'))} samples per component"])
    if isinstance(meta.get("finetune"), dict):
        ft = meta["finetune"]
        rows.append(["fine-tuned", f"{ft.get('epochs')} epochs, {common.pct(ft.get('acc_before'))}"
                                   f" -> {common.pct(ft.get('acc_after'))}"])
    rows.append(["written by", f"mdafx {meta.get('mdafx_version')}"])
    lines = common.table(rows, ["model file", ""])
    if assembled:
        lines += ["", *common.table(
            [[i, e["name"], "; ".join(f"#{s['component']} {s['source']}[{s['source_class']}]"
                                      for s in e["sources"])]
             for i, e in enumerate(model.class_map)], ["output", "class", "sources"])]
    return info, lines


def _onnx(path: str) -> tuple[dict, list[str]]:
    from mdafx import api

    summary = api.artifacts.onnx_summary(path)
    meta = summary["metadata"]
    info = {"kind": "onnx", **summary}
    rows = [[io, v["name"], v["dtype"], "x".join(map(str, v["shape"]))]
            for io in ("inputs", "outputs") for v in summary[io]]
    lines = [*common.table(rows, ["", "name", "type", "shape"]), "",
             *common.table([["opset", summary["opset"]], ["model kind", _text(meta.get("kind"))],
                            ["classes", _text(meta.get("class_names"))],
                            ["written by", f"mdafx {_text(meta.get('mdafx_version'))}"]],
                           ["onnx file", ""])]
    return info, lines


def run(args: argparse.Namespace) -> int:
    common.require_files(input=args.file)
    from mdafx import api  # heavy: only when the command runs (`--help` stays light)

    kind = api.artifacts.file_kind(args.file)
    info, lines = {"profile": _profile, "model": _model, "onnx": _onnx}[kind](args.file)
    common.emit_json(args, {"command": "info", "file": str(args.file), **info})
    common.say(args, *lines)
    common.say(args, f"{args.file}: {info['kind']}, {len(info.get('classes') or [])} classes"
               if kind != "onnx" else f"{args.file}: ONNX, opset {info['opset']}", final=True)
    return common.EXIT_OK
