"""``mdafx finetune``: optional, explicit distillation fine-tuning of a component or assembled
model file (the architecture never changes).

Teachers come only from the command line: one ``--teacher-model SPEC`` per component, in
component order, each followed by its own ``--teacher-model-arg`` and ``--teacher-weights``.
Without teachers the model distils from a frozen copy of itself. The source spec a file records
is provenance: it is never built.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import common

DEFAULT_TEACHER_CLASSES = 10  # when a file does not record its source's class count


class _Teacher(argparse.Action):
    """``--teacher-model`` starts a teacher; ``--teacher-model-arg``/``--teacher-weights``
    belong to the one before them."""

    def __call__(self, parser, namespace, values, option_string=None):
        teachers = [dict(t, model_args=list(t["model_args"])) for t in namespace.teachers]
        if self.dest == "teacher_model":
            teachers.append({"model": values, "model_args": [], "weights": None})
        elif not teachers:
            parser.error(f"{option_string} must follow the --teacher-model it belongs to")
        elif self.dest == "teacher_weights":
            if teachers[-1]["weights"] is not None:
                parser.error(f"two --teacher-weights for --teacher-model {teachers[-1]['model']}")
            teachers[-1]["weights"] = values
        else:
            teachers[-1]["model_args"].append(values)
        namespace.teachers = teachers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_file", metavar="MODEL", help="component or assembled model file")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder training split; folders are matched to the model's classes "
                        "by name, others are ignored")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="model file to write")
    p.add_argument("--epochs", required=True, type=common.positive_int, metavar="N")
    p.add_argument("--lr", type=common.positive, default=0.01,
                   help="SGD learning rate, cosine-decayed (default 0.01)")
    p.add_argument("--temperature", type=common.positive, default=4.0,
                   help="distillation temperature (default 4)")
    p.add_argument("--alpha", type=common.unit_interval, default=0.5,
                   help="weight of the label cross-entropy; 1-ALPHA weighs the distillation "
                        "term (default 0.5)")
    p.add_argument("--holdout", type=common.half_open_unit, default=0.1, metavar="F",
                   help="share of every class of --data held out to report accuracy before and "
                        "after (default 0.1)")
    p.add_argument("--eval", metavar="DIR",
                   help="report accuracy on this ImageFolder instead of a held-out share")
    p.add_argument("--augment", action="store_true",
                   help="random crop and flip on the training images (needs --eval: a held-out "
                        "share would be augmented too)")
    g = p.add_argument_group("teachers (default: the model itself)")
    g.add_argument("--teacher-model", action=_Teacher, metavar="NAME|MODULE:CALLABLE",
                   help="source model of the next component, in component order (repeat once "
                        "per component)")
    g.add_argument("--teacher-model-arg", action=_Teacher, type=common.model_arg,
                   metavar="KEY=VALUE", help="keyword argument of the last --teacher-model")
    g.add_argument("--teacher-weights", action=_Teacher, metavar="FILE",
                   help="state_dict of the last --teacher-model")
    p.set_defaults(teachers=[])
    p.add_argument("--batch-size", type=common.positive_int, default=64, metavar="N")
    p.add_argument("--seed", type=common.seed, default=0)
    common.add_force(p)


def _teachers(args: argparse.Namespace, model) -> list | None:
    """The ``--teacher-model`` modules, each for its component's classes and input format."""
    from mdafx import api
    from mdafx.models import build_source

    if not args.teachers:
        return None
    parts = model.metadata.get("components") or [model.metadata]
    if not isinstance(parts, list) or not all(isinstance(part, dict) for part in parts):
        raise common.CliError(f"{args.model_file}: malformed component list in its metadata")
    if len(args.teachers) != len(parts):
        raise common.CliError(f"{len(args.teachers)} --teacher-model for {len(parts)} "
                              f"component(s) of {args.model_file}; give one per component, in "
                              "component order")
    shared = (api.InputFormat.from_dict(model.metadata["input"])
              if isinstance(model, api.Component) else model.input_format)
    teachers = []
    for k, (teacher, part) in enumerate(zip(args.teachers, parts)):
        recorded = part.get("num_classes_source")
        n = (recorded if isinstance(recorded, int) and not isinstance(recorded, bool)
             and recorded > 0 else DEFAULT_TEACHER_CLASSES)
        classes = [c for c in part.get("classes") or [] if isinstance(c, int)]
        if classes and max(classes) >= n:
            raise common.CliError(f"{args.model_file} component {k}: its classes {classes} are "
                                  f"not logits of a {n}-class source; pass --teacher-model-arg "
                                  "num_classes=N")
        fmt = api.InputFormat.from_dict(part["input"]) if part.get("input") else shared
        teachers.append(build_source(teacher["model"], n, teacher["model_args"],
                                     teacher["weights"], fmt))
    return teachers


def run(args: argparse.Namespace) -> int:
    if args.eval is None and args.holdout == 0:
        raise common.UsageError("give --holdout > 0 or --eval DIR: accuracy is reported on "
                                "images the fine-tuning does not train on")
    if args.augment and args.eval is None:
        raise common.UsageError("--augment needs --eval DIR (a held-out share of --data would "
                                "be augmented too)")
    common.require_files(model=args.model_file, teacher_weights=[t["weights"]
                                                                 for t in args.teachers])
    common.require_dirs(data=args.data, eval=args.eval)
    common.check_outputs(args, [args.output], [args.model_file, args.data, args.eval,
                                               *[t["weights"] for t in args.teachers]])
    from mdafx import api  # heavy: only when the command runs (`--help` stays light)

    model = api.load(args.model_file)
    teachers = _teachers(args, model)
    fmt = (api.InputFormat.from_dict(model.metadata["input"])
           if isinstance(model, api.Component) else model.input_format)
    train = api.open_images(args.data, fmt, augment=args.augment)
    held = api.open_images(args.eval, fmt) if args.eval else None
    tuned, report = api.finetune(model, train, epochs=args.epochs, teachers=teachers, lr=args.lr,
                                 temperature=args.temperature, alpha=args.alpha,
                                 holdout=args.holdout, eval_dataset=held,
                                 batch_size=args.batch_size, seed=args.seed)
    record = {**tuned.metadata["finetune"], "from": str(args.model_file),
              "data": str(Path(args.data).resolve()), "augment": args.augment,
              "eval": str(Path(args.eval).resolve()) if args.eval else None,
              "teacher_models": args.teachers or None}
    api.save(tuned, args.output, overwrite=args.force, metadata={"finetune": record})

    on = args.eval or f"{args.holdout:g} of {args.data} held out"
    common.emit_json(args, {"command": "finetune", "output": str(args.output),
                            "evaluated_on": on, **vars(report)})
    rows = [["accuracy before", common.pct(report.acc_before)],
            ["accuracy after", common.pct(report.acc_after)],
            ["held-out images", report.eval_images], ["training images", report.train_images],
            ["epochs / steps", f"{report.epochs} / {report.steps}"],
            ["loss per epoch", " ".join(f"{v:.3f}" for v in report.epoch_losses)],
            ["teachers", f"{report.teachers} ("
                         + ("--teacher-model" if teachers else "the model itself") + ")"],
            ["time", f"{report.seconds:.1f} s"]]
    common.say(args, *common.table(rows, ["fine-tuning (distillation)", ""]))
    common.say(args, f"accuracy {common.pct(report.acc_before)} -> "
                     f"{common.pct(report.acc_after)} on {on}; wrote {args.output}", final=True)
    return common.EXIT_OK
