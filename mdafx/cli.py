"""The ``mdafx`` command line: one subcommand per step of MDA (MDA.md), mirroring ``mdafx.api``.

::

    mdafx analyse      model + ImageFolder data       -> contribution profile (.pt), holding out
                       (alias: mdafx profile)            a calibration split (--holdout 0.1)
    mdafx disassemble  model + profile + --task ...   -> one component file (.mdafx) per task;
                       [--max-drop/--max-params/--max-macs] [--reestimate-norms]: thresholds
                       searched on the calibration split, norms re-estimated (training-free)
    mdafx finetune     model file + data + --epochs   -> the same model, distilled from its
                                                         sources (optional, explicit)
    mdafx assemble     component files [--calibrate]  -> one assembled model file (.mdafx)
    mdafx export       model file                     -> ONNX, checked against onnxruntime
    mdafx evaluate     model file or --model + data   -> per-class accuracy table
    mdafx inspect      model [+ profile + --task]     -> per-pass graph dumps (.txt, .dot, .svg)
    mdafx routes       model + profile + --classes    -> decision-route table and SVG picture
    mdafx demo         nothing                        -> the whole pipeline on synthetic data

Models: ``--model`` is a torchvision classifier name (``resnet18``), an ``mdafx.models`` factory
(``tiny_cnn``, ``vgg_cifar``, ``resnet_cifar``, or ``tiny``/``vgg``/``resnet20``) or
``package.module:callable`` (the current directory is importable) returning an ``nn.Module``.
``--model-arg KEY=VALUE`` passes keyword arguments to it, ``--num-classes`` the number of logits,
and ``--weights`` is a ``state_dict`` written by ``torch.save`` (read with ``weights_only=True``).

Data: ``--data DIR`` is an ImageFolder root (``DIR/<class>/<image>``, classes in sorted folder
order) decoded by :func:`mdafx.data.load_imagefolder` (images converted to RGB; 16-bit and float
images are refused) and normalised with ``--mean``/``--std`` (default CIFAR-10's). Images must
already have the model's ``--input-size``. Class names on the command line may be names or indices.

Profiles: ``analyse`` stores, beside the contributions, the model, weights and input format it
ran with; ``disassemble``/``routes``/``inspect`` take ``--input-size/--mean/--std`` from there unless
given, and refuse a profile whose model or weights differ (``Profile.check_matches``).

Components and assembled models are ``mdafx.serialize`` files: inference-only ATen graphs plus
metadata (source, classes, class names, thresholds, input format, params, MACs, scales, the
source model's spec and weights path, calibration and search results). ``finetune`` trains such
a graph after ``mdafx.serialize.lift_batch_norms`` has turned its eval-mode batch-norm calls back
into BatchNorm modules (batch statistics while training, as in the source). ``assemble``
rebuilds :class:`mdafx.api.Component` objects from them; its ``parallel`` layout works on them
directly, the ``merged`` layout (alignment padding) rewrites module-level graphs, which it rebuilds
from the source model and pruning plan recorded in each file (checked against the file).
``--calibrate`` must be a calibration split, never the test split (MDA 2.1).

Outputs are written atomically and an existing output is refused unless ``--force``.

Exit codes: 0 success; 1 an mdafx error (printed as ``mdafx: error: <message>``, with the
traceback only under ``--debug``); 2 a usage error; 130 interrupted.

Heavy imports (torch, torchvision) happen inside the commands, so ``--help`` and usage errors are
instant.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import html
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mdafx.errors import MdafxError, PreconditionError

__all__ = ["main", "CliError", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "mdafx"
CLI_PROFILE_KEY = "mdafx_cli"   # what `analyse` adds to a profile file (Profile.load ignores it)
_MDAFX_FACTORIES = ("tiny_cnn", "vgg_cifar", "resnet_cifar")


class CliError(MdafxError):
    """A command-line input is unusable: a missing or corrupt file, a name, a data set."""


class _Usage(Exception):
    """A usage error found after parsing; reported by the subcommand's parser (exit 2)."""


# =============================================================================== argument types

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _threshold(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


def _holdout(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


def _fraction(text: str) -> float:
    """A share of the source, ``0.5`` or ``50%``."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.5) or a percentage (50%), "
                                         f"got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1] (or (0%, 100%]), got {text!r}")
    return value


def _points(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0 percentage points, got {text!r}")
    return value


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    h = int(match.group(1))
    w = int(match.group(2) or h)
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return (h, w)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"give 1 or 3 values, got {len(values)}")
    return values * 3 if len(values) == 1 else values


def _model_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def _names(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names or indices, "
                                         f"got {text!r}")
    return items


# =============================================================================== parser

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of errors")
    p.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS,
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars (they are shown only on a terminal anyway)")


def _add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, metavar="NAME|MODULE:CALLABLE",
                   help="torchvision name, mdafx.models name (tiny_cnn, vgg_cifar, resnet_cifar) "
                        "or package.module:callable returning an nn.Module")
    g.add_argument("--model-arg", type=_model_arg, action="append", default=[],
                   metavar="KEY=VALUE", help="keyword argument for the model factory "
                                             "(Python literal; repeatable)")
    g.add_argument("--weights", metavar="FILE",
                   help="state_dict file (torch.save); default: the factory's initial weights")
    g.add_argument("--num-classes", type=_positive_int, metavar="N",
                   help="number of logits (default: the class count of the data or profile, "
                        "else the factory's default)")
    _add_format(g)


def _add_format(g) -> None:
    where = "the profile's or model file's, else"
    g.add_argument("--input-size", type=_size, metavar="N|HxW",
                   help=f"model input height and width (default: {where} 32)")
    g.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                   help=f"per-channel mean of [0,1] pixels (default: {where} CIFAR-10's)")
    g.add_argument("--std", type=_floats, metavar="S[,S,S]",
                   help=f"per-channel std of [0,1] pixels (default: {where} CIFAR-10's)")


def _add_thresholds(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("component locating thresholds (MDA section 1.3)")
    for flag, default in (("--alpha-conv", 0.3), ("--beta-conv", 0.2), ("--alpha-linear", 0.4),
                          ("--beta-linear", 0.3)):
        layer, which = flag[2:].split("-")[::-1]
        g.add_argument(flag, type=_threshold, default=default, metavar=which.upper(),
                       help=f"{layer} {which} in [0, 1) (default {default})")


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace existing outputs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Model Disassembling and Assembling (MDA) with torch.fx.",
        epilog="Run 'mdafx <command> --help' for a command's options. Exit codes: 0 ok, "
               "1 error, 2 usage error, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, func, help_, aliases=()):
        p = sub.add_parser(name, aliases=list(aliases), help=help_, description=help_)
        p.set_defaults(func=func, parser=p)
        _add_common(p)
        return p

    p = command("analyse", cmd_analyse, "Profile a model on data: per-class channel "
                "contributions of every weighted layer (MDA 1.1-1.2).", aliases=["profile"])
    _add_model(p)
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root (training split)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="profile file to write")
    p.add_argument("--per-class", type=_positive_int, metavar="N",
                   help="most confident samples per class (default: 1%% of the class, at least 1)")
    p.add_argument("--holdout", type=_holdout, default=0.1, metavar="F",
                   help="share of every class held out of profiling as the calibration split "
                        "that 'disassemble --max-drop/--reestimate-norms' and 'finetune' use "
                        "(recorded in the profile; 0 holds out nothing; default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    _add_force(p)

    p = command("disassemble", cmd_disassemble, "Cut the component of each task out of a "
                "profiled model (MDA 1.3-1.4).")
    _add_model(p)
    p.add_argument("--profile", required=True, metavar="FILE", help="profile from 'mdafx analyse'")
    p.add_argument("--task", required=True, action="append", type=_names, metavar="A,B,...",
                   help="classes of one task (names or indices, in output order); repeatable")
    p.add_argument("--name", metavar="SOURCE",
                   help="source name recorded in the components (default: weights file stem)")
    p.add_argument("-o", "--output", required=True, metavar="DIR|FILE",
                   help="directory for one <task>.mdafx per task, or a .mdafx file for one task")
    _add_thresholds(p)
    g = p.add_argument_group(
        "accuracy-targeted thresholds and norm re-estimation (training-free, issue #6)",
        "With a budget, the thresholds above are the base that a grid of multipliers scales "
        "(conv x0.1..1.25 times linear x0/0.1/1), scored on calibration images of the task; the "
        "smallest component meeting the budget is written. Without --calibrate the calibration "
        "images are the split 'analyse --holdout' kept out of profiling.")
    g.add_argument("--max-drop", type=_points, metavar="PTS",
                   help="at most PTS percentage points below the source's accuracy on the "
                        "task's calibration images (with --max-params/--max-macs alone: the "
                        "most accurate component within them)")
    g.add_argument("--max-params", type=_fraction, metavar="F",
                   help="at most this share of the source's parameters (0.5 or 50%%)")
    g.add_argument("--max-macs", type=_fraction, metavar="F",
                   help="at most this share of the source's multiply-accumulates")
    g.add_argument("--reestimate-norms", action="store_true",
                   help="re-estimate BatchNorm statistics of each component on calibration "
                        "images of every class (forward passes only)")
    g.add_argument("--calibrate", metavar="DIR",
                   help="ImageFolder of calibration images, disjoint from the profiled ones "
                        "(default: the profile's held-out split); never the test split")
    g.add_argument("--norm-images", type=_positive_int, default=50, metavar="N",
                   help="calibration images per class that re-estimate the norms (default 50)")
    g.add_argument("--search-table", metavar="FILE",
                   help="write every task's explored trade-off (markdown) to FILE")
    g.add_argument("--search-plot", metavar="FILE.svg",
                   help="plot every task's trade-off (calibration accuracy vs MACs) to FILE.svg")
    _add_force(p)

    p = command("assemble", cmd_assemble, "Assemble component files into one classifier "
                "(MDA 2).")
    p.add_argument("components", nargs="+", metavar="COMPONENT",
                   help="component (or assembled) model files, at least two")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="model file to write")
    p.add_argument("--layout", choices=("parallel", "merged"), default="parallel",
                   help="parallel branches (any architectures; default) or one merged network")
    p.add_argument("--calibrate", metavar="DIR",
                   help="ImageFolder of a calibration split for logit scaling (MDA 2.1); never "
                        "the test split. Without it logits are not scaled")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    _add_force(p)

    p = command("export", cmd_export, "Export a model file to ONNX, verified with the ONNX "
                "checker and onnxruntime parity at batch 1 and 3.")
    p.add_argument("model_file", metavar="MODEL", help="component or assembled model file")
    p.add_argument("-o", "--output", metavar="FILE", help="ONNX file (default: MODEL with .onnx)")
    p.add_argument("--opset", type=_positive_int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--latency", action="store_true",
                   help="also measure the median onnxruntime latency at batch 1")
    _add_force(p)

    p = command("finetune", cmd_finetune, "Optional, explicit: fine-tune a component or "
                "assembled model file for a few epochs on its classes, with its source model(s) "
                "as distillation teachers; reports the accuracy before and after. Not part of "
                "MDA's training-free path.")
    p.add_argument("model_file", metavar="MODEL", help="component or assembled model file "
                                                       "(made by 'mdafx disassemble/assemble')")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder training split; folders are matched to the model's classes "
                        "by name, others are ignored")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="model file to write")
    p.add_argument("--epochs", required=True, type=_positive_int, metavar="N")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate, cosine-decayed "
                                                          "(default 0.01)")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature "
                                                                  "(default 4)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the label cross-entropy; 1-ALPHA weighs the teachers' "
                        "distillation term (default 0.5)")
    p.add_argument("--holdout", type=_holdout, default=0.1, metavar="F",
                   help="share of every class of --data held out to report accuracy before and "
                        "after (default 0.1)")
    p.add_argument("--eval", metavar="DIR",
                   help="report accuracy on this ImageFolder instead of a held-out share")
    p.add_argument("--teacher-weights", action="append", metavar="FILE",
                   help="state_dict of each component's source model, in component order "
                        "(default: the weights recorded in the file; repeatable)")
    p.add_argument("--no-augment", action="store_true",
                   help="no random crop and flip on the training images")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    _add_force(p)

    p = command("evaluate", cmd_evaluate, "Per-class and overall accuracy of a model file, or of "
                "--model/--weights, on an ImageFolder (folders matched to classes by name).")
    p.add_argument("model_file", nargs="?", metavar="MODEL", help="component or assembled file")
    _add_model(p, required=False)
    p.add_argument("--class-names", type=_names, metavar="A,B,...",
                   help="with --model: names of the logits (default: the data's folder names)")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root (test split)")
    p.add_argument("--batch-size", type=_positive_int, default=256)

    p = command("inspect", cmd_inspect, "Dump the graph before and after each pass of "
                "disassembly (text tables, DOT, and SVG when Graphviz is installed).")
    _add_model(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="dump directory (files go to DIR/<model>/)")
    p.add_argument("--profile", metavar="FILE", help="profile, to prune for --task")
    p.add_argument("--task", type=_names, metavar="A,B,...", help="task to disassemble")
    p.add_argument("--density", type=float, metavar="F",
                   help="without a task: keep a random share F of the channel groups")
    p.add_argument("--seed", type=int, default=0, help="seed of --density (default 0)")
    p.add_argument("--verify", action="store_true", help="lint and run the graph after each pass")
    _add_thresholds(p)
    _add_force(p)

    p = command("routes", cmd_routes, "Decision routes of two classes: the input channels of "
                "every weighted layer each class relies on, shared and exclusive (MDA 4).")
    _add_model(p)
    p.add_argument("--profile", required=True, metavar="FILE", help="profile from 'mdafx analyse'")
    p.add_argument("--classes", required=True, type=_names, metavar="A,B",
                   help="the two classes to compare (names or indices)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.svg", help="SVG picture")
    _add_thresholds(p)
    _add_force(p)

    p = command("demo", cmd_demo, "Run the whole pipeline on a synthetic data set: train two "
                "small sources, disassemble, calibrate, assemble, export (no download; one "
                "thread unless --threads).")
    p.add_argument("--out", metavar="DIR", help="output directory (default: a new temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=_positive_int, default=4, help="training epochs (default 4)")
    p.add_argument("--train-per-class", type=_positive_int, default=150, metavar="N",
                   help="training images per class (default 150)")
    p.add_argument("--no-images", action="store_true",
                   help="do not write the data splits as ImageFolder PNGs")
    _add_force(p)
    return parser


def _version() -> str:
    from mdafx import __version__

    return __version__


# =============================================================================== entry point

def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    debug = getattr(args, "debug", False)
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args) or EXIT_OK
    except _Usage as e:
        args.parser.print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`mdafx ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as e:
        message = _known_error(e)
        if message is None:  # a bug: always show where
            traceback.print_exc()
            print(f"{PROG}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_ERROR
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def _known_error(e: BaseException) -> str | None:
    """The message of an expected failure (bad input, refused output), or None for a bug."""
    if isinstance(e, MdafxError):
        return str(e)
    from mdafx.passes.contributions import ProfileMismatchError

    if isinstance(e, ProfileMismatchError):
        return f"the profile does not match the model: {e}"
    if isinstance(e, FileExistsError):
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}".replace(
            "pass overwrite=True", "pass --force")
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return None


def _brief(e: BaseException) -> str:
    """``Type: first line of the message`` (torch's load errors run to a page)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


def _table(rows, headers, **kwargs) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="simple", **kwargs)


# =============================================================================== outputs

def _refuse_existing(paths, force: bool) -> None:
    """Fail fast (before any work) when an output exists and ``--force`` was not given."""
    for path in paths:
        if path is not None and os.path.lexists(path) and not force:
            raise CliError(f"{path}: already exists; pass --force to replace it")


@contextlib.contextmanager
def _atomic(path: Path, force: bool):
    from mdafx.serialize import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=force) as tmp:
        yield tmp


@contextlib.contextmanager
def _all_or_nothing():
    """Collect the outputs a command writes; remove them all if a later step fails."""
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


# =============================================================================== models

def _resolve_factory(spec: str) -> Callable[..., Any]:
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise CliError(f"--model {spec}: expected package.module:callable")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            obj = importlib.import_module(module_name)
        except Exception as e:  # ImportError, or whatever the module raises on import
            raise CliError(f"--model {spec}: cannot import {module_name!r}: {_brief(e)}") from e
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise CliError(f"--model {spec}: {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise CliError(f"--model {spec}: {attr!r} is not callable")
        return obj
    from mdafx import models

    if spec in _MDAFX_FACTORIES:
        return getattr(models, spec)
    if spec in models.MODELS:
        return models.MODELS[spec]
    import torchvision

    if spec in torchvision.models.list_models(module=torchvision.models):
        return functools.partial(torchvision.models.get_model, spec, weights=None)
    known = ", ".join(sorted({*_MDAFX_FACTORIES, *models.MODELS}))
    raise CliError(f"--model {spec}: unknown model; use a torchvision classifier name "
                   f"(e.g. resnet18), an mdafx model ({known}) or package.module:callable")


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(spec: str, num_classes: int | None = None, model_args=(),
                weights: str | None = None):
    """An ``nn.Module`` in eval mode from ``--model``, ``--model-arg``, ``--num-classes`` and
    ``--weights`` (module docstring)."""
    import torch

    factory = _resolve_factory(spec)
    kwargs = dict(model_args)
    if num_classes is not None and "num_classes" not in kwargs and _accepts(factory, "num_classes"):
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as e:
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise CliError(f"--model {spec}: calling it with ({call}) failed: {_brief(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"--model {spec}: returned a {type(model).__name__}, not a torch nn.Module")
    if weights is not None:
        load_weights(model, weights, spec)
    return model.eval()


def load_weights(model, path: str | os.PathLike, spec: str = "the model") -> None:
    """Load a ``state_dict`` file into ``model``, naming the first key that does not fit."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CliError(f"{path}: weights file not found" if not path.exists()
                       else f"{path}: weights path is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CliError(f"{path}: cannot read the weights (corrupt, truncated, or not a "
                       f"torch.save file of tensors): {_brief(e)}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CliError(f"{path}: not a state_dict (a dict of tensors); got "
                       f"{type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    hint = "check --model, --model-arg and --num-classes"
    for key, want in expected.items():
        if key not in state:
            raise CliError(f"{path}: weights do not fit --model {spec}: key {key!r} "
                           f"(shape {list(want.shape)}) is missing from the file; {hint}")
        if tuple(state[key].shape) != tuple(want.shape):
            raise CliError(f"{path}: weights do not fit --model {spec}: {key!r} has shape "
                           f"{list(state[key].shape)} in the file but {list(want.shape)} in the "
                           f"model; {hint}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CliError(f"{path}: weights do not fit --model {spec}: the file has key "
                       f"{extra[0]!r} that the model lacks; {hint}")
    model.load_state_dict(state, strict=True)


def _input_format(args, fallback: dict | None = None):
    """``InputFormat`` from ``--input-size/--mean/--std``, else ``fallback``, else CIFAR-10's
    statistics at 32x32."""
    from mdafx.assemble import InputFormat
    from mdafx.data import CIFAR10_MEAN, CIFAR10_STD

    base = InputFormat.from_dict(fallback) if fallback else InputFormat(
        (32, 32), 3, CIFAR10_MEAN, CIFAR10_STD)
    mean = args.mean or base.mean
    std = args.std or base.std
    if any(s <= 0 for s in std):
        raise _Usage(f"--std must be positive, got {list(std)}")
    return InputFormat(tuple(args.input_size or base.size), 3, tuple(mean), tuple(std))


def _example(fmt):
    import torch

    return torch.zeros(1, fmt.channels, *fmt.size)


def _traced(model, fmt, num_classes: int | None, spec: str):
    """Trace ``model`` for ``fmt`` and check its output is ``[batch, num_classes]`` logits."""
    from mdafx.api import trace
    from mdafx.ir import shape_of

    gm = trace(model, _example(fmt))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    shape = shape_of(out) if hasattr(out, "meta") else None
    if shape is None or len(shape) != 2:
        raise CliError(f"--model {spec}: the output is {shape or 'not a tensor'}, not "
                       f"[batch, classes] logits")
    if num_classes is not None and shape[1] != num_classes:
        raise CliError(f"--model {spec} outputs {shape[1]} logits but there are {num_classes} "
                       f"classes; pass --num-classes (or --model-arg) to match")
    return gm


def _source_name(args) -> str:
    if getattr(args, "name", None):
        return args.name
    return Path(args.weights).stem if args.weights else args.model


# =============================================================================== data

def load_images(path: str | os.PathLike, size: tuple[int, int]):
    """Decoded ImageFolder (``mdafx.data.ImageArrays``) whose images are ``size`` (H, W)."""
    from mdafx.data import load_imagefolder

    root = Path(path)
    arrays = load_imagefolder(root)
    h, w = arrays.images.shape[1:3]
    if (h, w) != tuple(size):
        raise CliError(f"{root}: images are {w}x{h} (width x height) but the model takes "
                       f"{size[1]}x{size[0]} (--input-size / the model file's input format); "
                       "resize the data set first")
    return arrays


def _dataset(arrays, fmt):
    from mdafx.data import ArrayDataset

    return ArrayDataset(arrays.images, arrays.labels, mean=fmt.mean, std=fmt.std)


# =============================================================================== profiles

def save_profile(prof, path: Path, force: bool, record: dict) -> None:
    """``Profile.to_dict`` plus ``record`` (model, weights, input format, data) under
    ``CLI_PROFILE_KEY``, written atomically."""
    import torch

    record = json.loads(json.dumps(record))  # plain types only: the file is read weights_only
    with _atomic(path, force) as tmp:
        torch.save({**prof.to_dict(), CLI_PROFILE_KEY: record}, tmp)


def load_profile(path: str | os.PathLike):
    """``(Profile, record)``; ``record`` is what ``analyse`` stored about the run (may be {})."""
    import torch
    from mdafx.passes.contributions import Profile

    path = Path(path)
    if not path.is_file():
        raise CliError(f"{path}: profile file not found")
    try:
        prof = Profile.load(path, mmap=True)
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CliError(f"{path}: cannot read the profile: {_brief(e)}") from e
    record = raw.get(CLI_PROFILE_KEY) if isinstance(raw, dict) else None
    return prof, record if isinstance(record, dict) else {}


def _check_profile(prof, gm, path, spec) -> None:
    from mdafx.passes.contributions import ProfileMismatchError

    try:
        prof.check_matches(gm)
    except ProfileMismatchError as e:
        raise CliError(f"{path} was not computed on --model {spec} with these weights: {e}") from e


def _thresholds(args):
    from mdafx.passes.locate import Thresholds

    return Thresholds(args.alpha_conv, args.beta_conv, args.alpha_linear, args.beta_linear)


def _profiled_source(args, prof, record: dict, num_classes: int):
    """The traced ``--model`` (and its input format) that ``prof`` must have been computed on."""
    fmt = _input_format(args, record.get("input"))
    model = build_model(args.model, num_classes, args.model_arg, args.weights)
    gm = _traced(model, fmt, num_classes, args.model)
    _check_profile(prof, gm, args.profile, args.model)
    return gm, fmt


# =============================================================================== analyse

def cmd_analyse(args) -> int:
    output = Path(args.output)
    _refuse_existing([output], args.force)
    _check_input_files(weights=args.weights)
    fmt = _input_format(args)
    arrays = load_images(args.data, fmt.size)
    names = arrays.class_names
    num_classes = args.num_classes or len(names)
    if num_classes != len(names):
        raise CliError(f"the model has {num_classes} classes (--num-classes) but {args.data} has "
                       f"{len(names)} class folders; profiling needs samples of every class")
    from mdafx.api import profile

    model = build_model(args.model, num_classes, args.model_arg, args.weights)
    gm = _traced(model, fmt, num_classes, args.model)
    labels = arrays.labels
    selection, held_out = None, None
    if args.holdout > 0:
        from mdafx.data import split_per_class

        selection, held_out = split_per_class(labels, [1.0 - args.holdout, args.holdout],
                                              seed=args.seed)
    start = time.perf_counter()
    prof = profile(gm, _dataset(arrays, fmt), names, per_class=args.per_class,
                   indices=None if selection is None else selection.tolist(),
                   batch_size=args.batch_size, progress=_progress(args))
    record = {"model": args.model, "model_args": [list(a) for a in args.model_arg],
              "weights": str(args.weights) if args.weights else None, "input": fmt.to_dict(),
              "data": str(Path(args.data).resolve())}
    if held_out is not None:
        # the indices themselves, not only (holdout, seed): disassemble checks them against the
        # folder it reloads, and they stay valid if split_per_class ever changes
        record["calibration"] = {"holdout": args.holdout, "seed": args.seed,
                                 "images": int(len(labels)), "indices": held_out.tolist(),
                                 "sha256": _images_digest(arrays.images, held_out)}
    save_profile(prof, output, args.force, record)
    counts = [int((labels == c).sum()) for c in range(len(names))]
    held = ([int((labels[held_out] == c).sum()) for c in range(len(names))]
            if held_out is not None else [0] * len(names))
    rows = [[i, n, c, s, h] for i, (n, c, s, h)
            in enumerate(zip(names, counts, prof.samples_per_class, held))]
    rows.append(["", "total", sum(counts), sum(prof.samples_per_class), sum(held)])
    _say(_table(rows, ["#", "class", "images", "profiled", "held out (calibration)"],
                colalign=("right", "left")),
         f"{len(prof.layers)} weighted layers profiled in {time.perf_counter() - start:.1f} s",
         f"wrote {output}")
    return EXIT_OK


def _images_digest(images, indices) -> str:
    """SHA-256 of the decoded images at ``indices`` (in that order)."""
    import hashlib

    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(images[np.asarray(indices)]).tobytes()).hexdigest()


def _check_input_files(**paths) -> None:
    """Fail fast, before heavy imports, on input files that do not exist."""
    for flag, path in paths.items():
        if path is not None and not Path(path).is_file():
            what = "not found" if not Path(path).exists() else "is not a file"
            raise CliError(f"{path}: {flag} file {what}")


# =============================================================================== disassemble

def _component_paths(output: Path, tasks: list[list[str]]) -> list[Path]:
    """``-o``: a ``.mdafx`` file for one task, else a directory of ``<class>-<class>.mdafx``."""
    if output.suffix and not output.is_dir():
        if len(tasks) != 1:
            raise _Usage(f"-o {output} is a file but there are {len(tasks)} tasks; give a "
                         "directory")
        return [output]
    names = ["-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", t) for t in task) + ".mdafx"
             for task in tasks]
    if len(set(names)) != len(names):
        raise _Usage("two tasks have the same classes in the same order")
    return [output / n for n in names]


def _budget(args):
    """The ``mdafx.search.Budget`` of ``--max-drop/--max-params/--max-macs``, or None."""
    if (args.max_drop, args.max_params, args.max_macs) == (None, None, None):
        return None
    from mdafx.search import Budget

    return Budget(args.max_drop, args.max_params, args.max_macs)


def _calibration_split(args, record: dict, fmt, class_names: list[str]):
    """``(dataset, indices, description)``: the calibration images, labelled with the profile's
    class indices: ``--calibrate DIR``, else the split ``analyse`` held out (checked unchanged)."""
    import numpy as np

    from mdafx.data import ArrayDataset

    if args.calibrate:
        arrays = load_images(args.calibrate, fmt.size)
        position = {n: i for i, n in enumerate(class_names)}
        unknown = [n for n in arrays.class_names if n not in position]
        if unknown:
            raise CliError(f"{args.calibrate}: class folders {', '.join(unknown)} are not classes "
                           f"of the profile ({', '.join(class_names)})")
        labels = np.asarray([position[arrays.class_names[y]] for y in arrays.labels.tolist()],
                            dtype=np.int64)
        ds = ArrayDataset(arrays.images, labels, mean=fmt.mean, std=fmt.std)
        return ds, list(range(len(labels))), f"{args.calibrate} ({len(labels)} images)"
    held = record.get("calibration")
    if not held:
        raise CliError(f"{args.profile} holds no calibration split (analysed with --holdout 0 or "
                       "by an older mdafx); pass --calibrate DIR with images the profile did not "
                       "select from")
    data = record.get("data")
    if not data or not Path(data).is_dir():
        raise CliError(f"{args.profile}: its calibration split was held out of {data}, which is "
                       "not a directory any more; pass --calibrate DIR")
    arrays = load_images(data, fmt.size)
    indices = [int(i) for i in held["indices"]]
    if (len(arrays) != held["images"] or list(arrays.class_names) != list(class_names)
            or _images_digest(arrays.images, indices) != held["sha256"]):
        raise CliError(f"{data} changed since {args.profile} was analysed (its held-out "
                       "calibration images differ); run analyse again or pass --calibrate DIR")
    return (_dataset(arrays, fmt), indices,
            f"{len(indices)} images held out of {data} (analyse --holdout {held['holdout']})")


def _first_per_class(labels, indices: list[int], per_class: int) -> list[int]:
    """The first ``per_class`` of ``indices`` of every class, in their order."""
    taken: dict[int, int] = {}
    out = []
    for i in indices:
        y = int(labels[i])
        if taken.get(y, 0) < per_class:
            taken[y] = taken.get(y, 0) + 1
            out.append(i)
    return out


def cmd_disassemble(args) -> int:
    budget = _budget(args)
    calibrating = budget is not None or args.reestimate_norms
    if (args.search_table or args.search_plot) and budget is None:
        raise _Usage("--search-table/--search-plot need a budget (--max-drop, --max-params or "
                     "--max-macs)")
    if args.calibrate and not calibrating:
        raise _Usage("--calibrate goes with a budget (--max-drop, --max-params, --max-macs) or "
                     "--reestimate-norms")
    _check_input_files(weights=args.weights, profile=args.profile)
    from mdafx.api import channel_groups, disassemble, locate, resolve_classes
    from mdafx.ir import count_macs
    from mdafx.serialize import save_model

    prof, record = load_profile(args.profile)
    num_classes = args.num_classes or len(prof.class_names)
    tasks = [[prof.class_names[c] for c in resolve_classes(task, prof.class_names, num_classes)]
             for task in args.task]  # every name checked before any work
    paths = _component_paths(Path(args.output), tasks)
    table_path = Path(args.search_table) if args.search_table else None
    plot_path = Path(args.search_plot) if args.search_plot else None
    _refuse_existing([*paths, table_path, plot_path], args.force)
    gm, fmt = _profiled_source(args, prof, record, num_classes)
    cg = channel_groups(gm)
    source = _source_name(args)
    shape = (1, fmt.channels, *fmt.size)
    source_macs = count_macs(gm, shape)

    # every component is cut (and searched) before the first file is written: a budget that
    # cannot be met leaves no output
    results = []
    if calibrating:
        from mdafx.search import DEFAULT_SCALES, Budget, scale_text, search_thresholds

        calib_ds, calib_idx, calib_text = _calibration_split(args, record, fmt,
                                                             list(prof.class_names))
        norm_idx = _first_per_class(calib_ds.labels, calib_idx, args.norm_images)
        for task in tasks:
            # without a budget: the given thresholds only (a one-candidate search), scored on
            # calibration images so that the table shows what re-estimation gave
            res = search_thresholds(
                gm, prof, task, calib_ds, calib_idx,
                budget or Budget(max_acc_drop=100.0), class_names=prof.class_names,
                reestimate=args.reestimate_norms, reestimate_indices=norm_idx,
                scales=DEFAULT_SCALES if budget else (1.0,), base=_thresholds(args), cg=cg,
                source=source, progress=_progress(args))
            results.append(res)
        unmet = [(t, r) for t, r in zip(tasks, results) if not r.met]
        if unmet:
            raise CliError("; ".join(f"task {','.join(t)}: {r.message}" for t, r in unmet)
                           + ". Nothing written; relax the budget."
                           + "".join(f"\n\nexplored thresholds of {','.join(t)}:\n{r.table()}"
                                     for t, r in unmet))
        comps = [r.component for r in results]
    else:
        masks = locate(gm, prof, _thresholds(args), cg)
        comps = [disassemble(gm, masks, task, class_names=prof.class_names, source=source,
                             cg=cg) for task in tasks]

    rows = []
    with _all_or_nothing() as written:
        for k, (comp, path) in enumerate(zip(comps, paths)):
            macs = count_macs(comp.module, shape)
            meta = {**comp.metadata, "kind": "component", "input": fmt.to_dict(),
                    "model": args.model, "model_args": [list(a) for a in args.model_arg],
                    "weights": str(Path(args.weights).resolve()) if args.weights else None,
                    "num_classes_source": num_classes, "macs": macs, "macs_source": source_macs}
            row = [",".join(comp.class_names), ",".join(map(str, comp.classes)),
                   f"{meta['params']:,} ({meta['params'] / meta['params_source']:.1%})",
                   f"{macs:,} ({macs / source_macs:.1%})",
                   f"{meta['channels_kept']}/{meta['channels_total']} "
                   f"({meta['channels_kept'] / max(1, meta['channels_total']):.0%})"]
            if results:
                res = results[k]
                meta["calibration"] = {"data": calib_text, "images": res.calib_images,
                                       "accuracy": res.candidate.accuracy,
                                       "source_accuracy": res.source_accuracy}
                if budget is None:  # one candidate at the given thresholds: not a search
                    meta.pop("search", None)
                row.append(f"{res.candidate.accuracy:.2%} ({res.source_accuracy:.2%})")
                if budget is not None:
                    row.append(scale_text(res.scale))
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(comp.module, path, meta, _example(fmt), overwrite=args.force)
            written.append(path)
            row.append(str(path))
            rows.append(row)
        if table_path is not None:
            text = "".join(f"## {','.join(t)}\n\n{r.table('github')}\n\n"
                           for t, r in zip(tasks, results))
            with _atomic(table_path, args.force) as tmp:
                Path(tmp).write_text(text)
            written.append(table_path)
        if plot_path is not None:
            from mdafx.search import tradeoff_svg

            svg = tradeoff_svg([(",".join(t), r) for t, r in zip(tasks, results)])
            with _atomic(plot_path, args.force) as tmp:
                Path(tmp).write_text(svg)
            written.append(plot_path)
    headers = ["task", "classes", "params (kept)", "MACs (kept)", "channel groups kept"]
    if results:
        headers.append("calib acc (source)")
        if budget is not None:
            headers.append("thresholds")
    headers.append("file")
    lines = [_table(rows, headers),
             f"source {source}: {num_classes} classes, {meta['params_source']:,} params, {source_macs:,} MACs; "
             + (f"budget {budget.describe()}; base " if budget is not None else "")
             + f"thresholds {_thresholds_text(args)}"]
    if results:
        lines.append(f"calibration: {calib_text}"
                     + (f"; norms re-estimated on {len(norm_idx)} of them" if
                        args.reestimate_norms else ""))
    for what, path in (("explored thresholds", table_path), ("trade-off plot", plot_path)):
        if path is not None:
            lines.append(f"{what}: {path}")
    _say(*lines)
    return EXIT_OK


def _thresholds_text(args) -> str:
    return (f"conv alpha {args.alpha_conv} beta {args.beta_conv}, "
            f"linear alpha {args.alpha_linear} beta {args.beta_linear}")


# =============================================================================== assemble

def load_component(path: str | os.PathLike):
    """An ``mdafx.api.Component`` from a component (or assembled) model file."""
    from mdafx.api import Component
    from mdafx.serialize import load_model

    path = Path(path)
    if not path.is_file():
        raise CliError(f"{path}: model file not found")
    loaded = load_model(path)
    meta = loaded.metadata
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CliError(f"{path}: not an mdafx component (its metadata has no class_names)")
    classes = meta.get("classes", list(range(len(names))))
    return Component(loaded.module, [int(c) for c in classes], names,
                     str(meta.get("source") or path.stem), (1, *loaded.input_shape[1:]), meta)


def calibrate(components, arrays, batch_size: int = 256):
    """Per-component logit scale factors (MDA 2.1) on ``arrays`` (decoded ImageFolder of a
    calibration split, never the test split; folders matched to classes by name), each branch
    fed as the assembled model feeds it. Returns ``(scales, info)``."""
    import torch
    from mdafx.assemble import InputAdapter, component_format
    from mdafx.training import predict
    from mdafx.passes.logit_scaling import calibrate_scales

    shared = component_format(components[0])
    ds = _dataset(arrays, shared)
    scales, info = [], {"samples": [], "fallbacks": []}
    for k, comp in enumerate(components):
        fmt = component_format(comp)
        index, positions, _ = _matched_indices(arrays, comp.class_names)
        if not index:
            raise CliError(f"the calibration data has no class folder of component {k} "
                           f"({comp.source}: {', '.join(comp.class_names)})")
        model = comp.module if fmt == shared else torch.nn.Sequential(
            InputAdapter(shared, fmt), comp.module)
        logits, _ = predict(model, ds.batches(batch_size, index))
        result = calibrate_scales(logits, torch.tensor(positions))
        scales.append(result.factors)
        info["samples"].append(len(index))
        info["fallbacks"].append({comp.class_names[c]: why for c, why in result.fallbacks.items()})
    return scales, info


def cmd_assemble(args) -> int:
    if len(args.components) < 2:
        raise _Usage("assembling needs at least two component files")
    output = Path(args.output)
    _refuse_existing([output], args.force)
    for path in args.components:
        _check_input_files(component=path)
    from mdafx.assemble import assemble
    from mdafx.serialize import save_model

    comps = [load_component(p) for p in args.components]
    if args.layout == "merged":
        comps = [_module_level(c, p) for c, p in zip(comps, args.components)]
    scales, calibration = None, None
    if args.calibrate:
        from mdafx.assemble import component_format

        arrays = load_images(args.calibrate, component_format(comps[0]).size)
        scales, calibration = calibrate(comps, arrays, args.batch_size)
        calibration["data"] = str(Path(args.calibrate).resolve())
    asm = assemble(comps, scales, layout=args.layout)
    meta = {**asm.metadata, "kind": "assembled", "calibration": calibration,
            "component_files": [str(p) for p in args.components]}
    save_model(asm.module, output, meta, _example(asm.input_format), overwrite=args.force)
    rows = []
    for i, entry in enumerate(asm.class_map):
        sources = "; ".join(f"#{s['component']} {s['source']}[{s['source_class']}]"
                            for s in entry["sources"])
        factors = ", ".join(f"{_scale(comps, scales, s):.4g}" for s in entry["sources"])
        rows.append([i, entry["name"], sources, factors])
    notes = []
    if calibration is None:
        notes.append("logits not calibrated (no --calibrate): components' logit scales differ")
    else:
        for k, fallbacks in enumerate(calibration["fallbacks"]):
            for name, why in fallbacks.items():
                notes.append(f"warning: component {k} class {name}: {why}")
    _say(_table(rows, ["output", "class", "sources (component source[class])", "scale"],
                colalign=("right",)),
         *notes,
         f"{asm.layout} layout, {len(comps)} components, {asm.params:,} params; wrote {output}")
    return EXIT_OK


def _module_level(comp, path):
    """``comp`` (from a component file) with its module-level graph, which alignment padding
    rewrites: the source model rebuilt from the file's metadata, pruned by the recorded plan,
    loaded with the file's weights (re-estimated or fine-tuned ones included), and checked to
    compute what the file computes."""
    import torch

    from mdafx.api import channel_groups, plan_from_dict, prune
    from mdafx.assemble import InputFormat

    meta = comp.metadata
    if (meta.get("kind") != "component" or not meta.get("plan") or not meta.get("model")
            or "num_classes_source" not in meta):
        raise CliError(f"{path}: the merged layout rebuilds each component from its source, so it "
                       "needs a component file written by 'mdafx disassemble' (which records the "
                       "source model and the pruning plan); use --layout parallel")
    weights = meta.get("weights")
    if weights is not None and not Path(weights).is_file():
        raise CliError(f"{path}: its source weights {weights} are not found; the merged layout "
                       "rebuilds the component from them (use --layout parallel)")
    fmt = InputFormat.from_dict(meta["input"])
    n = int(meta["num_classes_source"])
    try:
        model = build_model(meta["model"], n, [tuple(a) for a in meta.get("model_args", [])],
                            weights)
        gm = _traced(model, fmt, n, meta["model"])
    except CliError as e:
        raise CliError(f"{path}: rebuilding its source model: {e}") from e
    cg = channel_groups(gm)
    try:
        module = prune(gm, plan_from_dict(meta["plan"], cg), cg=cg)
        module.load_state_dict(comp.module.state_dict(), strict=True)
    except (PreconditionError, RuntimeError) as e:
        raise CliError(f"{path}: cannot rebuild the component from {meta['model']}: "
                       f"{_brief(e)}; use --layout parallel") from e
    module.eval()
    x = torch.randn(2, fmt.channels, *fmt.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rebuilt, saved = module(x), comp.module(x)
    if not torch.allclose(rebuilt, saved, rtol=1e-4, atol=1e-5 * float(saved.abs().max() + 1)):
        raise CliError(f"{path}: the component rebuilt from {meta['model']} differs from the file "
                       f"(max abs diff {float((rebuilt - saved).abs().max()):.3g}); use --layout "
                       "parallel")
    return dataclasses.replace(comp, module=module)


def _scale(comps, scales, source: dict) -> float:
    """The logit factor of one class-map source entry (1 without calibration)."""
    if scales is None:
        return 1.0
    comp = comps[source["component"]]
    return float(scales[source["component"]][comp.classes.index(source["source_class"])])


# =============================================================================== export

def cmd_export(args) -> int:
    model_file = Path(args.model_file)
    output = Path(args.output) if args.output else model_file.with_suffix(".onnx")
    _refuse_existing([output], args.force)
    _check_input_files(model=model_file)
    import torch
    from mdafx.export import export_onnx, onnx_latency
    from mdafx.serialize import load_model

    loaded = load_model(model_file)
    example = torch.zeros(1, *loaded.input_shape[1:], dtype=loaded.input_dtype)
    report = export_onnx(loaded.module, output, example, metadata=loaded.metadata,
                         check=not args.no_check, opset=args.opset, rtol=args.rtol,
                         atol=args.atol, overwrite=args.force)
    rows = [["file", str(report.path)], ["opset", report.opset],
            ["size", f"{report.file_size / 1024:.1f} KiB"],
            ["exporter", report.exporter + (f" ({report.fallback_reason})"
                                            if report.fallback_reason else "")]]
    for batch in sorted(report.max_abs_err):
        rows.append([f"parity batch {batch}", f"max abs err {report.max_abs_err[batch]:.2e}, "
                                              f"max rel err {report.max_rel_err[batch]:.2e}"])
    if not report.max_abs_err:
        rows.append(["parity", "not checked (--no-check)"])
    if args.latency:
        rows.append(["latency batch 1", f"{onnx_latency(output):.3f} ms (onnxruntime CPU)"])
    _say(_table(rows, ["onnx export", ""]))
    return EXIT_OK


# =============================================================================== finetune

def _teachers(loaded, args):
    """``[(teacher module, {student position: teacher logit})]`` rebuilt from the file's
    metadata: one per component; a class several components share is taught by the first."""
    meta = loaded.metadata
    from mdafx.assemble import InputAdapter, InputFormat

    if meta.get("kind") == "assembled":
        parts = meta.get("components") or []
        class_map = meta.get("class_map") or []
        maps: list[dict[int, int]] = [{} for _ in parts]
        for position, entry in enumerate(class_map):
            first = entry["sources"][0]
            maps[int(first["component"])][position] = int(first["source_class"])
    else:
        parts = [meta]
        maps = [dict(enumerate(int(c) for c in meta.get("classes") or []))]
    weights = args.teacher_weights or []
    if weights and len(weights) != len(parts):
        raise _Usage(f"{len(weights)} --teacher-weights for {len(parts)} components")
    student_fmt = InputFormat.from_dict(meta["input"])
    teachers = []
    for k, (part, class_map) in enumerate(zip(parts, maps)):
        where = f"{args.model_file}" + (f" component {k}" if len(parts) > 1 else "")
        if not part.get("model") or "num_classes_source" not in part:
            raise CliError(f"{where} does not record its source model (--model and class count; "
                           "made with the Python API or an older mdafx): fine-tune it in Python "
                           "with mdafx.finetune.finetune")
        path = weights[k] if weights else part.get("weights")
        if path is not None and not Path(path).is_file():
            raise CliError(f"{where}: source weights {path} not found; pass --teacher-weights")
        model = build_model(part["model"], int(part["num_classes_source"]),
                            [tuple(a) for a in part.get("model_args", [])], path)
        fmt = InputFormat.from_dict(part["input"])
        if fmt != student_fmt:
            import torch

            # the teacher sees the student's input converted to its own format
            model = torch.nn.Sequential(InputAdapter(student_fmt, fmt), model).eval()
        if class_map:
            teachers.append((model, class_map))
    return teachers


def cmd_finetune(args) -> int:
    output = Path(args.output)
    _refuse_existing([output], args.force)
    _check_input_files(model=args.model_file)
    if not 0.0 <= args.alpha <= 1.0:
        raise _Usage(f"--alpha must lie in [0, 1], got {args.alpha}")
    if args.temperature <= 0 or args.lr <= 0:
        raise _Usage("--temperature and --lr must be positive")
    import numpy as np

    from mdafx.assemble import InputFormat
    from mdafx.data import ArrayDataset, split_per_class
    from mdafx.finetune import finetune
    from mdafx.serialize import RESERVED_METADATA_KEYS, lift_batch_norms, load_model, save_model

    loaded = load_model(args.model_file)
    meta = loaded.metadata
    names = meta.get("class_names")
    if not isinstance(names, list) or not meta.get("input"):
        raise CliError(f"{args.model_file}: no class_names/input format in its metadata")
    teachers = _teachers(loaded, args)
    fmt = InputFormat.from_dict(meta["input"])
    arrays = load_images(args.data, fmt.size)
    index, _, folder_pos = _matched_indices(arrays, names)
    if not index:
        raise CliError(f"{args.data}: no class folder is named like a class of the model "
                       f"({', '.join(names)})")
    train_ds = ArrayDataset(arrays.images, arrays.labels, mean=fmt.mean, std=fmt.std,
                            augment=not args.no_augment)
    if args.eval:
        eval_arrays = load_images(args.eval, fmt.size)
        eval_idx, _, _ = _matched_indices(eval_arrays, names)
        if not eval_idx:
            raise CliError(f"{args.eval}: no class folder is named like a class of the model")
        # label the held-out images with --data's folder indices, which label_map speaks
        train_label = {n: j for j, n in enumerate(arrays.class_names)}
        relabel = np.asarray([train_label.get(n, -1) for n in eval_arrays.class_names])
        eval_labels = relabel[np.asarray(eval_arrays.labels)]
        missing = [n for n in eval_arrays.class_names if n in names and n not in train_label]
        if missing:
            raise CliError(f"{args.eval}: classes {', '.join(missing)} have no training images "
                           f"in {args.data}")
        eval_ds = ArrayDataset(eval_arrays.images, eval_labels, mean=fmt.mean, std=fmt.std)
        train_idx = index
    else:
        if args.holdout == 0:
            raise _Usage("give --holdout > 0 or --eval DIR: accuracy is reported on images the "
                         "fine-tuning does not train on")
        labels = np.asarray(arrays.labels)
        fit, held = split_per_class(labels[index], [1.0 - args.holdout, args.holdout],
                                    seed=args.seed)
        index = np.asarray(index)
        train_idx, eval_idx = index[fit].tolist(), index[held].tolist()
        eval_ds = _dataset(arrays, fmt)
    # the saved graph calls batch norm in eval semantics: lifted back into BatchNorm modules,
    # the norms train with batch statistics, as the source did
    lifted = lift_batch_norms(loaded.module)
    frozen = sum(n.op == "call_function" and "batch_norm" in str(n.target)
                 for n in loaded.module.graph.nodes)
    student, report = finetune(
        loaded.module, teachers, train_ds, train_idx, args.epochs, args.lr, args.temperature,
        args.alpha, args.seed, eval_indices=eval_idx, eval_dataset=eval_ds,
        label_map=folder_pos, batch_size=args.batch_size)
    kept = {k: v for k, v in meta.items() if k not in RESERVED_METADATA_KEYS}
    out_meta = {**kept, "finetune": {
        "from": str(args.model_file), "data": str(Path(args.data).resolve()),
        "epochs": args.epochs, "lr": args.lr, "temperature": args.temperature,
        "alpha": args.alpha, "augment": not args.no_augment, "seed": args.seed,
        "train_images": report.train_images, "eval_images": report.eval_images,
        "acc_before": report.acc_before, "acc_after": report.acc_after,
        "teachers": report.teachers, "norms_trained": len(lifted), "norms_frozen": frozen}}
    save_model(student, output, out_meta, _example(fmt), overwrite=args.force)
    rows = [["accuracy before", f"{report.acc_before:.2%}"],
            ["accuracy after", f"{report.acc_after:.2%}"],
            ["held-out images", report.eval_images], ["training images", report.train_images],
            ["epochs / steps", f"{report.epochs} / {report.steps}"],
            ["loss per epoch", " ".join(f"{v:.3f}" for v in report.epoch_losses)],
            ["teachers", report.teachers],
            ["batch norms", f"{len(lifted)} trained" + (f", {frozen} kept frozen (their tensors "
                                                        "are shared or not a norm's own)"
                                                        if frozen else "")],
            ["time", f"{report.seconds:.1f} s"]]
    _say(_table(rows, ["fine-tuning (distillation)", ""]),
         f"accuracy on {args.eval or f'{args.holdout:g} of {args.data} held out'}; "
         f"wrote {output}")
    return EXIT_OK


# =============================================================================== evaluate

def _matched_indices(arrays, class_names: list[str]):
    """Sample indices and model positions of the data folders named like a model class."""
    position = {name: i for i, name in enumerate(class_names)}
    folder_pos = {j: position[n] for j, n in enumerate(arrays.class_names) if n in position}
    labels = arrays.labels.tolist()
    index = [i for i, y in enumerate(labels) if y in folder_pos]
    return index, [folder_pos[labels[i]] for i in index], folder_pos


def accuracy_rows(logits, positions, class_names: list[str]):
    """Per-class rows ``[class, samples, correct, accuracy]`` and the overall row."""
    import torch

    positions = torch.as_tensor(positions)
    pred = logits.argmax(1)
    rows = []
    for c, name in enumerate(class_names):
        hit = positions == c
        n = int(hit.sum())
        correct = int((pred[hit] == c).sum())
        rows.append([name, n, correct, f"{correct / n:.2%}" if n else "-"])
    total, correct = len(positions), int((pred == positions).sum())
    rows.append(["overall", total, correct, f"{correct / total:.2%}" if total else "-"])
    return rows


def cmd_evaluate(args) -> int:
    if (args.model_file is None) == (args.model is None):
        raise _Usage("give either a model file or --model (with --weights)")
    if args.model_file is not None and (args.weights or args.model_arg or args.num_classes
                                        or args.class_names):
        raise _Usage("--weights/--model-arg/--num-classes/--class-names go with --model")
    _check_input_files(model=args.model_file, weights=args.weights)
    from mdafx.training import predict

    if args.model_file is not None:
        from mdafx.serialize import load_model

        loaded = load_model(args.model_file)
        meta, model, label = loaded.metadata, loaded.module, str(args.model_file)
        fmt = _input_format(args, meta.get("input"))
        if not meta.get("input") and not args.input_size:  # a file without an input format
            fmt = dataclasses.replace(fmt, size=tuple(loaded.input_shape[2:]))
        if tuple(fmt.size) != tuple(loaded.input_shape[2:]):
            raise CliError(f"{args.model_file} takes {tuple(loaded.input_shape[2:])} inputs, "
                           f"not --input-size {fmt.size}")
        names = meta.get("class_names")
        if not isinstance(names, list):
            raise CliError(f"{args.model_file}: no class_names in its metadata")
        arrays = load_images(args.data, fmt.size)
    else:
        fmt = _input_format(args)
        arrays = load_images(args.data, fmt.size)
        names = args.class_names or arrays.class_names
        if args.num_classes not in (None, len(names)):
            raise CliError(f"--num-classes {args.num_classes} but {len(names)} class names "
                           f"({', '.join(names)}); pass --class-names for every logit")
        model = build_model(args.model, len(names), args.model_arg, args.weights)
        label = args.model
    index, positions, folder_pos = _matched_indices(arrays, names)
    if not index:
        raise CliError(f"{args.data}: no class folder is named like a class of the model "
                       f"({', '.join(names)})")
    logits, _ = predict(model, _dataset(arrays, fmt).batches(args.batch_size, index))
    if logits.dim() != 2 or logits.shape[1] != len(names):
        raise CliError(f"{label}: outputs {tuple(logits.shape[1:])} per sample but has "
                       f"{len(names)} class names")
    rows = accuracy_rows(logits, positions, names)
    skipped = [n for j, n in enumerate(arrays.class_names) if j not in folder_pos]
    _say(_table(rows, ["class", "samples", "correct", "accuracy"]),
         f"model {label}: {len(names)} classes; data {args.data}: {len(index)} images"
         + (f"; skipped folders not in the model: {', '.join(skipped)}" if skipped else ""))
    return EXIT_OK


# =============================================================================== inspect

def cmd_inspect(args) -> int:
    if args.task and not args.profile:
        raise _Usage("--task needs --profile")
    if args.task and args.density is not None:
        raise _Usage("give --task or --density, not both")
    if args.density is not None and not 0.0 <= args.density <= 1.0:
        raise _Usage(f"--density must lie in [0, 1], got {args.density}")
    from mdafx.instrument import DumpIR, Timing, VerifyEach

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", _source_name(args)).strip("._") or "model"
    target = Path(args.output) / name
    if target.exists() and any(target.iterdir()) and not args.force:
        raise CliError(f"{target}: already exists; pass --force to replace it")
    _check_input_files(weights=args.weights, profile=args.profile)
    from mdafx.api import channel_groups, locate, plan_from_votes, plan_random, prune, \
        resolve_classes

    if args.profile:
        prof, record = load_profile(args.profile)
        num_classes = args.num_classes or len(prof.class_names)
        gm, _ = _profiled_source(args, prof, record, num_classes)
    else:
        fmt = _input_format(args)
        model = build_model(args.model, args.num_classes, args.model_arg, args.weights)
        gm = _traced(model, fmt, args.num_classes, args.model)
    cg = channel_groups(gm)
    if args.task:
        classes = resolve_classes(args.task, prof.class_names, num_classes)
        plan = plan_from_votes(cg, locate(gm, prof, _thresholds(args), cg).votes(classes),
                               classes)
        what = f"component of task {','.join(args.task)}"
    elif args.density is not None:
        plan = plan_random(cg, args.density, seed=args.seed)
        what = f"random plan keeping {args.density:.0%} of the channel groups"
    else:
        plan, what = None, "no pruning (input graph and channel groups only)"
    dump, timing = DumpIR(args.output, name), Timing()
    instruments = [dump, timing] + ([VerifyEach()] if args.verify else [])
    if plan is None:
        from mdafx.passmanager import PassManager

        PassManager([], instruments).run(gm)
    else:
        prune(gm, plan, cg=cg, instruments=instruments)
    written, notes = list(dump.written), []
    dot = shutil.which("dot")
    for path in [p for p in dump.written if p.suffix == ".dot"] if dot else []:
        svg = path.with_suffix(".svg")
        try:
            subprocess.run([dot, "-Tsvg", str(path), "-o", str(svg)], check=True, timeout=120,
                           capture_output=True)
            written.append(svg)
        except (subprocess.SubprocessError, OSError) as e:
            notes.append(f"warning: dot failed on {path}, no SVG: {e}")
    if not dot:
        notes.append("Graphviz 'dot' not found: no SVG written (render a .dot file with "
                     "'dot -Tsvg FILE.dot -o FILE.svg')")
    _say(f"{what}:", *[f"  {p}" for p in written], *notes)
    if timing.records:
        _say(timing.table())
    return EXIT_OK


# =============================================================================== routes

ROUTE_COLOURS = {"a-only": "#d62728", "b-only": "#1f77b4", "both": "#9467bd",
                 "neither": "#e6e6e6"}


def route_rows(gm, cg, masks, a: int, b: int):
    """Per weighted layer (conv/linear call, graph order): ``(layer, a_mask, b_mask)`` over the
    channels of its input. Features that hold one channel (a flatten into a Linear) are folded
    back onto that channel (it matters if any of its features does)."""
    import torch
    import torch.nn as nn

    K = masks.num_classes
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target),
                                                      (nn.Conv2d, nn.Linear)):
            continue
        src = node.args[0]
        shape = tuple(src.meta["tensor_meta"].shape)
        axis = len(shape) - 1 if isinstance(gm.get_submodule(node.target), nn.Linear) else 1
        mask = masks.masks.get(src.name)
        if mask is None:  # locate never reached it: no class relies on it
            mask = torch.zeros((K, *shape), dtype=torch.bool)
        along = mask.expand(K, *shape).movedim(axis + 1, 1).reshape(K, shape[axis], -1).any(2)
        ids = cg.ids.get(src.name)
        if isinstance(ids, torch.Tensor):
            ids = ids.expand(shape).movedim(axis, 0).reshape(shape[axis], -1)[:, 0]
            distinct, slot = torch.unique_consecutive(ids, return_inverse=True)
            if 1 < len(distinct) < len(ids):
                folded = torch.zeros(K, len(distinct), dtype=torch.long)
                along = folded.index_add_(1, slot, along.long()) > 0
        rows.append((node.target, along[a].clone(), along[b].clone()))
    return rows


def routes_svg(rows, name_a: str, name_b: str, title: str) -> str:
    """One row per layer, one square per input channel coloured by which class relies on it."""
    esc = functools.partial(html.escape, quote=True)
    label_w, max_w, row_h, top = 230, 760, 18, 64
    width = label_w + max_w + 20
    height = top + row_h * len(rows) + 16
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
           f"<title>{esc(title)}</title>", "<style>",
           *[f".{cls} {{ fill: {colour}; }}" for cls, colour in ROUTE_COLOURS.items()],
           "</style>",
           f'<text x="8" y="18" font-size="13">{esc(title)}</text>']
    legend = [("a-only", f"only {name_a}"), ("b-only", f"only {name_b}"), ("both", "both"),
              ("neither", "neither")]
    x = 8
    for cls, text in legend:
        out.append(f'<rect class="swatch {cls}" x="{x}" y="30" width="10" height="10"/>'
                   f'<text x="{x + 14}" y="39">{esc(text)}</text>')
        x += 24 + 7 * len(text)
    for r, (layer, ma, mb) in enumerate(rows):
        y = top + r * row_h
        n = len(ma)
        cell = min(10.0, max_w / max(n, 1))
        out.append(f'<g class="layer" data-layer="{esc(layer)}" data-channels="{n}">'
                   f'<text x="8" y="{y + 10}">{esc(layer)} ({n})</text>')
        for c in range(n):
            a, b = bool(ma[c]), bool(mb[c])
            cls = "both" if a and b else "a-only" if a else "b-only" if b else "neither"
            out.append(f'<rect class="{cls}" x="{label_w + c * cell:.2f}" y="{y}" '
                       f'width="{max(cell - 1, 0.5):.2f}" height="12"/>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def cmd_routes(args) -> int:
    if len(args.classes) != 2:
        raise _Usage(f"--classes takes exactly two classes, got {len(args.classes)}")
    output = Path(args.output)
    _refuse_existing([output], args.force)
    _check_input_files(weights=args.weights, profile=args.profile)
    from mdafx.api import channel_groups, locate, resolve_classes

    prof, record = load_profile(args.profile)
    num_classes = args.num_classes or len(prof.class_names)
    a, b = resolve_classes(args.classes, prof.class_names, num_classes)
    gm, _ = _profiled_source(args, prof, record, num_classes)
    cg = channel_groups(gm)
    masks = locate(gm, prof, _thresholds(args), cg)
    rows = route_rows(gm, cg, masks, a, b)
    name_a, name_b = prof.class_names[a], prof.class_names[b]
    table = []
    for layer, ma, mb in rows:
        both = int((ma & mb).sum())
        union = int((ma | mb).sum())
        table.append([layer, len(ma), int(ma.sum()), int(mb.sum()), both,
                      int((ma & ~mb).sum()), int((mb & ~ma).sum()), len(ma) - union,
                      f"{both / union:.2f}" if union else "-"])
    title = f"decision routes of {name_a} (A) and {name_b} (B): {_source_name(args)}"
    with _atomic(output, args.force) as tmp:
        tmp.write_text(routes_svg(rows, name_a, name_b, title), encoding="utf-8")
    headers = ["layer", "in channels", name_a, name_b, "shared", f"only {name_a}",
               f"only {name_b}", "neither", "overlap"]
    _say(_table(table, headers, floatfmt=".2f"),
         f"channels each class relies on at every weighted layer's input "
         f"(thresholds: {_thresholds_text(args)}); wrote {output}")
    return EXIT_OK


# =============================================================================== demo

DEMO_CLASSES = ("hbar", "vbar", "diag", "anti", "square", "disk", "ring", "plus", "cross", "tri")
DEMO_TASKS = (("disk", "ring", "square"), ("plus", "cross", "tri"))
DEMO_SIZE = 16


def synthetic_shapes(per_class: int, size: int = DEMO_SIZE, seed: int = 0):
    """``(images uint8 [N, size, size, 3], labels int64 [N])``: one shape per class of
    :data:`DEMO_CLASSES` (bars, diagonals, outlines, disk, ring, plus, cross, triangle) at a
    random position, size and colour on a random dark background, with pixel noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k = len(DEMO_CLASSES)
    n = per_class * k
    labels = torch.arange(k).repeat_interleave(per_class)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def jitter(scale):
        return (torch.rand(n, 1, 1, generator=g) - 0.5) * scale

    dx = xx - (size / 2 + jitter(size * 0.3))
    dy = yy - (size / 2 + jitter(size * 0.3))
    r = size * (0.22 + 0.12 * torch.rand(n, 1, 1, generator=g))
    ax, ay = dx.abs(), dy.abs()
    box, rad, w, d = torch.maximum(ax, ay), (dx * dx + dy * dy).sqrt(), 0.9, 1.3
    diag, anti = (dx - dy).abs() <= d, (dx + dy).abs() <= d
    shapes = torch.stack([
        (ay <= w) & (ax <= r), (ax <= w) & (ay <= r), diag & (box <= r), anti & (box <= r),
        (box <= r) & (box >= r - 1.6), rad <= r, (rad <= r) & (rad >= r - 1.6),
        ((ax <= w) | (ay <= w)) & (box <= r), (diag | anti) & (box <= r),
        (ay <= r) & (ax <= (dy + r) / 2),
    ], 1)
    mask = shapes[torch.arange(n), labels].unsqueeze(1).float()
    fg = 0.45 + 0.55 * torch.rand(n, 3, 1, 1, generator=g)
    bg = 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    img = bg + (fg - bg) * mask + 0.12 * torch.randn(n, 3, size, size, generator=g)
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return img.contiguous().numpy(), labels.numpy()


def _write_imagefolder(root: Path, images, labels) -> None:
    from PIL import Image

    for name in DEMO_CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    counters = [0] * len(DEMO_CLASSES)
    for img, y in zip(images, labels.tolist()):
        Image.fromarray(img).save(root / DEMO_CLASSES[y] / f"{counters[y]:04d}.png")
        counters[y] += 1


def _demo_sources(pixel_mean, pixel_std):
    """The two source models: ``(--model spec, --model-arg pairs, factory, input format)``.
    Their input normalisations differ on purpose: the assembled model adapts its input per
    branch (MDA 2.2)."""
    from mdafx.assemble import InputFormat
    from mdafx.models import resnet_cifar, tiny_cnn

    size, k = (DEMO_SIZE, DEMO_SIZE), len(DEMO_CLASSES)
    return [
        ("tiny_cnn", [], lambda: tiny_cnn(k), InputFormat(size, 3, (0.5,) * 3, (0.25,) * 3)),
        ("resnet_cifar", [["depth", 8], ["width", 8]], lambda: resnet_cifar(8, k, width=8),
         InputFormat(size, 3, tuple(pixel_mean), tuple(pixel_std))),
    ]


def cmd_demo(args) -> int:
    started = time.perf_counter()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mdafx-demo-"))
    if args.out and out.exists() and any(out.iterdir()) and not args.force:
        raise CliError(f"{out}: already exists and is not empty; pass --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    _say(f"mdafx demo: writing to {out}")
    import torch
    from tqdm.auto import tqdm

    if not getattr(args, "threads", None):
        # the demo's tiny models gain nothing from more threads (and lose a lot on a busy
        # machine); one thread also makes its printed numbers the same on every machine
        torch.set_num_threads(1)
    from mdafx.api import channel_groups, disassemble, locate, profile
    from mdafx.assemble import assemble
    from mdafx.data import ImageArrays
    from mdafx.export import export_onnx
    from mdafx.serialize import save_model
    from mdafx.training import predict, task_accuracy, train_classifier

    progress = _progress(args)
    splits = {name: ImageArrays(*synthetic_shapes(n, seed=args.seed + i), list(DEMO_CLASSES))
              for i, (name, n) in
              enumerate((("train", args.train_per_class),
                         ("calib", max(10, args.train_per_class // 3)), ("test", 100)))}
    if not args.no_images:
        for name, split in splits.items():
            _write_imagefolder(out / "data" / name, split.images, split.labels)
    pixels = splits["train"].images.reshape(-1, 3) / 255.0
    _say(f"data: {len(DEMO_CLASSES)} synthetic classes ({', '.join(DEMO_CLASSES)}) of "
         f"{DEMO_SIZE}x{DEMO_SIZE} images; " + ", ".join(
             f"{len(s.labels)} {n}" for n, s in splits.items()))

    sources, components = [], []
    bar = tqdm(total=3 * len(DEMO_TASKS), desc="demo", disable=not progress)
    for k, ((spec, model_args, factory, fmt), task) in enumerate(
            zip(_demo_sources(pixels.mean(0).tolist(), pixels.std(0).tolist()), DEMO_TASKS)):
        name = f"source{k}_{spec}"
        bar.set_description(f"train {name}")
        torch.manual_seed(args.seed + k)
        model, train_ds, t0 = factory(), _dataset(splits["train"], fmt), time.perf_counter()
        train_classifier(model, train_ds, epochs=args.epochs, lr=0.05, batch_size=32,
                         weight_decay=5e-4, seed=args.seed + k, progress=False)
        sources.append((name, model, fmt, time.perf_counter() - t0))
        weights = out / f"{name}.pt"
        with _atomic(weights, True) as tmp:
            torch.save(model.state_dict(), tmp)
        bar.update()
        bar.set_description(f"profile {name}")
        gm = _traced(model, fmt, len(DEMO_CLASSES), spec)
        prof = profile(gm, train_ds, list(DEMO_CLASSES), progress=False)
        save_profile(prof, out / f"{name}.profile.pt", True,
                     {"model": spec, "model_args": model_args, "weights": str(weights),
                      "input": fmt.to_dict(),
                      "data": None if args.no_images else str(out / "data" / "train")})
        bar.update()
        bar.set_description(f"disassemble {name}")
        cg = channel_groups(gm)
        comp = disassemble(gm, locate(gm, prof, cg=cg), list(task), class_names=DEMO_CLASSES,
                           source=name, cg=cg)
        path = out / f"component{k}_{'-'.join(task)}.mdafx"
        save_model(comp.module, path, {**comp.metadata, "kind": "component",
                                       "input": fmt.to_dict(), "model": spec,
                                       "model_args": model_args, "weights": str(weights)},
                   _example(fmt), overwrite=True)
        components.append(load_component(path))  # from the file, as `mdafx assemble` does
        bar.update()
    bar.close()

    scales, calibration = calibrate(components, splits["calib"])
    variants = {"no scaling": assemble(components), "calibrated": assemble(components, scales)}
    asm = variants["calibrated"]
    asm_path, onnx_path = out / "assembled.mdafx", out / "assembled.onnx"
    save_model(asm.module, asm_path, {**asm.metadata, "kind": "assembled",
                                      "calibration": calibration},
               _example(asm.input_format), overwrite=True)
    report = export_onnx(asm.module, onnx_path, _example(asm.input_format),
                         metadata=asm.metadata, overwrite=True)

    test, rows = splits["test"], []
    for (name, model, fmt, seconds), comp in zip(sources, components):
        ds = _dataset(test, fmt)
        logits, labels = predict(model, ds.batches(256))
        rows.append([f"{name} ({seconds:.1f} s training)", "all 10", len(labels),
                     _pct(_accuracy(logits, labels)), f"{_params(model):,}"])
        index, positions, _ = _matched_indices(test, comp.class_names)
        rows.append([f"{name} on its task", ",".join(comp.class_names), len(index),
                     _pct(task_accuracy(logits[index], labels[index], comp.classes)), ""])
        comp_logits, _ = predict(comp.module, ds.batches(256, index))
        rows.append([f"component of {name}", ",".join(comp.class_names), len(index),
                     _pct(_accuracy(comp_logits, positions)),
                     f"{comp.params:,} ({comp.params / _params(model):.0%})"])
    index, positions, _ = _matched_indices(test, asm.class_names)
    union = [DEMO_CLASSES.index(n) for n in asm.class_names]
    both = f"{len(union)}: both tasks"
    for name, model, fmt, _ in sources:  # what one source model does on the union
        logits, labels = predict(model, _dataset(test, fmt).batches(256, index))
        rows.append([f"{name} on both tasks", both, len(index),
                     _pct(task_accuracy(logits, labels, union)), f"{_params(model):,}"])
    batches = functools.partial(_dataset(test, asm.input_format).batches, 256, index)
    for label, variant in variants.items():
        logits, _ = predict(variant.module, batches())
        rows.append([f"assembled, {label}", both, len(index),
                     _pct(_accuracy(logits, positions)), f"{variant.params:,}"])
    rows.append(["assembled, calibrated, onnxruntime", both, len(index),
                 _pct(_accuracy(_onnxruntime_logits(onnx_path, batches()), positions)),
                 f"{asm.params:,}"])
    _say("", _table(rows, ["model", "classes", "test images", "accuracy", "params"]), "",
         f"ONNX: {report}", "files:", *[f"  {p.name}" for p in sorted(out.iterdir())])
    if not args.no_images:
        _say(f"try: mdafx evaluate {asm_path} --data {out / 'data' / 'test'}")
    _say(f"demo finished in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _accuracy(logits, positions) -> float:
    import torch

    return float((logits.argmax(1) == torch.as_tensor(positions)).float().mean())


def _onnxruntime_logits(path, batches):
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(np.concatenate([session.run(None, {name: x.numpy()})[0]
                                            for x, _ in batches]))


if __name__ == "__main__":
    raise SystemExit(main())
