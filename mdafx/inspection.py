"""Per-pass dumps of a pipeline run (the ``inspect`` command).

``inspect(target, directory)`` runs a pipeline with the ``DumpIR`` and ``Timing`` instruments
(``VerifyEach`` too with ``verify=True``) and writes ``<directory>/<name>/NN_<pass>.{txt,dot}``:

* a traced source model: the disassembly pipeline for ``task`` (with a profile), for a random
  plan keeping ``density`` of the channel groups, or no pass at all (the input graph and its
  channel groups);
* two or more components: the assembly pipeline of ``layout`` with ``calibration`` (a
  :class:`~mdafx.assembly.Calibration`: a feature head, or logit scales; None: unscaled);
* one component or assembled model: its graph (no pass).

DOT files are rendered to SVG when Graphviz's ``dot`` is installed (it is optional: the text
dumps carry everything).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.fx as fx

from .assembly import Calibration, assemble
from .disassembly import Component, channel_groups, prune, resolve_classes, source_analyses
from .errors import PreconditionError
from .instrument import DumpIR, Timing, VerifyEach, run_pipeline
from .passes.channel_groups import ChannelGroups
from .passes.locate import Thresholds
from .passes.prune_channels import TaskPlan, plan_random

__all__ = ["InspectReport", "inspect"]


@dataclass
class InspectReport:
    what: str
    written: list[Path]
    notes: list[str] = field(default_factory=list)
    timing: str = ""


def _render_svgs(dots: list[Path]) -> tuple[list[Path], list[str]]:
    dot = shutil.which("dot")
    if not dot:
        return [], ["Graphviz 'dot' not found: no SVG written (the .txt dumps hold the same "
                    "facts; render a .dot file with 'dot -Tsvg FILE.dot -o FILE.svg')"]
    written, notes = [], []
    for path in dots:
        svg = path.with_suffix(".svg")
        try:
            subprocess.run([dot, "-Tsvg", str(path), "-o", str(svg)], check=True, timeout=120,
                           capture_output=True)
            written.append(svg)
        except (subprocess.SubprocessError, OSError) as e:
            notes.append(f"warning: dot failed on {path}, no SVG: {e}")
    return written, notes


def inspect(target: fx.GraphModule | Component | Sequence[Component] | Any,
            directory: str | os.PathLike, *, name: str = "model", profile=None,
            task: Sequence[Any] | None = None, thresholds: Thresholds = Thresholds(),
            density: float | None = None, seed: int = 0, layout: str = "parallel",
            calibration: Calibration | None = None, verify: bool = False) -> InspectReport:
    """Dump every pass of the pipeline ``target`` goes through (module docstring)."""
    if task is not None and profile is None:
        raise PreconditionError("a task needs the source's profile")
    if task is not None and density is not None:
        raise PreconditionError("give a task or a density, not both")
    if density is not None and not 0.0 <= density <= 1.0:
        raise PreconditionError(f"density must lie in [0, 1], got {density}")
    dump, timing = DumpIR(directory, name), Timing()
    instruments = [dump, timing] + ([VerifyEach()] if verify else [])
    if isinstance(target, (list, tuple)):
        assemble(list(target), calibration, layout=layout, instruments=instruments, name=name)
        what = f"assembly of {len(target)} components ({layout} layout)"
    elif isinstance(target, fx.GraphModule):
        what = _disassembly(target, profile, task, thresholds, density, seed, instruments, name)
    else:  # one model file's graph
        run_pipeline([], target.module, instruments=instruments, name=name)
        what = "the model's graph (no pass)"
    svgs, notes = _render_svgs([p for p in dump.written if p.suffix == ".dot"])
    return InspectReport(what, list(dump.written) + svgs, notes,
                         timing.table() if timing.records else "")


def _disassembly(gm, profile, task, thresholds, density, seed, instruments, name) -> str:
    if task is not None:
        am = source_analyses(gm, profile)
        classes = resolve_classes(task, profile.class_names, len(profile.class_names))
        plan = am.get(TaskPlan(classes, thresholds))
        prune(gm, plan, cg=am.get(ChannelGroups), instruments=instruments, name=name)
        return f"component of task {','.join(map(str, task))}"
    if density is not None:
        cg = channel_groups(gm)
        prune(gm, plan_random(cg, density, seed=seed), cg=cg, instruments=instruments, name=name)
        return f"random plan keeping {density:.0%} of the channel groups"
    run_pipeline([], gm, instruments=instruments, name=name)
    return "no pruning (input graph and channel groups only)"
