"""``mdafx routes``: the decision routes of two classes (MDA §4): per weighted layer, the input
channels each class relies on, shared and exclusive; a table and an SVG picture."""
from __future__ import annotations

import argparse

from mdafx.fileio import write_text  # stdlib only: light

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model(p)
    p.add_argument("--profile", required=True, metavar="FILE", help="profile from 'mdafx analyse'")
    p.add_argument("--classes", required=True, type=common.names, metavar="A,B",
                   help="the two classes to compare (names, or #INDEX)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.svg", help="SVG picture")
    common.add_thresholds(p)
    common.add_force(p)


def run(args: argparse.Namespace) -> int:
    if len(args.classes) != 2:
        raise common.UsageError(f"--classes takes exactly two classes, got {len(args.classes)}")
    common.require_files(weights=args.weights, profile=args.profile)
    common.check_outputs(args, [args.output], [args.profile, args.weights])
    from mdafx import api  # heavy: only when the command runs (`--help` stays light)

    prof = api.Profile.load(args.profile)
    k = len(prof.class_names)
    api.resolve_classes(args.classes, prof.class_names, k)  # before building the model
    gm = common.build_source(args, args.num_classes or k,
                             common.input_format(args, prof.record.get("input")))
    common.check_profile_matches(args, prof, gm)
    routes = api.routes(gm, prof, args.classes, common.thresholds(args))
    a, b = routes.names
    title = f"decision routes of {a} (A) and {b} (B): {common.source_name(args)}"
    write_text(args.output, routes.svg(title), overwrite=args.force)

    rows = routes.table_rows()
    headers = routes.headers()
    common.emit_json(args, {"command": "routes", "output": str(args.output), "classes": [a, b],
                            "thresholds": vars(routes.thresholds),
                            "layers": [dict(zip(["layer", "in_channels", "a", "b", "shared",
                                                 "only_a", "only_b", "neither", "overlap"], r))
                                       for r in rows]})
    shown = [[*r[:-1], None if r[-1] is None else f"{r[-1]:.2f}"] for r in rows]
    common.say(args, *common.table(shown, headers),
               f"channels each class relies on at every weighted layer's input "
               f"(thresholds: {common.thresholds_text(args)})")
    common.say(args, f"wrote {args.output}", final=True)
    return common.EXIT_OK
