"""Components and assembled models that keep their accuracy: every recipe on the CIFAR-10 sources.

    python tools/report_accuracy.py [--models vgg,resnet20] [--recipes mda,...,default]
                                    [--tasks N | --task-numbers 4,5] [--no-assembly]
                                    [--assembly-recipes default,mda-channels,assemblable]
                                    [--seeds 0,1,2,3,4] [--seed-tasks two|all] [--seed-recipe R]
                                    [--per-class 50]
                                    [--threads 2] [--out .cache/report.md]

For each cached source (tools/train_sources.py) and split seed, the CIFAR-10 *training* split is
divided per class (tools/common.split_train): 90% is the pool the profile's 50 most confident
samples per class come from, 10% (500 per class) the calibration split that recipes with a
budget or recovery use. The test split is read only to score.

Tables (markdown copy in ``--out``):

1. per source, recipe x task (seed 0): test accuracy of the component on the task's test images
   and its delta to the source on the same images and logits, params and MACs as shares of the
   source, seconds to make it, whether it meets the goal (<= 1 point below, <= 50% MACs); for
   searched recipes, the search's cost over its floor (candidates scored x one source forward
   over the calibration images);
2. where MDA's accuracy goes (``mdafx.diagnosis``): its plan applied one layer at a time;
3. the ``--seed-recipe`` (default: ``default``) over every ``--seeds`` split seed: mean and
   standard deviation of the delta per task (the two-class tasks, or every task of the run with
   ``--seed-tasks all``);
4. assembly: components of the ``--assembly-recipes`` (default: ``default``, ``mda-channels``,
   ``assemblable``) from both sources,
   assembled without calibration, with MDA's parameter scaling, with the joint calibration
   (``calibrate_jointly``) and with a feature head (``fit_calibration(..., method="head")``),
   against the weighted source baseline (each source on its own task's
   test images, predicting over its task's logits) and against the better of the two sources
   predicting over all the assembled classes' logits (what one source gives on the same
   problem); and the same assemblies of the sources *nearly whole* (``CEILING``: MDA at zero
   thresholds, which drops only channels that contribute nothing, 96-97% of the MACs) and of
   the sources *whole* (``WHOLE``: every channel kept, only the task's logits), what assembly
   can reach with components that lost nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from mdafx import api  # noqa: E402
from mdafx.evaluation import predict, task_accuracy  # noqa: E402
from mdafx.passes.channel_groups import ChannelGroups  # noqa: E402
from mdafx.passes.prune_channels import TaskPlan  # noqa: E402

RECIPE_ORDER = ("mda", "reference", "mda+norms", "mda+reconstruct", "searched+norms",
                "searched+reconstruct", "cost-aware", "mda-channels", "default", "assemblable")
ASSEMBLY_RECIPES = ("default", "mda-channels", "assemblable")
CEILING = "thresholds x0"   # the assembly rows of components cut at zero thresholds
WHOLE = "whole sources"     # ... and of components that keep every channel (the sources' logits)
ASSEMBLIES = ((("vgg", ("cat", "dog")), ("resnet20", ("airplane", "ship"))),
              (("vgg", common.FIVE_A), ("resnet20", common.FIVE_B)))


class Source:
    """A cached source model, traced, with its profile and calibration split for one seed."""

    def __init__(self, name, model, train, train_ds, test_ds, seed, per_class=50):
        self.name, self.seed = name, seed
        self.gm = api.trace(model, torch.zeros(*common.INPUT_SHAPE))
        self.select, self.calib = common.split_train(train.labels, common.DEFAULT_CALIB_FRAC, seed)
        path = common.profile_path(common.cache_root() / "profiles", name, self.gm, per_class,
                                   common.DEFAULT_CALIB_FRAC, seed)
        self.profile, self.profile_s, _ = common.get_profile(
            self.gm, train_ds, self.select, train.class_names, per_class, path=path, reuse=True)
        self.am = api.source_analyses(self.gm, self.profile)
        self.train_ds, self.test_ds, self.names = train_ds, test_ds, list(train.class_names)
        self.test_logits, self.test_labels = predict(self.gm, test_ds.batches(500))
        self.macs, self.params = api.count_macs(self.gm), api.count_params(self.gm)

    def classes(self, task):
        return api.resolve_classes(list(task), self.names, len(self.names))

    def source_acc(self, classes):
        idx = common.indices_of(self.test_labels.numpy(), classes)
        return task_accuracy(self.test_logits[idx], self.test_labels[idx], classes), len(idx)


def component_test_acc(src: Source, comp) -> float:
    """Test accuracy over the task's logits (a reference component keeps every logit)."""
    task = list(comp.metadata.get("task") or comp.classes)
    idx = common.indices_of(src.test_labels.numpy(), task)
    logits, labels = predict(comp.module, src.test_ds.batches(500, idx))
    where = [comp.classes.index(c) for c in task]
    pos = torch.as_tensor([task.index(int(y)) for y in labels])
    return float((logits[:, where].argmax(1) == pos).float().mean())


def make(src: Source, task, recipe: str):
    t0 = time.perf_counter()
    comp = api.disassemble(src.gm, src.profile, list(task), recipe=recipe,
                           calibration=(src.train_ds, src.calib.tolist()), source=src.name,
                           am=src.am)
    return comp, time.perf_counter() - t0


def recipe_rows(src: Source, tasks, recipes, log) -> tuple[list[dict], dict]:
    rows, made = [], {}
    for task in tasks:
        classes = src.classes(task)
        s_acc, n = src.source_acc(classes)
        for recipe in recipes:
            comp, seconds = make(src, task, recipe)
            acc = component_test_acc(src, comp)
            macs = comp.metadata["macs"] / src.macs
            res = comp.search
            row = {"model": src.name, "task": common.task_label(task), "recipe": recipe,
                   "n": n, "source": s_acc, "acc": acc, "delta": 100 * (acc - s_acc),
                   "params": comp.params / src.params, "macs": macs, "seconds": seconds,
                   # both accuracies are float32 means (0.937 is 0.93699998): a slack of 1e-6,
                   # far below one test image (5e-4 of 2000), keeps an exact -1.00 within 1 point
                   "goal": acc >= s_acc - 0.01 - 1e-6 and macs <= 0.5 + 1e-9,
                   "cost": None if res is None else res.cost_ratio,
                   "scored": None if res is None else res.scored,
                   "met": None if res is None else res.met,
                   "gamma": comp.metadata.get("thresholds", {}).get("cost_exponent"),
                   # the chosen candidate on the calibration images the fit did not use
                   "calib": None if res is None else
                   100 * (res.candidate.accuracy - res.source_accuracy)}
            rows.append(row)
            made[(tuple(task), recipe)] = comp
            log(f"[{src.name} seed {src.seed}] {row['task']} {recipe}: {acc:.2%} "
                f"({row['delta']:+.2f}) at {macs:.1%} MACs, γ {row['gamma']}, {seconds:.0f} s")
    return rows, made


def recipe_table(rows) -> str:
    body = [[r["task"], r["recipe"], f"{r['acc']:.2%}", f"{r['delta']:+.2f}",
             f"{r['params']:.1%}", f"{r['macs']:.1%}", f"{r['seconds']:.0f}",
             "-" if r["calib"] is None else f"{r['calib']:+.2f}",
             "-" if r["gamma"] is None else f"{r['gamma']:g}",
             "-" if r["cost"] is None else f"{r['cost']:.1f}x ({r['scored']})",
             "yes" if r["goal"] else "no"] for r in rows]
    return tabulate(body, headers=["task", "recipe", "test acc", "delta pts", "params", "MACs",
                                   "seconds", "calib delta", "γ", "search cost (scored)", "goal"],
                    tablefmt="github", disable_numparse=True)


def diagnosis_table(src: Source, task) -> str:
    classes = src.classes(task)
    plan = src.am.get(TaskPlan(classes, api.Thresholds()))
    rows = api.accuracy_by_layer(src.gm, plan, src.am.get(ChannelGroups), src.train_ds,
                                 src.calib.tolist(), classes)
    return tabulate([[r.layer, f"{r.kept}/{r.total}", f"{r.alone:.2%}", f"{r.cumulative:.2%}"]
                     for r in rows], headers=["layer (input)", "groups kept", "alone",
                                              "cumulative"], tablefmt="github",
                    disable_numparse=True)


def assembly_rows(sources: dict, made: dict, log, recipes=None) -> list[list]:
    out = []
    for parts in ASSEMBLIES:
        names = [c for _, task in parts for c in task]
        single = max(sources[n].source_acc(sources[n].classes(names))[0] for n in sources)
        for recipe in recipes or ASSEMBLY_RECIPES:
            comps = [made[(name, tuple(task), recipe)] for name, task in parts]
            out += _assembled(sources, parts, comps, recipe, single, log)
        nearly = [api.cut(sources[name].gm, sources[name].profile, list(task),
                          thresholds=api.Thresholds().scaled(0.0), source=name,
                          am=sources[name].am) for name, task in parts]
        out += _assembled(sources, parts, nearly, CEILING, single, log)
        # a plan that keeps every group with probability 1: the source itself, on the task's
        # logits; what a head over the sources' own features can reach
        whole = [api.cut(sources[name].gm, sources[name].profile, list(task), source=name,
                         am=sources[name].am,
                         plan=api.plan_random(sources[name].am.get(ChannelGroups), 1.0,
                                              classes=sources[name].classes(task)))
                 for name, task in parts]
        out += _assembled(sources, parts, whole, WHOLE, single, log)
    return out


def _assembled(sources, parts, comps, recipe, single, log) -> list[list]:
    calib_src = sources[parts[0][0]]
    ds = calib_src.train_ds
    calib = api.ArrayDataset(ds.images.numpy()[calib_src.calib],
                             ds.labels.numpy()[calib_src.calib], class_names=calib_src.names)
    variants, fit_s = {"none": api.assemble(comps)}, {}
    for label, method in (("MDA scaling", "mda"), ("joint", "joint"), ("head", "head")):
        t0 = time.perf_counter()
        calibration = api.fit_calibration(comps, calib, method=method)
        fit_s[label] = time.perf_counter() - t0
        variants[label] = api.assemble(comps, calibration)
    classes = [calib_src.names.index(n) for n in variants["none"].class_names]
    test_ds = calib_src.test_ds
    idx = common.indices_of(test_ds.labels.numpy(), classes)
    base_hits, base_n = 0.0, 0
    for name, task in parts:
        acc, n = sources[name].source_acc(sources[name].classes(task))
        base_hits, base_n = base_hits + acc * n, base_n + n
    baseline = base_hits / base_n
    label = " + ".join(f"{n}{common.task_label(t)}" for n, t in parts)
    out = []
    for variant, asm in variants.items():
        logits, labels = predict(asm.module, test_ds.batches(500, idx))
        pos = torch.as_tensor([classes.index(int(y)) for y in labels])
        acc = float((logits.argmax(1) == pos).float().mean())
        out.append([label, len(classes), recipe, variant, f"{acc:.2%}", f"{baseline:.2%}",
                    f"{100 * (acc - baseline):+.2f}", f"{single:.2%}",
                    f"{100 * (acc - single):+.2f}", f"{asm.params:,}",
                    f"{fit_s[variant]:.1f}" if variant in fit_s else "-"])
        log(f"[assembly] {label} {recipe} {variant}: {acc:.2%} vs baseline {baseline:.2%}, "
            f"one source {single:.2%}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="folder containing cifar10/ (default: $MDAFX_DATA)")
    ap.add_argument("--models", default=",".join(common.DEFAULT_MODELS))
    ap.add_argument("--recipes", default=",".join(RECIPE_ORDER))
    ap.add_argument("--tasks", type=int, default=len(common.TASKS),
                    help="the first N of the five tasks (default all)")
    ap.add_argument("--task-numbers", default=None,
                    help="instead of --tasks: which of the five tasks, 1-based (e.g. 4,5)")
    ap.add_argument("--seeds", default="0,1,2,3,4",
                    help="split seeds of the stability table (default recipe)")
    ap.add_argument("--seed-tasks", choices=("two", "all"), default="two",
                    help="tasks of the stability table: the two-class ones (default) or all")
    ap.add_argument("--seed-recipe", default="default",
                    help="the recipe of the stability table (default %(default)s)")
    ap.add_argument("--no-assembly", action="store_true")
    ap.add_argument("--assembly-recipes", default=",".join(ASSEMBLY_RECIPES),
                    help="recipes whose components are assembled (default %(default)s)")
    ap.add_argument("--per-class", type=int, default=common.DEFAULT_PER_CLASS,
                    help="profiled samples per class (MDA 1.1; default %(default)s = 1%% of "
                         "5000): the effect of the number of samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [m for m in args.models.split(",") if m]
    recipes = [r for r in args.recipes.split(",") if r]
    assembly_recipes = [r for r in args.assembly_recipes.split(",") if r]
    unknown = [r for r in recipes + assembly_recipes + [args.seed_recipe]
               if r not in api.RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(api.RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    tasks = common.TASKS[:args.tasks]
    if args.task_numbers:
        numbers = [int(n) for n in args.task_numbers.split(",") if n]
        if not all(1 <= n <= len(common.TASKS) for n in numbers):
            ap.error(f"--task-numbers: each in 1..{len(common.TASKS)}, got {args.task_numbers}")
        tasks = tuple(common.TASKS[n - 1] for n in numbers)
    models = common.load_sources(names, common.cache_root() / "sources")
    train, train_ds, test_ds = common.load_cifar(common.data_root(args.data))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    parts, sources, made = [], {}, {}
    seed0_rows = {}     # (model, task label, recipe) -> its seed-0 row, reused by the seed study
    for name, (model, _) in models.items():
        src = Source(name, model, train, train_ds, test_ds, seed=0, per_class=args.per_class)
        sources[name] = src
        rows, m = recipe_rows(src, tasks, recipes, log)
        made.update({(name, *k): v for k, v in m.items()})
        seed0_rows.update({(name, r["task"], r["recipe"]): r for r in rows})
        parts.append(f"## {name}: {src.params:,} params, {src.macs:,} MACs\n\n"
                     + recipe_table(rows))
        parts.append(f"### {name}: where MDA's accuracy goes, {{cat, dog}} on calibration "
                     f"images\n\n" + diagnosis_table(src, ("cat", "dog")))
    # assembly before the seed study: it uses the seed-0 components of both sources
    if not args.no_assembly and len(sources) == 2:
        for name, task in sum(ASSEMBLIES, ()):
            for recipe in assembly_recipes:
                if (name, tuple(task), recipe) not in made:
                    made[(name, tuple(task), recipe)] = make(sources[name], task, recipe)[0]
        rows = assembly_rows(sources, made, log, assembly_recipes)
        parts.append("## Assembly\n\n" + tabulate(
            rows, headers=["assembled", "classes", "components", "calibration", "test acc",
                           "baseline", "delta pts", "one source", "delta pts", "params",
                           "fit s"], tablefmt="github", disable_numparse=True))
    if len(seeds) > 1:
        stab = []
        studied = [t for t in tasks if len(t) == 2 or args.seed_tasks == "all"]
        for name, (model, _) in models.items():
            deltas = {common.task_label(t): [] for t in studied}
            macs = {common.task_label(t): [] for t in studied}
            costed = {common.task_label(t): 0 for t in studied}    # seeds where γ > 0 won
            for seed in seeds:
                known = [seed0_rows.get((name, common.task_label(t), args.seed_recipe))
                         for t in studied]
                if seed == 0 and all(known):   # the recipe table's rows: same split, same run
                    rows = known
                else:
                    src = sources[name] if seed == 0 else Source(
                        name, model, train, train_ds, test_ds, seed=seed,
                        per_class=args.per_class)
                    rows, _ = recipe_rows(src, studied, [args.seed_recipe], log)
                for r in rows:
                    deltas[r["task"]].append(r["delta"])
                    macs[r["task"]].append(r["macs"])
                    costed[r["task"]] += bool(r["gamma"])
            for task, d in deltas.items():
                stab.append([name, task, len(d), f"{statistics.mean(d):+.2f}",
                             f"{statistics.stdev(d):.2f}", f"{min(d):+.2f}", f"{max(d):+.2f}",
                             f"{statistics.mean(macs[task]):.1%}", str(costed[task])])
        parts.append(f"## {args.seed_recipe} over split seeds {args.seeds}\n\n" + tabulate(
            stab, headers=["model", "task", "seeds", "mean delta", "std", "min", "max",
                           "mean MACs", "γ > 0 chosen"], tablefmt="github",
            disable_numparse=True))
    total = time.perf_counter() - started
    text = (f"# Components that keep their accuracy (tools/report_accuracy.py)\n\n"
            f"{args.per_class} profiled samples per class; {args.threads} thread(s); "
            f"total {total:.0f} s\n\n" + "\n\n".join(parts) + "\n")
    print(text)
    out = args.out or common.cache_root() / "report_accuracy.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
