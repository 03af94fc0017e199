"""``mdafx assemble``: component files -> one assembled model file (MDA §2).

Works from the files alone, in both layouts: nothing a file names is rebuilt or imported.
``--calibrate`` computes the logit scale factors (§2.1) on a calibration split.
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
    p.add_argument("--calibrate", metavar="DIR",
                   help="ImageFolder of a calibration split for logit scaling (MDA 2.1); never "
                        "the test split. Without it logits are not scaled")
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
    factors, calibration = None, None
    if args.calibrate:
        fmt = api.InputFormat.from_dict(comps[0].metadata["input"])
        results, counts = api.calibrate(comps, api.open_images(args.calibrate, fmt),
                                        batch_size=args.batch_size)
        factors = [r.factors for r in results]
        calibration = {"data": str(Path(args.calibrate).resolve()), "samples": counts,
                       "fallbacks": [{c.class_names[int(i)]: why for i, why in r.fallbacks.items()}
                                     for c, r in zip(comps, results)]}
    asm = api.assemble(comps, factors, layout=args.layout)
    api.save(asm, args.output, overwrite=args.force,
             metadata={"calibration": calibration,
                       "component_files": [str(p) for p in args.components]})

    def scale(source: dict) -> float:
        if factors is None:
            return 1.0
        comp = comps[source["component"]]
        return float(factors[source["component"]][comp.classes.index(source["source_class"])])

    rows, classes = [], []
    for i, entry in enumerate(asm.class_map):
        sources = [{**s, "scale": scale(s)} for s in entry["sources"]]
        classes.append({"output": i, "name": entry["name"], "sources": sources})
        rows.append([i, entry["name"],
                     "; ".join(f"#{s['component']} {s['source']}[{s['source_class']}]"
                               for s in sources),
                     ", ".join(f"{s['scale']:.4g}" for s in sources)])
    if calibration is None:
        common.warn("warning: logits not calibrated (no --calibrate): the components' logit "
                    "scales differ")
    else:
        for k, fallbacks in enumerate(calibration["fallbacks"]):
            for name, why in fallbacks.items():
                common.warn(f"warning: component {k} class {name}: {why}")
    common.emit_json(args, {"command": "assemble", "output": str(args.output),
                            "layout": asm.layout, "params": asm.params, "classes": classes,
                            "calibration": calibration, "input": asm.input_format.to_dict()})
    common.say(args, *common.table(rows, ["output", "class", "sources (component source[class])",
                                          "scale"]))
    common.say(args, f"{asm.layout} layout, {len(comps)} components, {asm.params:,} params; "
                     f"wrote {args.output}", final=True)
    return common.EXIT_OK
