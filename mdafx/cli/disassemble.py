"""``mdafx disassemble``: a profiled model and tasks -> one component file per task.

By a recipe (``--recipe``, ``mdafx.recipes.RECIPES``): ``default`` searches the thresholds for
the best component within 50% of the source's MACs (the largest candidate unless a smaller one
scores significantly higher, ``mdafx.search``), every candidate refitted in closed form on the
profile's calibration split (``--max-drop`` asks for the smallest component within that many
points instead), once with MDA's per-layer thresholds and once cost-aware (``--cost-exponent``),
keeping the more accurate on calibration images; ``mda`` is the published method at fixed
thresholds. Tasks are independent:
a budget one task cannot meet gives that task its best candidate with a ``warning:`` line,
unless ``--strict``. Every component calibrated on images is scored per class next to its
source; a class it never predicts, or an accuracy far below the source's, is a loud warning
(an error with ``--strict``).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from mdafx.fileio import write_text  # stdlib only: light

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model(p)
    p.add_argument("--profile", required=True, metavar="FILE", help="profile from 'mdafx analyse'")
    p.add_argument("--task", required=True, action="append", type=common.names,
                   metavar="A,B,...", help="classes of one task by name, or #INDEX, in output "
                                           "order; repeatable")
    p.add_argument("--name", metavar="SOURCE",
                   help="source name recorded in the components (default: weights file stem)")
    p.add_argument("-o", "--output", required=True, metavar="DIR|FILE.mdafx",
                   help="directory for one <task>.mdafx per task, or a file for one task")
    p.add_argument("--recipe", default="default", metavar="NAME",
                   help="how components are made: default (searched thresholds + layer "
                        "reconstruction, with and without cost exponent, the better kept; "
                        "needs calibration images), mda (as published), reference (the "
                        "authors' code's masks), mda+norms, mda+reconstruct, searched+norms, "
                        "searched+reconstruct, cost-aware, assemblable (default: default)")
    common.add_thresholds(p)
    g = p.add_argument_group(
        "budget and calibration (training-free)",
        "A budget replaces the recipe's: the thresholds above are the base that a grid of "
        "multipliers scales (conv x0.1..3 times linear x0/0.1/1), scored on calibration images "
        "of the task. Without --calibrate they are the split 'analyse --holdout' kept out of "
        "profiling.")
    g.add_argument("--max-drop", type=common.non_negative, metavar="PTS",
                   help="at most PTS percentage points below the source's accuracy on the "
                        "task's calibration images")
    g.add_argument("--max-params", type=common.fraction, metavar="F",
                   help="at most this share of the source's parameters (0.5 or 50%%)")
    g.add_argument("--max-macs", type=common.fraction, metavar="F",
                   help="at most this share of the source's multiply-accumulates")
    g.add_argument("--strict", action="store_true",
                   help="a budget a task cannot meet is an error and no component is written "
                        "(default: write its best candidate with a warning)")
    g.add_argument("--cost-exponent", type=common.non_negative, metavar="G",
                   help="conv thresholds times (MACs per input channel / their geometric "
                        "mean)^G, so channels of costly high-resolution layers go first "
                        "(default: the recipe's; 0 = MDA as published; cost-aware: 0.5; "
                        "default: the better of 0 and 0.5 on calibration images)")
    g.add_argument("--reestimate-norms", action="store_true",
                   help="also re-estimate BatchNorm statistics of each component on "
                        "calibration images of every class (forward passes only)")
    g.add_argument("--calibrate", metavar="DIR",
                   help="ImageFolder of calibration images, disjoint from the profiled ones "
                        "(default: the profile's held-out split); never the test split")
    g.add_argument("--norm-images", type=common.positive_int, default=50, metavar="N",
                   help="calibration images per class that re-estimate the norms (default 50)")
    g.add_argument("--search-table", metavar="FILE",
                   help="write every task's explored trade-off (markdown) to FILE")
    g.add_argument("--search-plot", metavar="FILE.svg",
                   help="plot every task's trade-off (calibration accuracy vs MACs) to FILE.svg")
    common.add_force(p)


def _component_paths(output: Path, tasks: list[list[str]]) -> list[Path]:
    """``-o``: a file for one task (it has a suffix), else a directory of ``<a>-<b>.mdafx``."""
    if output.suffix and not output.is_dir():
        if len(tasks) != 1:
            raise common.UsageError(f"-o {output} is a file but there are {len(tasks)} tasks; "
                                    "give a directory")
        return [output]
    files = ["-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", t) for t in task) + ".mdafx"
             for task in tasks]
    if len(set(files)) != len(files):
        raise common.UsageError("two tasks give the same file name; give them distinct classes")
    return [output / f for f in files]


def _recipe(args):
    """The recipe of ``--recipe``, with ``--reestimate-norms`` and the budget flags applied."""
    import dataclasses

    from mdafx.recipes import RECIPES

    if args.recipe not in RECIPES:
        raise common.UsageError(f"--recipe {args.recipe}: unknown; choose from "
                                f"{', '.join(RECIPES)}")
    recipe = RECIPES[args.recipe]
    if args.reestimate_norms:
        recipe = dataclasses.replace(recipe, recovery=dataclasses.replace(recipe.recovery,
                                                                          norms=True))
    if (args.max_drop, args.max_params, args.max_macs) != (None, None, None):
        from mdafx.search import Budget

        recipe = dataclasses.replace(recipe, budget=Budget(args.max_drop, args.max_params,
                                                           args.max_macs))
    if args.cost_exponent is not None:
        from mdafx.errors import PreconditionError

        try:
            recipe = recipe.with_cost_exponent(args.cost_exponent)
        except PreconditionError as e:
            raise common.UsageError(f"--cost-exponent: {e}") from None
    return recipe


def run(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    budgeted, calibrating = recipe.budget is not None, recipe.needs_calibration
    if (args.search_table or args.search_plot) and not budgeted:
        raise common.UsageError("--search-table/--search-plot need a recipe with a budget or "
                                "--max-drop, --max-params or --max-macs")
    if args.strict and not calibrating:
        raise common.UsageError(f"--strict checks a budget and the per-class guard on "
                                f"calibration images; recipe {recipe.name} uses none (add a "
                                f"budget or --reestimate-norms)")
    if args.calibrate and not calibrating:
        raise common.UsageError(f"--calibrate goes with a recipe that calibrates (recipe "
                                f"{recipe.name} does not)")
    common.require_files(weights=args.weights, profile=args.profile)
    common.require_dirs(calibration=args.calibrate)
    from mdafx import api  # heavy: only when the command runs (`--help` stays light)
    from mdafx.search import tradeoff_svg

    prof = api.Profile.load(args.profile)
    k = len(prof.class_names)
    tasks = [[prof.class_names[c] for c in api.resolve_classes(t, prof.class_names, k)]
             for t in args.task]  # every class checked before any work
    paths = _component_paths(Path(args.output), tasks)
    extras = [args.search_table, args.search_plot]
    common.check_outputs(args, [*paths, *extras], [args.profile, args.weights, args.calibrate])

    fmt = common.input_format(args, prof.record.get("input"))
    gm = common.build_source(args, args.num_classes or k, fmt)
    common.check_profile_matches(args, prof, gm)
    budget = recipe.budget
    calibration, calib_text = None, None
    if calibrating:
        ds, idx, calib_text = api.calibration_split(prof, args.calibrate, fmt)
        calibration = (ds, idx)
    am = api.source_analyses(gm, prof)  # channel groups and masks shared by the tasks
    _say_barriers(args, gm, am)
    name = common.source_name(args)
    comps = [api.disassemble(gm, prof, task, recipe=recipe, thresholds=common.thresholds(args),
                             calibration=calibration, norm_images=args.norm_images, source=name,
                             am=am, progress=common.progress(args)) for task in tasks]
    guards = [api.guard(comp, gm, calibration) for comp in comps] if calibration else []
    loud = [(t, g) for t, g in zip(tasks, guards) if g.warnings]
    for task, g in loud:
        for w in g.warnings:
            common.warn(f"warning: task {','.join(task)}: {w}")
    unmet = [(t, c.search) for t, c in zip(tasks, comps) if c.search is not None
             and not c.search.met]
    for task, res in unmet:
        common.warn(f"warning: task {','.join(task)}: {res.message}" + (
            "" if args.strict else "; writing it anyway (--strict refuses)"))

    refused = bool(unmet or loud) and args.strict
    with common.AllOrNothing() as written:
        searched = [(",".join(t), c.search) for t, c in zip(tasks, comps) if c.search]
        if args.search_table:
            text = "".join(f"## {title}\n\n{res.table('github')}\n\n" for title, res in searched)
            written.add(write_text(args.search_table, text, overwrite=args.force))
        if args.search_plot:
            written.add(write_text(args.search_plot, tradeoff_svg(searched),
                                   overwrite=args.force))
        for comp, path in zip(comps, paths):
            if refused:
                break
            meta = {**common.source_record(args), "num_classes_source": k}
            if calib_text is not None:
                meta["calibration"] = {**comp.metadata["calibration"], "data": calib_text}
            written.add(api.save(comp, path, overwrite=args.force, metadata=meta))
    if refused:  # the search table and plot stay: they show why
        raise common.CliError("; ".join([f"task {','.join(t)}: budget not met" for t, _ in unmet]
                                        + [f"task {','.join(t)}: {g.warnings[0]}"
                                           for t, g in loud])
                              + "; no component written (--strict)"
                              + ("; the search table/plot were written" if any(extras) else ""))
    _report(args, tasks, comps, paths, budget, calib_text, name, k, recipe, guards)
    return common.EXIT_OK


def _report(args, tasks, comps, paths, budget, calib_text, name, k, recipe, guards) -> None:
    records, rows = [], []
    for task, comp, path in zip(tasks, comps, paths):
        m = comp.metadata
        cal, res = m.get("calibration"), comp.search
        records.append({"task": task, "classes": comp.classes, "file": str(path),
                        "params": m["params"], "params_source": m["params_source"],
                        "macs": m["macs"], "macs_source": m["macs_source"],
                        "channels_kept": m["channels_kept"], "channels_total": m["channels_total"],
                        "thresholds": m["thresholds"], "calibration": cal,
                        "norms_reestimated_on": m.get("norms_reestimated_on"),
                        "recipe": m.get("recipe"),
                        "cost_exponent_choice": m.get("cost_exponent_choice"),
                        "channels_selected": m.get("channels_selected"),
                        "search": None if res is None else {
                            "met": res.met, "scale": res.scale, "message": res.message}})
        row = [",".join(task), ",".join(map(str, comp.classes)),
               common.share(m["params"], m["params_source"]),
               common.share(m["macs"], m["macs_source"]),
               f"{m['channels_kept']}/{m['channels_total']} "
               f"({m['channels_kept'] / max(1, m['channels_total']):.0%})"]
        if cal:
            row.append(f"{common.pct(cal['accuracy'])} ({common.pct(cal['source_accuracy'])})")
        if budget is not None:
            from mdafx.search import scale_text

            row += [scale_text(res.scale), "yes" if res.met else "NO"]
        rows.append(row + [str(path)])
    first = comps[0].metadata
    common.emit_json(args, {"command": "disassemble", "source": name, "classes_source": k,
                            "params_source": first["params_source"],
                            "macs_source": first["macs_source"],
                            "budget": None if budget is None else vars(budget),
                            "calibration": calib_text, "components": records,
                            "per_class": [g.to_dict() for g in guards]})
    headers = ["task", "classes", "params (kept)", "MACs (kept)", "channel groups kept"]
    headers += ["calib acc (source)"] if calib_text else []
    headers += ["thresholds", "budget met"] if budget is not None else []
    lines = [*common.table(rows, headers + ["file"]),
             f"source {name}: {k} classes, {first['params_source']:,} params, "
             f"{first['macs_source']:,} MACs; "
             + f"recipe {recipe.name}; "
             + (f"budget {budget.describe()}; base " if budget is not None else "")
             + f"thresholds {common.thresholds_text(args)}"]
    for task, g in zip(tasks, guards):
        lines += ["", f"task {','.join(task)} on {g.images} calibration images, per class:",
                  *common.table(g.rows(), ["class", "images", "component", "source",
                                           "delta pts"])]
    if calib_text:
        reest = first.get("norms_reestimated_on")
        lines.append(f"calibration: {calib_text}"
                     + (f"; norms re-estimated on {reest} of them" if reest else ""))
    for what, path in (("explored thresholds", args.search_table),
                       ("trade-off plot", args.search_plot)):
        if path:
            lines.append(f"{what}: {path}")
    common.say(args, *lines)
    common.say(args, f"wrote {len(paths)} component file(s): {', '.join(map(str, paths))}",
               final=True)


def _say_barriers(args, gm, am) -> None:
    """The prunable share and the top barriers (``barrier_report``), and a warning when little
    of the model can be pruned."""
    from mdafx.passes.channel_groups import ChannelGroups, barrier_report

    report = barrier_report(gm, am.get(ChannelGroups))
    common.say(args, *report.lines())
    if report.warning():
        common.warn(report.warning())
