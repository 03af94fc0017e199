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


def _get(d: Any, key: str) -> Any:
    """``d[key]`` of a JSON object from a file, None when ``d`` is not one (files are data)."""
    return d.get(key) if isinstance(d, dict) else None


def _fmt(d: Any) -> str:
    if not d:
        return "-"
    try:
        return (f"{d['size'][0]}x{d['size'][1]}, {d['channels']} channels, mean "
                f"{_text(d['mean'])}, std {_text(d['std'])}")
    except (KeyError, TypeError, IndexError):
        return _text(d)


def _sources(entry: Any) -> str:
    """``#0 src[3]; #1 other[0]``: where an assembled class comes from."""
    return "; ".join(f"#{_get(s, 'component')} {_get(s, 'source')}[{_get(s, 'source_class')}]"
                     for s in _get(entry, "sources") or [])


def _provenance(meta: Any) -> str:
    if not _get(meta, "model"):
        return "-"
    args = meta.get("model_args") or []
    return (_text(meta["model"]) + (f" {_text(args)}" if args else "")
            + f", weights {_text(meta.get('weights'))} (recorded only, never run)")


def _profile(info: dict) -> list[str]:
    cal = info["calibration"]
    return [*common.table([[c, n, s] for c, (n, s) in enumerate(
                zip(info["classes"], info["samples_per_class"]))], ["#", "class", "profiled"]),
            "",
            *common.table([[layer["name"], "x".join(map(str, layer["weight_shape"])),
                            layer["groups"]] for layer in info["layers"]],
                          ["layer", "weight", "groups"]), "",
            *common.table([["source", _provenance(info["source"])],
                           ["input", _fmt(info["input"])], ["data", info["data"] or "-"],
                           ["calibration split", f"{cal['held_out']} of {cal['images']} images "
                            f"(holdout {cal['holdout']}, seed {cal['seed']})" if cal else
                            "none (analysed with --holdout 0)"]], ["profile", ""])]


def _calibration_rows(cal: Any, assembled: bool) -> list[list[str]]:
    """What a model file says about its calibration: for a component its and the source's
    accuracy on calibration images; for an assembled model how its branches were made
    comparable (method, images, a head's features) and its accuracy there next to its
    components alone."""
    if not isinstance(cal, dict):
        return [["calibration", "none"]] if assembled else []
    if not assembled:
        return [["calibration accuracy", f"{common.pct(cal.get('accuracy'))} (source "
                 f"{common.pct(cal.get('source_accuracy'))}) on {cal.get('images')} images"]]
    how = _text(cal.get("method"))
    if cal.get("features") is not None:
        how += f" (LDA over {cal.get('features')} features)"
    if cal.get("images") is not None:
        how += f" on {cal.get('images')} images"
    elif cal.get("samples") is not None:
        how += f" on {_text(cal.get('samples'))} samples per component"
    rows = [["calibration", how]]
    if cal.get("accuracy") is not None:
        rows.append(["calibration accuracy", f"{common.pct(cal.get('accuracy'))} (components "
                     f"alone {common.pct(cal.get('components_accuracy'))})"])
    return rows


def _model(info: dict) -> list[str]:
    assembled = info["kind"] == "assembled"
    rows = [["kind", info["kind"]], ["classes", ", ".join(info["classes"])]]
    if assembled:
        rows += [["layout", info["layout"]], ["components", "; ".join(
            f"#{k} {_text(c.get('source'))}: {_text(c.get('classes'))}"
            for k, c in enumerate(info["components"]))]]
    else:
        rows += [["source classes", ", ".join(map(str, info["source_classes"]))],
                 ["source", info["source"]], ["source model", _provenance(info["provenance"])],
                 ["thresholds", _text(info.get("thresholds") or "-")]]
        if info.get("recipe"):
            rows.append(["recipe", _text(info["recipe"])])
        if isinstance(info.get("search"), dict):
            rows.append(["search", _text({k: info["search"].get(k)
                                          for k in ("scale", "budget", "met")})])
    of_source = {k: info.get(f"{k}_source") if isinstance(info.get(f"{k}_source"), int) else None
                 for k in ("params", "macs")}
    params, macs = info["params"], info["macs"]
    rows += [["params", f"{params:,}" + (f" ({params / of_source['params']:.1%} of the source)"
                                         if of_source["params"] else "")],
             ["MACs", f"{macs:,}" + (f" ({macs / of_source['macs']:.1%} of the source)"
                                     if of_source["macs"] else "")], ["input", _fmt(info["input"])]]
    rows += _calibration_rows(info.get("calibration"), assembled)
    if isinstance(info.get("finetune"), dict):
        ft = info["finetune"]
        rows.append(["fine-tuned", f"{ft.get('epochs')} epochs, {common.pct(ft.get('acc_before'))}"
                                   f" -> {common.pct(ft.get('acc_after'))}"])
    rows.append(["written by", f"mdafx {info.get('mdafx_version')}"])
    lines = common.table(rows, ["model file", ""])
    if assembled:
        lines += ["", *common.table([[i, _get(e, "name"), _sources(e)]
                                     for i, e in enumerate(info["class_map"])],
                                    ["output", "class", "sources"])]
    return lines


def _onnx(summary: dict) -> list[str]:
    meta = summary["metadata"]
    rows = [[io, v["name"], v["dtype"], "x".join(map(str, v["shape"]))]
            for io in ("inputs", "outputs") for v in summary[io]]
    lines = [*common.table(rows, ["", "name", "type", "shape"]), "",
             *common.table([["opset", summary["opset"]], ["model kind", _text(meta.get("kind"))],
                            ["classes", _text(meta.get("class_names"))],
                            ["written by", f"mdafx {_text(meta.get('mdafx_version'))}"]],
                           ["onnx file", ""])]
    return lines


def run(args: argparse.Namespace) -> int:
    common.require_files(input=args.file)
    from mdafx import api  # heavy: only when the command runs (`--help` stays light)

    info = api.info(args.file)
    lines = {"profile": _profile, "component": _model, "assembled": _model,
             "onnx": _onnx}[info["kind"]](info)
    common.emit_json(args, {"command": "info", "file": str(args.file), **info})
    common.say(args, *lines)
    common.say(args, f"{args.file}: {info['kind']}, {len(info.get('classes') or [])} classes"
               if info["kind"] != "onnx" else f"{args.file}: ONNX, opset {info['opset']}", final=True)
    return common.EXIT_OK
