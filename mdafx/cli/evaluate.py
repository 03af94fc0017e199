"""``mdafx evaluate``: per-class accuracy of a model file or of a source model on an ImageFolder.

* ``MODEL.mdafx``: a component or assembled model, fed in its recorded input format;
* ``--model ...``: a source model (its logits named by the data's folders or ``--class-names``),
  restricted to a task's logits with ``--task A,B``;
* ``COMPONENT.mdafx --model ...``: the component, and its source scored side by side on the
  same images over the component's classes.

``--resize/--crop`` read images of any size, ``--device`` runs on a GPU, and under
``torchrun --nproc-per-node N`` every process scores its shard of the images (rank 0 prints).
"""
from __future__ import annotations

import argparse

from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_file", nargs="?", metavar="MODEL",
                   help="component or assembled model file")
    common.add_model(p, required=False, title="source model (instead of, or beside, a file)")
    p.add_argument("--class-names", type=common.names, metavar="A,B,...",
                   help="with --model alone: names of its logits (default: the data's folders)")
    p.add_argument("--task", type=common.names, metavar="A,B,...",
                   help="with --model alone: score it on these classes only, predicting over "
                        "their logits (names, or #INDEX)")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root (test split)")
    p.add_argument("--batch-size", type=common.positive_int, default=256, metavar="N")
    common.add_preprocess(p)
    common.add_runtime(p)


def _usage(args: argparse.Namespace) -> None:
    if args.model_file is None and args.model is None:
        raise common.UsageError("give a model file, --model (with --weights), or both")
    if args.model is None and common.model_given(args):
        raise common.UsageError("--weights/--model-arg/--num-classes/--input-size/--mean/--std "
                                "go with --model")
    if args.model_file is not None and (args.class_names or args.task):
        raise common.UsageError("--class-names/--task go with --model alone (a model file "
                                "names its classes)")
    if args.model_file is not None and (args.input_size or args.mean or args.std
                                        or args.transforms):
        raise common.UsageError("a model file records its input format; --input-size/--mean/"
                                "--std/--transforms go with --model alone")


def run(args: argparse.Namespace) -> int:
    _usage(args)
    common.require_files(model=args.model_file, weights=args.weights)
    common.require_dirs(data=args.data)
    from mdafx import api  # heavy: only when the command runs (`--help` stays light)
    from mdafx.distributed import session

    with session(common.device(args)) as (ranks, device):  # torchrun: one process per rank
        return _run(args, api, ranks, device)


def _open(args: argparse.Namespace, api, fmt, transform, ranks):
    from mdafx.data import default_workers

    workers = args.workers if args.workers is not None else default_workers(ranks.world)
    return api.open_images(args.data, fmt, transform=transform, workers=workers)


def _run(args: argparse.Namespace, api, ranks, device) -> int:
    source, source_classes, classes = None, None, None
    if args.model_file is not None:
        model = api.load(args.model_file)
        names, label = list(model.class_names), str(args.model_file)
        fmt = (api.InputFormat.from_dict(model.metadata["input"])
               if isinstance(model, api.Component) else model.input_format)
        module = model.module
        if args.model is not None:
            source, source_classes = _source_beside(args, model, fmt)
        dataset = _open(args, api, fmt, common.preprocess(args, fmt), ranks)
    else:
        found = common.recipe(args, args.num_classes)
        fmt = found[1] if found else common.input_format(args)
        dataset = _open(args, api, fmt, found[0] if found else common.preprocess(args, fmt),
                        ranks)
        names = args.class_names or list(dataset.class_names)
        if args.num_classes not in (None, len(names)):
            raise common.CliError(f"--num-classes {args.num_classes} but {len(names)} class "
                                  f"names ({', '.join(names)}); pass --class-names for every "
                                  "logit")
        module, label = common.build_source(args, len(names), fmt), args.model
        if args.task:
            classes = api.resolve_classes(args.task, names, len(names))
            names = [names[c] for c in classes]
    report = api.evaluate(module, dataset, names, classes=classes, source=source,
                          source_classes=source_classes, batch_size=args.batch_size,
                          label=label, device=device, use_autocast=args.autocast,
                          progress=common.show_progress(args), ranks=ranks)
    if ranks.main:
        _print(args, report, names, classes)
    return common.EXIT_OK


def _source_beside(args: argparse.Namespace, model, fmt):
    """The ``--model`` a component was cut from, and its logit index of each component class."""
    from mdafx import api

    if not isinstance(model, api.Component):
        raise common.CliError(f"{args.model_file}: an assembled model has several sources; "
                              "compare a component file with its --model")
    recorded = model.metadata.get("num_classes_source")
    valid = isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0
    num_classes = args.num_classes or (recorded if valid else None)
    if num_classes is None:
        raise common.CliError(f"{args.model_file} does not record its source's class count; "
                              "pass --num-classes")
    if max(model.classes) >= num_classes:
        raise common.CliError(f"{args.model_file}: its classes {model.classes} are not logits "
                              f"of a {num_classes}-class source; pass --num-classes")
    return common.build_source(args, num_classes, fmt), list(model.classes)


def _print(args, report, names, classes) -> None:
    source = report.source_rows
    common.emit_json(args, {"command": "evaluate", **report.to_dict(),
                            "data": str(args.data), "logits": classes,
                            "source_model": args.model if source is not None else None})
    headers = ["class", "samples", "correct", "accuracy"]
    rows = []
    for i, row in enumerate(report.rows):
        cells = [row[0], row[1], row[2], common.pct(row[3])]
        if source is not None:
            src = source[i][3]
            delta = None if row[3] is None or src is None else f"{100 * (row[3] - src):+.2f}"
            cells += [common.pct(src), delta]
        rows.append(cells)
    if source is not None:
        headers += ["source accuracy", "delta pts"]
    task = f" on task {','.join(names)} (its logits only)" if classes is not None else ""
    lines = [*common.table(rows, headers)]
    if report.skipped:
        lines.append(f"skipped folders not in the model: {', '.join(report.skipped)}")
    common.say(args, *lines)
    common.say(args, f"model {report.label}{task}: {len(names)} classes; data {args.data}: "
                     f"{report.images} images; accuracy {common.pct(report.accuracy)}"
               + (f" (source {common.pct(source[-1][3])})" if source is not None else ""),
               final=True)
