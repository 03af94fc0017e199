"""``mdafx inspect``: one dump per pass of a pipeline run, into ``DIR/<name>/``.

* ``inspect --model ... -o DIR [--profile P --task A,B | --density F]``: the disassembly
  pipeline of a source model (no pass at all without a task or density);
* ``inspect C1.mdafx C2.mdafx ... -o DIR [--layout merged] [--calibrate DIR [--calibration
  head|joint|mda]]``: the assembly pipeline, with the calibration ``assemble`` would fit;
* ``inspect ONE.mdafx -o DIR``: that file's graph.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="MODEL_FILE",
                   help="one model file (its graph) or several components (their assembly)")
    common.add_model(p, required=False, title="source model (instead of model files)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="dump directory (files go to DIR/<name>/)")
    p.add_argument("--name", metavar="NAME",
                   help="dump sub-folder (default: the weights file stem, model or file name)")
    p.add_argument("--profile", metavar="FILE", help="profile, to disassemble --task")
    p.add_argument("--task", type=common.names, metavar="A,B,...", help="task to disassemble")
    p.add_argument("--density", type=common.unit_interval, metavar="F",
                   help="without a task: keep a random share F of the channel groups")
    p.add_argument("--seed", type=common.seed, default=0, help="seed of --density (default 0)")
    p.add_argument("--layout", choices=("parallel", "merged"), default="parallel",
                   help="with several model files: the assembly layout (default parallel)")
    common.add_calibration(p)
    p.add_argument("--verify", action="store_true", help="lint and run the graph after each pass")
    common.add_thresholds(p)
    common.add_force(p)


def _usage(args: argparse.Namespace) -> None:
    if bool(args.files) == (args.model is not None):
        raise common.UsageError("give model files or --model, not both and not neither")
    if args.files and (common.model_given(args) or args.profile or args.task
                       or args.density is not None):
        raise common.UsageError("--profile/--task/--density and the model flags go with --model")
    if args.calibrate and len(args.files) < 2:
        raise common.UsageError("--calibrate goes with several component files (an assembly)")
    if args.task and not args.profile:
        raise common.UsageError("--task needs --profile")
    if args.task and args.density is not None:
        raise common.UsageError("give --task or --density, not both")


def run(args: argparse.Namespace) -> int:
    _usage(args)
    common.require_files(model_file=args.files, weights=args.weights, profile=args.profile)
    common.require_dirs(calibration=args.calibrate)
    if args.files:
        default = Path(args.files[0]).stem if len(args.files) == 1 else "assembly"
    else:
        default = common.source_name(args)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.name or default).strip("._") or "model"
    target = Path(args.output) / name
    common.check_output_dir(args, target)
    from mdafx import api  # heavy: only when the command runs (`--help` stays light)

    if len(args.files) > 1:
        comps = [api.load_component(f) for f in args.files]
        report = api.inspect(comps, args.output, name=name, layout=args.layout,
                             calibration=common.calibration(args, comps)[0], verify=args.verify)
    elif args.files:
        report = api.inspect(api.load(args.files[0]), args.output, name=name,
                             verify=args.verify)
    elif args.profile:
        prof = api.Profile.load(args.profile)
        k = len(prof.class_names)
        gm = common.build_source(args, args.num_classes or k,
                                 common.input_format(args, prof.record.get("input")))
        common.check_profile_matches(args, prof, gm)
        _say_barriers(args, gm)
        report = api.inspect(gm, args.output, name=name, profile=prof, task=args.task,
                             thresholds=common.thresholds(args), verify=args.verify)
    else:
        gm = common.build_source(args, args.num_classes, common.input_format(args))
        _say_barriers(args, gm)
        report = api.inspect(gm, args.output, name=name, density=args.density, seed=args.seed,
                             verify=args.verify)
    common.emit_json(args, {"command": "inspect", "what": report.what,
                            "directory": str(target), "files": [str(p) for p in report.written],
                            "notes": report.notes})
    common.say(args, f"{report.what}:", *[f"  {p}" for p in report.written])
    for note in report.notes:
        if note.startswith("warning"):
            common.warn(note)
        else:
            common.say(args, note)
    if report.timing:
        common.say(args, *common.lines_of(report.timing))
    common.say(args, f"wrote {len(report.written)} dump file(s) to {target}", final=True)
    return common.EXIT_OK


def _say_barriers(args, gm) -> None:
    """A source model: its prunable share and top barriers, a warning when little is prunable."""
    from mdafx import api
    from mdafx.passes.channel_groups import barrier_report

    report = barrier_report(gm, api.channel_groups(gm))
    common.say(args, *report.lines())
    if report.warning():
        common.warn(report.warning())
