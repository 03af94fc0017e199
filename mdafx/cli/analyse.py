"""``mdafx analyse`` (alias ``profile``): a model and an ImageFolder -> a contribution profile.

The profile (a safetensors file) records the model spec, the input format, the data folder and
the calibration split held out of profiling (``--holdout``), which ``disassemble``, ``routes``
and ``inspect`` read back.

Images of any size are read with ``--resize N --crop N`` (or ``--transforms``, the model's own
recipe), decoded by ``--workers`` DataLoader processes; ``--device`` runs the forward passes on
a GPU. Data parallel, one process per GPU (or CPU socket), rank 0 writing the profile::

    torchrun --nproc-per-node 8 -m mdafx.cli analyse --device cuda ...
    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 \\
             --nproc-per-node 8 -m mdafx.cli analyse --device cuda ...
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model(p)
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root (training split)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="profile file to write (safetensors; any suffix)")
    p.add_argument("--per-class", type=common.positive_int, metavar="N",
                   help="most confident samples per class (default: 1%% of the class, at least 1)")
    p.add_argument("--holdout", type=common.half_open_unit, default=0.1, metavar="F",
                   help="share of every class held out of profiling as the calibration split "
                        "that 'disassemble --max-drop/--reestimate-norms' uses (recorded in the "
                        "profile; 0 holds out nothing; default 0.1)")
    p.add_argument("--seed", type=common.seed, default=0, help="seed of the held-out split")
    p.add_argument("--batch-size", type=common.positive_int, default=128, metavar="N")
    common.add_preprocess(p)
    common.add_runtime(p)
    common.add_force(p)


def run(args: argparse.Namespace) -> int:
    common.require_files(weights=args.weights)
    common.require_dirs(data=args.data)
    common.check_outputs(args, [args.output], [args.weights, args.data])
    # heavy imports here, not at module level: `mdafx --help` must not load torch
    from mdafx import api
    from mdafx.distributed import session
    from mdafx.passes.channel_groups import barrier_report

    with session(common.device(args)) as (ranks, device):  # torchrun: one process per rank
        return _run(args, api, barrier_report, ranks, device)


def _run(args: argparse.Namespace, api, barrier_report, ranks, device) -> int:
    found = common.recipe(args, args.num_classes)
    fmt = found[1] if found else common.input_format(args)
    transform = found[0] if found else common.preprocess(args, fmt)
    from mdafx.data import default_workers

    workers = args.workers if args.workers is not None else default_workers(ranks.world)
    dataset = api.open_images(args.data, fmt, transform=transform, workers=workers)
    names = list(dataset.class_names)
    num_classes = args.num_classes or len(names)
    if num_classes != len(names):
        raise common.CliError(f"the model has {num_classes} classes (--num-classes) but "
                              f"{args.data} has {len(names)} class folders; profiling needs "
                              "samples of every class")
    gm = common.build_source(args, num_classes, fmt)
    report = barrier_report(gm, api.channel_groups(gm))  # what the components can lose
    start = time.perf_counter()
    prof = api.analyse(gm, dataset, fmt, per_class=args.per_class, holdout=args.holdout,
                       seed=args.seed, batch_size=args.batch_size,
                       source=common.source_record(args),
                       progress=common.show_progress(args), device=device,
                       use_autocast=args.autocast, ranks=ranks)
    seconds = time.perf_counter() - start
    # rank 0 writes (atomically); every rank learns whether it could
    ranks.step("writing the profile",
               lambda: ranks.main and prof.save(args.output, overwrite=args.force))
    if not ranks.main:
        return common.EXIT_OK

    labels = dataset.labels
    images = [int((labels == c).sum()) for c in range(len(names))]
    held_idx = (prof.record.get("calibration") or {}).get("indices", [])
    held = [int((labels[held_idx] == c).sum()) if held_idx else 0 for c in range(len(names))]
    classes = [{"index": c, "name": n, "images": images[c], "profiled": prof.samples_per_class[c],
                "held_out": held[c]} for c, n in enumerate(names)]
    common.emit_json(args, {"command": "analyse", "output": str(Path(args.output)),
                            "classes": classes, "layers": prof.layers, "seconds": seconds,
                            "record": prof.record})
    rows = [[c["index"], c["name"], c["images"], c["profiled"], c["held_out"]] for c in classes]
    rows.append(["", "total", sum(images), sum(prof.samples_per_class), sum(held)])
    common.say(args, *common.table(rows, ["#", "class", "images", "profiled",
                                          "held out (calibration)"]),
               f"{len(prof.layers)} weighted layers profiled in {seconds:.1f} s", *report.lines())
    if report.warning():
        common.warn(report.warning())
    common.say(args, f"wrote {args.output}", final=True)
    return common.EXIT_OK
