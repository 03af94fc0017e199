"""What every command shares: argument types and flag groups, input and output checks, printing.

Nothing here imports torch at module level: the parser is built from these helpers, and
``mdafx --help`` or a usage error must not pay torch's import (seconds). Helpers that need the
library import it inside.

Printing: every line a command prints goes through :func:`say`, :func:`warn` or :func:`table`,
which replace control characters (ANSI escapes, newlines, carriage returns, bidi overrides) in
what they print by visible ``\\xNN`` escapes, so a class name or path taken from a file or a
folder can never move the cursor, recolour the terminal or fake a line of output. ``--json``
prints one JSON object instead (ASCII, so escaped too).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mdafx.errors import MdafxError, OutputError

PROG = "mdafx"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(MdafxError):
    """A command-line input is unusable: a missing file, a flag that does not fit the file."""


class UsageError(Exception):
    """A usage error found after parsing; reported with the command's usage (exit 2)."""


# ============================================================================ argument types

def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    if value >= 2**31:
        raise argparse.ArgumentTypeError(f"must be < 2**31, got {value}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text!r}")
    return value


def half_open_unit(text: str) -> float:
    """A number in [0, 1): thresholds, held-out shares."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text!r}")
    return value


def fraction(text: str) -> float:
    """A share of the source, ``0.5`` or ``50%``, in (0, 1]."""
    raw = text.strip()
    value = _number(raw[:-1]) / 100 if raw.endswith("%") else _number(raw)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1] (or (0%, 100%]), got {text!r}")
    return value


def size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    h, w = int(match.group(1)), int(match.group(2) or match.group(1))
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return (h, w)


def _channel_values(text: str) -> tuple[float, ...]:
    values = tuple(_number(v) for v in text.split(","))
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"give 1 or 3 values, got {len(values)}")
    return values * 3 if len(values) == 1 else values


def means(text: str) -> tuple[float, ...]:
    return _channel_values(text)


def stds(text: str) -> tuple[float, ...]:
    values = _channel_values(text)
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"every std must be > 0, got {text!r}")
    return values


def _plain_literal(value: Any) -> bool:
    """A value a file can record (JSON): no bytes, sets or complex numbers, finite numbers."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_plain_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_literal(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, bool))


def model_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: VALUE a Python literal (``8``, ``0.5``, ``(1, 2)``), else the text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = raw
    if not _plain_literal(value):
        raise argparse.ArgumentTypeError(f"{key}: give a number (finite), string, bool, None, "
                                         f"or a list/dict of them; got {raw!r}")
    return key, value


def names(text: str) -> list[str]:
    """Comma-separated class names; ``#N`` is the class with index N."""
    items = [t.strip() for t in text.split(",")]
    if any(not t for t in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names (or #INDEX), "
                                         f"got {text!r}")
    return items


# ============================================================================ flag groups

class Parser(argparse.ArgumentParser):
    """argparse's parser whose messages (usage errors quote what was typed) are made safe."""

    def _print_message(self, message: str, file=None) -> None:
        if message:
            super()._print_message("\n".join(clean(line) for line in message.split("\n")),
                                   file)



def add_global(p: argparse.ArgumentParser) -> None:
    """Flags every command takes, before or after its name (SUPPRESS: a later parser never
    resets what an earlier one set)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of errors")
    p.add_argument("--threads", type=positive_int, default=argparse.SUPPRESS, metavar="N",
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars (they are shown only on a terminal anyway)")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress and no tables: only errors, warnings and the final line")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print one JSON object instead of tables")


def add_model(p: argparse.ArgumentParser, required: bool = True, title: str = "model") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--model", required=required, metavar="NAME|MODULE:CALLABLE",
                   help="an embedded trained CIFAR-10 model (cifar10-vgg, cifar10-resnet20: "
                        "weights and input format included), a torchvision name, an mdafx.models "
                        "name (tiny_cnn, vgg_cifar, resnet_cifar) or package.module:callable "
                        "returning an nn.Module")
    g.add_argument("--model-arg", type=model_arg, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="keyword argument for the model factory (Python literal; repeatable)")
    g.add_argument("--weights", metavar="FILE",
                   help="state_dict file (torch.save, read with weights_only=True, or "
                        ".safetensors); default: the factory's initial weights")
    g.add_argument("--num-classes", type=positive_int, metavar="N",
                   help="number of logits (default: the class count of the data or profile, "
                        "else the factory's default)")
    where = "the profile's, else"
    g.add_argument("--input-size", type=size, metavar="N|HxW",
                   help=f"model input height and width (default: {where} 32)")
    g.add_argument("--mean", type=means, metavar="M[,M,M]",
                   help=f"per-channel mean of [0,1] pixels (default: {where} CIFAR-10's)")
    g.add_argument("--std", type=stds, metavar="S[,S,S]",
                   help=f"per-channel std of [0,1] pixels, > 0 (default: {where} CIFAR-10's)")


def add_thresholds(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("component locating thresholds (MDA section 1.3)")
    for flag, default in (("--alpha-conv", 0.3), ("--beta-conv", 0.2), ("--alpha-linear", 0.4),
                          ("--beta-linear", 0.3)):
        which, layer = flag[2:].split("-")
        g.add_argument(flag, type=half_open_unit, default=default, metavar=which.upper(),
                       help=f"{layer} {which} in [0, 1) (default {default})")


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def device_spec(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (checked against the machine when used)."""
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text.strip()


INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def add_runtime(p: argparse.ArgumentParser, autocast: bool = True) -> None:
    """``--device``, ``--workers`` (and ``--autocast``): where the forward passes run and how
    many processes decode images."""
    g = p.add_argument_group("where it runs (data parallel: launch with torchrun "
                             "--nproc-per-node N)")
    g.add_argument("--device", type=device_spec, metavar="cpu|cuda[:N]|mps",
                   help="device of the forward passes (default cpu; under torchrun, cuda means "
                        "cuda:LOCAL_RANK)")
    g.add_argument("--workers", type=non_negative_int, metavar="N",
                   help="DataLoader processes decoding images that are read from disk "
                        "(default: CPU cores per process - 1, at most 8; 0: in the main "
                        "process)")
    if autocast:
        g.add_argument("--autocast", action="store_true",
                       help="mixed precision (bfloat16 on CPU, float16 on GPU) for the forward "
                            "passes that only rank or score images; may reorder near-ties")


def add_preprocess(p: argparse.ArgumentParser, recipe: bool = True) -> None:
    """``--resize``, ``--crop``, ``--interpolation`` (and ``--transforms``): read images of
    any size."""
    g = p.add_argument_group("preprocessing (images of any size; default: none, the images "
                             "must have the model's input size)")
    g.add_argument("--resize", type=positive_int, metavar="N",
                   help="resize the shorter side of every image to N pixels (aspect kept)")
    g.add_argument("--crop", type=size, metavar="N|HxW",
                   help="centre crop to N x N (or H x W) after --resize; default --input-size "
                        "when --resize is given")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, default="bilinear",
                   help="resampling of --resize (default bilinear)")
    if recipe:
        g.add_argument("--transforms", metavar="model|WEIGHTS",
                       help="the model's own evaluation recipe instead (resize, crop, mean, "
                            "std, input size): 'model' for a timm model's data config, or a "
                            "torchvision weights name such as ResNet50_Weights.IMAGENET1K_V2")


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace existing outputs (regular files only)")


def add_calibration(p: argparse.ArgumentParser) -> None:
    """How an assembly makes its branches comparable (``assemble``, ``inspect``)."""
    p.add_argument("--calibrate", metavar="DIR",
                   help="ImageFolder of a calibration split (images of every assembled class; "
                        "never the test split). Without it the logits are compared as they are")
    p.add_argument("--calibration", choices=("head", "joint", "mda"), default="head",
                   help="head: one closed-form (LDA) linear head over every component's features "
                        "(default); joint: a factor and an offset per logit; mda: MDA 2.1's "
                        "factors per component")


# ============================================================================ reading the flags

def flag(args: argparse.Namespace, name: str) -> bool:
    return bool(getattr(args, name, False))


def progress(args: argparse.Namespace) -> bool:
    """Progress bars: on a terminal, unless --no-progress, --quiet or --json."""
    return (not flag(args, "no_progress") and not flag(args, "quiet") and not flag(args, "json")
            and sys.stderr.isatty())


def show_progress(args: argparse.Namespace) -> bool:
    """Progress reports (``mdafx.progress``: a bar on a terminal, a status line every 30 s
    elsewhere), unless --no-progress, --quiet or --json."""
    return not flag(args, "no_progress") and not flag(args, "quiet") and not flag(args, "json")


def preprocess(args: argparse.Namespace, fmt=None):
    """The ``Preprocess`` of ``--resize/--crop/--interpolation`` (None when neither is given);
    ``--resize`` alone crops to ``fmt.size``."""
    from mdafx.data import Preprocess

    resize, crop = getattr(args, "resize", None), getattr(args, "crop", None)
    if resize is None and crop is None:
        return None
    if crop is None and fmt is not None:
        crop = tuple(fmt.size)
    return Preprocess(resize, crop, getattr(args, "interpolation", "bilinear"))


def calibration(args: argparse.Namespace, components, batch_size: int = 256):
    """``(Calibration, dataset)`` fitted on ``--calibrate`` by ``--calibration`` for these
    components (read in the first one's input format), or ``(None, None)`` without images."""
    if not args.calibrate:
        return None, None
    from mdafx import api

    fmt = api.InputFormat.from_dict(components[0].metadata["input"])
    data = api.open_images(args.calibrate, fmt)
    return api.fit_calibration(components, data, method=args.calibration,
                               batch_size=batch_size), data


def recipe(args: argparse.Namespace, num_classes: int | None):
    """``(Preprocess, InputFormat)`` of ``--transforms`` (None without it): a torchvision
    weights name, or ``model``: the recipe the built ``--model`` object carries."""
    spec = getattr(args, "transforms", None)
    if not spec:
        return None
    if any(getattr(args, k, None) for k in ("resize", "crop", "input_size", "mean", "std")):
        raise UsageError("--transforms gives the resize, crop, input size, mean and std; "
                         "leave out --resize/--crop/--input-size/--mean/--std")
    from mdafx.data import model_recipe

    if spec == "model":
        from mdafx.models import build_model

        found = model_recipe(build_model(args.model, num_classes, args.model_arg))
        if found is None:
            raise CliError(f"--transforms model: --model {args.model} carries no data config "
                           "(a timm model does); give a torchvision weights name or "
                           "--resize/--crop/--mean/--std")
        return found
    return model_recipe(spec)


def device(args: argparse.Namespace) -> str | None:
    return getattr(args, "device", None)


def model_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) for k in ("model", "weights", "model_arg", "num_classes",
                                                 "input_size", "mean", "std"))


def input_format(args: argparse.Namespace, fallback: dict | None = None):
    """``InputFormat`` of ``--input-size/--mean/--std``, each defaulting to ``fallback`` (a
    profile's recorded format), else to an embedded ``--model``'s card, else to CIFAR-10's
    statistics at 32x32."""
    from mdafx.data import CIFAR10_MEAN, CIFAR10_STD, InputFormat
    from mdafx.models import pretrained_input

    fallback = fallback or pretrained_input(getattr(args, "model", None))
    base = InputFormat.from_dict(fallback) if fallback else InputFormat(
        (32, 32), 3, CIFAR10_MEAN, CIFAR10_STD)
    return InputFormat(tuple(args.input_size or base.size), base.channels,
                       tuple(args.mean or base.mean), tuple(args.std or base.std))


def thresholds(args: argparse.Namespace):
    from mdafx.passes.locate import Thresholds

    return Thresholds(args.alpha_conv, args.beta_conv, args.alpha_linear, args.beta_linear)


def thresholds_text(args: argparse.Namespace) -> str:
    return (f"conv alpha {args.alpha_conv:g} beta {args.beta_conv:g}, "
            f"linear alpha {args.alpha_linear:g} beta {args.beta_linear:g}")


def source_record(args: argparse.Namespace) -> dict[str, Any]:
    """What a file records about its source model, for people to read (never run)."""
    return {"model": args.model, "model_args": [[k, v] for k, v in args.model_arg],
            "weights": str(Path(args.weights).resolve()) if args.weights else None}


def source_name(args: argparse.Namespace) -> str:
    if getattr(args, "name", None):
        return args.name
    return Path(args.weights).stem if args.weights else args.model


def build_source(args: argparse.Namespace, num_classes: int | None, fmt):
    """The traced ``--model`` (``mdafx.models.build_source``)."""
    from mdafx.models import build_source as build

    return build(args.model, num_classes, args.model_arg, args.weights, fmt)


def check_profile_matches(args: argparse.Namespace, prof, gm) -> None:
    """Refuse a profile computed on another model or other weights than ``--model``."""
    from mdafx.errors import ProfileMismatchError

    try:
        prof.check_matches(gm)
    except ProfileMismatchError as e:
        raise ProfileMismatchError(f"{args.profile} was not computed on --model {args.model} "
                                   f"with these weights: {e}") from e


# ============================================================================ inputs and outputs

def require_files(**paths: str | os.PathLike | Iterable | None) -> None:
    """Fail fast, before heavy work, on input files that are missing or not regular files."""
    for what, value in paths.items():
        for path in ([value] if isinstance(value, (str, os.PathLike)) or value is None
                     else value):
            if path is None:
                continue
            p = Path(path)
            if not p.exists():
                raise CliError(f"{path}: {what.replace('_', ' ')} file not found")
            if not p.is_file():
                raise CliError(f"{path}: {what.replace('_', ' ')} is not a file")
            if not os.access(p, os.R_OK):
                raise CliError(f"{path}: {what.replace('_', ' ')} file is not readable")


def require_dirs(**paths: str | os.PathLike | None) -> None:
    for what, path in paths.items():
        if path is not None and not Path(path).is_dir():
            state = "not found" if not Path(path).exists() else "is not a directory"
            raise CliError(f"{path}: {what.replace('_', ' ')} folder {state}")


def check_outputs(args: argparse.Namespace, outputs: Sequence, inputs: Sequence = ()) -> None:
    """``mdafx.fileio.check_outputs`` with ``--force``: before any slow work, refuse outputs
    that exist, that are not regular files, that repeat, or that are one of the inputs."""
    from mdafx.fileio import check_outputs as check, describe_os_error

    try:
        check(outputs, inputs, overwrite=bool(getattr(args, "force", False)))
    except OSError as e:  # e.g. a path under a regular file
        raise OutputError(describe_os_error(e)) from e


def check_output_dir(args: argparse.Namespace, directory: Path) -> None:
    """A directory a command fills: refused when it is a file, or not empty without --force."""
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory}: is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not getattr(args, "force", False):
        raise OutputError(f"{directory}: already exists and is not empty; pass --force to "
                          "write into it")


class AllOrNothing:
    """Collects the files a command wrote; on an exception they are all removed again."""

    def __init__(self) -> None:
        self.written: list[Path] = []

    def __enter__(self) -> AllOrNothing:
        return self

    def add(self, path: str | os.PathLike) -> Path:
        self.written.append(Path(path))
        return Path(path)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for path in self.written:
                try:
                    path.unlink()
                except OSError:
                    pass


# ============================================================================ printing

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     "\u2066-\u2069]")


def clean(value: Any) -> str:
    """``str(value)`` with every control character replaced by a visible escape."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                       else f"\\u{ord(m.group()):04x}", str(value))


def say(args: argparse.Namespace, *lines: Any, final: bool = False) -> None:
    """Print ``lines`` on stdout (one line each, made safe); with --quiet only ``final`` ones,
    with --json none (the command prints its JSON object instead)."""
    if flag(args, "json") or (flag(args, "quiet") and not final):
        return
    for line in lines:
        print(clean(line), flush=True)


def warn(*lines: Any) -> None:
    """Warnings go to stderr, always (also with --quiet and --json)."""
    for line in lines:
        print(clean(line), file=sys.stderr, flush=True)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[Any]) -> list[str]:
    """``tabulate`` lines of ``rows``: cells made safe, numbers right-aligned, no number parsing
    of text (a class named "1" stays text)."""
    from tabulate import tabulate

    columns = list(zip(*rows)) if rows else [[] for _ in headers]
    align = ["right" if col and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    or v is None or v == "" for v in col) else "left"
             for col in columns]
    cells = [["-" if v is None else clean(v) for v in row] for row in rows]
    text = tabulate(cells, headers=[clean(h) for h in headers], tablefmt="simple",
                    disable_numparse=True, colalign=align or None)
    return text.splitlines()


def lines_of(text: str) -> list[str]:
    """A multi-line text from the library (a timing table) as separate lines, for :func:`say`."""
    return text.splitlines()


def emit_json(args: argparse.Namespace, obj: dict[str, Any]) -> None:
    """With --json: ``obj`` as one JSON object on stdout (non-finite numbers as null)."""
    if flag(args, "json"):
        print(json.dumps(_plain(obj), indent=2, allow_nan=False), flush=True)


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "tolist"):  # a tensor or numpy number
        return _plain(value.tolist())
    return str(value)


def pct(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{value:.{digits}%}"


def share(part: int, whole: int) -> str:
    return f"{part:,} ({part / whole:.1%})" if whole else f"{part:,}"
