"""The ``mdafx`` command line: one command per step of MDA, each the same-named ``mdafx.api``
function behind a parser and a printer.

::

    mdafx analyse      model + ImageFolder data       -> contribution profile (safetensors),
                       (alias: mdafx profile)            holding out a calibration split
    mdafx disassemble  model + profile + --task ...   -> one component file (.mdafx) per task;
                       [--max-drop/--max-params/--max-macs] [--reestimate-norms]
    mdafx assemble     component files [--calibrate]  -> one assembled model file
    mdafx export       model file                     -> ONNX, checked against onnxruntime
    mdafx evaluate     model file or --model + data   -> per-class accuracy table
    mdafx finetune     model file + data + --epochs   -> the same model, distilled (optional)
    mdafx inspect      model or model files           -> per-pass graph dumps (.txt, .dot, .svg)
    mdafx routes       model + profile + --classes    -> decision-route table and SVG picture
    mdafx info         any mdafx file                 -> what it holds
    mdafx demo         nothing                        -> the whole pipeline on synthetic data

Each command module (``analyse.py``, ...) has ``add_arguments(parser)`` and ``run(args)``:
parse, call ``mdafx.api``, print. Files are only ever read as data: a model file's recorded
source spec is printed, never imported or built; source and teacher models come from the
command line alone.

Exit codes: 0 success; 1 an mdafx error (one line ``mdafx: error: <message>``, the traceback
only with ``--debug``) or a bug (``mdafx: internal error: ...`` after its traceback); 2 a
usage error; 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from mdafx.errors import MdafxError

from .common import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, Parser,
                     UsageError, add_global, clean)

__all__ = ["main", "build_parser", "COMMANDS", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE",
           "EXIT_INTERRUPTED"]

# (command, module, aliases, help) in the order --help lists them
COMMANDS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("analyse", "analyse", ("profile",), "Profile a model on data: per-class channel "
     "contributions of every weighted layer (MDA 1.1-1.2)."),
    ("disassemble", "disassemble", (), "Cut the component of each task out of a profiled "
     "model (MDA 1.3-1.4)."),
    ("assemble", "assemble", (), "Assemble component files into one classifier (MDA 2)."),
    ("export", "export", (), "Export a model file to ONNX, verified with the ONNX checker and "
     "onnxruntime parity at batch 1 and 3, or to a torch.export archive (.pt2)."),
    ("evaluate", "evaluate", (), "Per-class and overall accuracy of a model file, or of "
     "--model/--weights, on an ImageFolder (folders matched to classes by name)."),
    ("finetune", "finetune", (), "Optional, explicit: fine-tune a component or assembled model "
     "file for a few epochs on its classes with distillation; reports the accuracy before and "
     "after. Not part of MDA's training-free path."),
    ("inspect", "inspect", (), "Dump the graph before and after each pass of a pipeline "
     "(text tables, DOT, and SVG when Graphviz is installed)."),
    ("routes", "routes", (), "Decision routes of two classes: the input channels of every "
     "weighted layer each class relies on, shared and exclusive (MDA 4)."),
    ("info", "info", (), "Describe an mdafx file: a profile, a component or assembled model, "
     "or an exported ONNX file (told apart by content)."),
    ("demo", "demo", (), "Run the whole pipeline on a synthetic data set: train two small "
     "sources, disassemble, calibrate, assemble, export (no download)."),
)


def _version() -> str:
    from mdafx import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command. Command modules import only argparse-level helpers at
    module level, so building it (and ``--help``) loads neither torch nor ``mdafx.api``."""
    parser = Parser(
        prog=PROG, description="Model Disassembling and Assembling (MDA) with torch.fx.",
        epilog="Run 'mdafx COMMAND --help' for a command's options. Exit codes: 0 ok, 1 error, "
               "2 usage error, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    add_global(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, aliases, help_ in COMMANDS:
        module = importlib.import_module(f"{__name__}.{module_name}")
        p = sub.add_parser(name, aliases=list(aliases), help=help_, description=help_)
        add_global(p)
        module.add_arguments(p)
        p.set_defaults(run=module.run, parser=p)
    return parser


def _one_line(message: str) -> str:
    """A multi-line error message (a trace error's hints) as one line."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    debug = bool(getattr(args, "debug", False))
    try:
        if getattr(args, "threads", None):
            _set_threads(args.threads)
        return args.run(args) or EXIT_OK
    except UsageError as e:
        args.parser.print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {clean(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`mdafx ... | head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except MdafxError as e:
        if debug:
            _print_traceback()
        print(f"{PROG}: error: {clean(_one_line(str(e)))}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as e:  # user code (a model's forward, a factory) must not end mdafx
        if debug:
            _print_traceback()
        print(f"{PROG}: error: the model's code called sys.exit({clean(repr(e.code))})",
              file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: always show where
        _print_traceback()
        print(f"{PROG}: internal error: {type(e).__name__}: {clean(_one_line(str(e)))}",
              file=sys.stderr)
        return EXIT_ERROR


def _set_threads(n: int) -> None:
    """torch's CPU threads, without importing torch: a command that fails on its arguments or
    outputs must not pay torch's import (seconds). Torch reads ``OMP_NUM_THREADS`` when it is
    first imported; once imported (an in-process caller), it is told directly."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)


def _print_traceback() -> None:
    for line in traceback.format_exc().splitlines():
        print(clean(line), file=sys.stderr)
