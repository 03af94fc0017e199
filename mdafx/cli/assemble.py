"""``mdafx assemble``: component files -> one assembled model file (MDA §2).

Works from the files alone, in both layouts: nothing a file names is rebuilt or imported.
``--calibrate`` makes the branches comparable on a calibration split
(``mdafx.assembly.fit_calibration``): ``--calibration head`` (default) fits one closed-form
linear head over the features of every component on images of *all* the assembled classes,
``joint`` a factor and an offset per logit on the same images, ``mda`` MDA §2.1's factors on each
component's own classes. With calibration images the assembled model is scored per class next to
its components alone; a class it never predicts, or a large drop, is a warning (an error with
``--strict``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("components", nargs="+", metavar="COMPONENT",
                   help="component (or assembled) model files, at least two")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="model file to write")
    p.add_argument("--layout", choices=("parallel", "merged"), default="parallel",
                   help="parallel branches (any architectures; default) or one merged network "
                        "(isomorphic components with one input format)")
    common.add_calibration(p)
    p.add_argument("--strict", action="store_true",
                   help="a guard-rail warning (a class never predicted, a large drop) is an "
                        "error and nothing is written")
    p.add_argument("--batch-size", type=common.positive_int, default=256, metavar="N")
    common.add_force(p)


def run(args: argparse.Namespace) -> int:
    if len(args.components) < 2:
        raise common.UsageError("assembling needs at least two component files")
    common.require_files(component=args.components)
    common.require_dirs(calibration=args.calibrate)
    common.check_outputs(args, [args.output], [*args.components, args.calibrate])
    from mdafx import api  # heavy: only when the command runs (`--help` stays light)

    comps = [api.load_component(p) for p in args.components]
    calibration, data = common.calibration(args, comps, args.batch_size)
    record, report = None, None
    asm = api.assemble(comps, calibration, layout=args.layout)
    if args.calibrate:
        report = api.guard_assembled(asm, comps, data, batch_size=args.batch_size)
        for w in report.warnings:
            common.warn(f"warning: {w}")
        if report.warnings and args.strict:
            raise common.CliError(f"{report.warnings[0]}; nothing written (--strict)")
        record = {**calibration.record, "data": str(Path(args.calibrate).resolve()),
                  "accuracy": report.accuracy, "components_accuracy": report.source_accuracy}
    api.save(asm, args.output, overwrite=args.force,
             metadata={"calibration": record,
                       "component_files": [str(p) for p in args.components]})

    def scale(source: dict) -> float | None:
        """The factor of a source logit; None where a feature head replaced the logits."""
        if calibration is None:
            return 1.0
        if calibration.factors is None:
            return None
        k = source["component"]
        return float(calibration.factors[k][comps[k].classes.index(source["source_class"])])

    rows, classes = [], []
    for i, entry in enumerate(asm.class_map):
        sources = [{**s, "scale": scale(s)} for s in entry["sources"]]
        classes.append({"output": i, "name": entry["name"], "sources": sources})
        rows.append([i, entry["name"],
                     "; ".join(f"#{s['component']} {s['source']}[{s['source_class']}]"
                               for s in sources),
                     ", ".join("head" if s["scale"] is None else f"{s['scale']:.4g}"
                               for s in sources)])
    if calibration is None:
        common.warn("warning: logits not calibrated (no --calibrate): the components' logit "
                    "scales differ")
    else:
        for k, fallbacks in enumerate(calibration.record.get("fallbacks") or []):
            for name, why in fallbacks.items():
                common.warn(f"warning: component {k} class {name}: {why}")
    common.emit_json(args, {"command": "assemble", "output": str(args.output),
                            "layout": asm.layout, "params": asm.params, "classes": classes,
                            "calibration": record, "input": asm.input_format.to_dict(),
                            "per_class": None if report is None else report.to_dict()})
    common.say(args, *common.table(rows, ["output", "class", "sources (component source[class])",
                                          "scale (or head)"]))
    if report is not None:
        common.say(args, "", f"on {report.images} calibration images, per class:",
                   *common.table(report.rows(), ["class", "images", "assembled",
                                                 "component alone", "delta pts"]))
    common.say(args, f"{asm.layout} layout, {len(comps)} components, {asm.params:,} params; "
                     f"wrote {args.output}", final=True)
    return common.EXIT_OK
