"""Instruments: what runs around each pass without being part of any pass.

The ``PassManager`` (``mdafx.passmanager``) calls every instrument's hooks in order:
``run_before_pipeline → (run_before_pass → pass → run_after_pass | run_after_pass_failed)*``.
Passes never print or dump; these classes do (MLIR's PassInstrumentation, TVM's PassInstrument).

* ``DumpIR(directory, model_name)``: MLIR's print-ir-after-all in tree-directory form, in
  after-change mode. It writes ``<directory>/<model_name>/``::

      00_input.txt  00_input.dot            the graph before the first pass
      NN_<pass>.txt NN_<pass>.dot           after each pass that changed the graph
      NN_<pass>.txt                         one line, "unchanged", after a pass that did not
      NN_<pass>.FAILED.txt                  the error and the graph as the failing pass left it

  Every ``.txt`` starts with a banner, ``# mdafx | after <pass> (#NN) | model <name> |
  modified: yes | <seconds> s``; timings appear in that line only, so golden tests can mask
  them. It refuses a non-empty directory without its marker file (``.mdafx-dump``) and, in one
  it owns, removes only the files its marker lists.
* ``Timing``: seconds per pass, ``table()`` for a report.
* ``VerifyEach``: after each modifying pass, ``graph.lint()`` and one run of the graph on a random
  input; raises ``PassError`` naming the pass and ``node.format_node()`` of the failing node.

:func:`default_instruments` builds the list from the environment (``MDAFX_DUMP``,
``MDAFX_VERIFY``) and :func:`run_pipeline` runs a pipeline with it: every workflow runs its
passes through that one function, so dumps, verification and timing see every pass.

Instruments sit above the passes (they render what the passes' analyses computed) and below the
workflows that run pipelines.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate

from mdafx import config, dump
from mdafx.errors import PassError, PreconditionError
from mdafx.fileio import write_text
from mdafx.ir import count_params, eval_mode, example_input
from mdafx.passes.shapes import Shapes
from mdafx.passmanager import AnalysisManager, Instrument, Pass, PassManager, PassResult

__all__ = ["DumpIR", "Timing", "VerifyEach", "default_instruments", "run_pipeline"]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name).strip("._") or "unnamed"


def _stats(gm: fx.GraphModule) -> tuple[int, int, int]:
    """(nodes, params, inserted nodes)."""
    nodes = list(gm.graph.nodes)
    inserted = sum(n.name.startswith(dump.INSERTED_PREFIX) for n in nodes)
    return len(nodes), count_params(gm), inserted


class DumpIR(Instrument):
    """Write a text table (and DOT graph) of the graph before the pipeline and after each pass.

    >>> import tempfile, torch
    >>> from mdafx.ir import trace
    >>> from mdafx.passmanager import Pass, PassManager
    >>> class Nothing(Pass):
    ...     name = "nothing"
    ...     def run(self, gm, am):
    ...         return False
    >>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 2, 2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     dump_ir = DumpIR(tmp, "tiny")
    ...     _ = PassManager([Nothing()], [dump_ir]).run(gm)
    ...     print([p.name for p in dump_ir.written])
    ...     marker = (dump_ir.path / "01_nothing.txt").read_text()
    ['00_input.txt', '00_input.dot', '01_nothing.txt']
    >>> print(marker.replace(marker.split(" | ")[4], "<t> s"), end="")
    # mdafx | after nothing (#01) | model tiny | modified: no | <t> s | unchanged
    """

    MARKER = ".mdafx-dump"

    def __init__(self, directory: str | Path, model_name: str, dot: bool = True) -> None:
        self.path = Path(directory) / _safe(model_name)
        self.model_name = model_name
        self.dot = dot
        self.written: list[Path] = []
        self._before: tuple[int, int, int] = (0, 0, 0)
        self._started = 0.0

    # -- directory ownership -----------------------------------------------------------------

    def _claim(self) -> None:
        """Create the directory, or reuse one this instrument type wrote; remove its old files."""
        marker = self.path / self.MARKER
        if self.path.exists():
            if not self.path.is_dir():
                raise PreconditionError(f"DumpIR: {self.path} exists and is not a directory")
            if any(self.path.iterdir()) and not marker.is_file():
                raise PreconditionError(
                    f"DumpIR: {self.path} is not empty and has no {self.MARKER} marker, so mdafx "
                    "did not write it; dump elsewhere or empty it first")
            for line in (marker.read_text().splitlines()[1:] if marker.is_file() else []):
                old = self.path / line
                if line and "/" not in line and old.is_file() and old.parent == self.path:
                    old.unlink()
        else:
            self.path.mkdir(parents=True)
        self.written = []
        self._write_marker()

    def _write_marker(self) -> None:
        names = [p.name for p in self.written]
        text = "mdafx DumpIR owns this directory; it removes the files listed below on reuse\n"
        write_text(self.path / self.MARKER, text + "".join(n + "\n" for n in names),
                   overwrite=True)

    def _write(self, name: str, text: str) -> None:
        path = self.path / name
        write_text(path, text, overwrite=True)
        self.written.append(path)
        self._write_marker()

    # -- hooks ---------------------------------------------------------------------------------

    def _banner(self, what: str, index: int, *fields: str) -> str:
        head = ("# mdafx", f"{what} (#{index:02d})", f"model {self.model_name}")
        return " | ".join(head + fields)

    def _counts(self, view: dump.View, after: tuple[int, int, int] | None) -> str:
        nodes, params, inserted = self._before
        if after is None:
            text = f"# nodes {nodes}   params {params:,}"
        else:
            n2, p2, i2 = after
            change = f" ({(p2 - params) / params:+.1%})" if params else ""
            extra = f" ({i2 - inserted:+d} inserted)" if i2 != inserted else ""
            text = f"# nodes {nodes} -> {n2}{extra}   params {params:,} -> {p2:,}{change}"
        return f"{text}   groups {dump.group_count(view)}"

    def _dump(self, stem: str, gm: fx.GraphModule, banner: str, after, am, extra=()) -> None:
        view = dump.analyze(gm, am)
        lines = [banner, self._counts(view, after), *extra]
        self._write(f"{stem}.txt", dump.to_table(gm, lines, view=view))
        if self.dot and not stem.endswith(".FAILED"):
            self._write(f"{stem}.dot", dump.to_dot(gm, view=view, name=f"{self.model_name} {stem}"))

    def run_before_pipeline(self, gm: fx.GraphModule, passes: list[Pass],
                            am: AnalysisManager) -> None:
        self._claim()
        self._before = _stats(gm)
        self._dump("00_input", gm, self._banner("input", 0), None, am)

    def run_before_pass(self, p: Pass, gm: fx.GraphModule, index: int,
                        am: AnalysisManager) -> None:
        self._before = _stats(gm)
        self._started = time.perf_counter()

    def run_after_pass(self, p: Pass, gm: fx.GraphModule, index: int, modified: bool,
                       seconds: float, am: AnalysisManager) -> None:
        stem = f"{index:02d}_{_safe(p.name)}"
        if not modified:
            self._write(f"{stem}.txt", self._banner(f"after {p.name}", index, "modified: no",
                                                    f"{seconds:.3f} s", "unchanged") + "\n")
            return
        banner = self._banner(f"after {p.name}", index, "modified: yes", f"{seconds:.3f} s")
        self._dump(stem, gm, banner, _stats(gm), am)

    def run_after_pass_failed(self, p: Pass, gm: fx.GraphModule, index: int,
                              error: BaseException, am: AnalysisManager) -> None:
        seconds = time.perf_counter() - self._started
        stem = f"{index:02d}_{_safe(p.name)}.FAILED"
        banner = self._banner(f"FAILED {p.name}", index, f"{seconds:.3f} s")
        message = f"{type(error).__name__}: {error}".splitlines() or [""]
        errors = [f"# error: {message[0]}"] + [f"#   {line}" for line in message[1:]]
        # the graph a failing pass left is not the one the cached analyses describe
        self._dump(stem, gm, banner, _stats(gm), None, errors)


class Timing(Instrument):
    """Seconds per pass of the last pipeline run.

    >>> t = Timing()
    >>> t.records = [(1, "prune-channels", True, 0.5), (2, "cleanup", False, 0.25)]
    >>> print(t.table())
      #  pass            modified      seconds    share
      1  prune-channels  yes             0.500    66.7%
      2  cleanup         no              0.250    33.3%
         total                           0.750   100.0%
    """

    def __init__(self) -> None:
        self.records: list[tuple[int, str, Any, float]] = []
        self._started = 0.0

    def run_before_pipeline(self, gm: fx.GraphModule, passes: list[Pass],
                            am: AnalysisManager) -> None:
        self.records = []

    def run_before_pass(self, p: Pass, gm: fx.GraphModule, index: int,
                        am: AnalysisManager) -> None:
        self._started = time.perf_counter()

    def run_after_pass(self, p: Pass, gm: fx.GraphModule, index: int, modified: bool,
                       seconds: float, am: AnalysisManager) -> None:
        self.records.append((index, p.name, modified, seconds))

    def run_after_pass_failed(self, p: Pass, gm: fx.GraphModule, index: int,
                              error: BaseException, am: AnalysisManager) -> None:
        self.records.append((index, p.name, "FAILED", time.perf_counter() - self._started))

    @property
    def total(self) -> float:
        return sum(r[3] for r in self.records)

    def table(self) -> str:
        total = self.total
        rows = [[i, name, {True: "yes", False: "no"}.get(mod, mod), f"{s:.3f}",
                 f"{s / total:.1%}" if total else "-"] for i, name, mod, s in self.records]
        rows.append(["", "total", "", f"{total:.3f}", "100.0%" if total else "-"])
        return tabulate(rows, headers=("#", "pass", "modified", "seconds", "share"),
                        tablefmt="plain", disable_numparse=True,
                        colalign=("right", "left", "left", "right", "right"))


class _CheckedInterpreter(fx.Interpreter):
    """Runs the graph node by node and names the node that fails."""

    def __init__(self, gm: fx.GraphModule, where: str) -> None:
        super().__init__(gm)
        self.where = where

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as e:
            raise PassError(f"VerifyEach: {self.where}: the graph does not execute at node "
                            f"{n.format_node()}: {type(e).__name__}: {e}") from e


def execute(gm: fx.GraphModule, where: str = "graph") -> Any:
    """Run ``gm`` once on a random input shaped like its recorded input (eval mode, no grad;
    training flags restored), raising ``PassError`` at the failing node."""
    with eval_mode(gm), torch.no_grad():
        return _CheckedInterpreter(gm, where).run(example_input(gm))


class VerifyEach(Instrument):
    """After every pass that changed the graph: lint it and run it once (see ``execute``)."""

    def run_after_pass(self, p: Pass, gm: fx.GraphModule, index: int, modified: bool,
                       seconds: float, am: AnalysisManager) -> None:
        if not modified:
            return
        where = f"after pass '{p.name}' (#{index})"
        try:
            gm.graph.lint()
        except Exception as e:
            raise PassError(f"VerifyEach: {where}: graph lint failed: "
                            f"{type(e).__name__}: {e}") from e
        execute(gm, where)


def default_instruments(model_name: str = "model") -> list[Instrument]:
    """The instruments the environment asks for: ``[DumpIR?, VerifyEach?]`` (``mdafx.config``).

    Each call makes a new DumpIR for ``<MDAFX_DUMP>/<model_name>``, which replaces that
    directory's earlier dump: give each pipeline run its own ``model_name`` to keep them all.
    """
    instruments: list[Instrument] = []
    directory = config.dump_dir()
    if directory:
        instruments.append(DumpIR(directory, model_name))
    if config.verify():
        instruments.append(VerifyEach())
    return instruments


def run_pipeline(pipeline: list[Pass], gm: fx.GraphModule, am: AnalysisManager | None = None,
                 *, instruments: list[Instrument] | None = None, name: str = "model"
                 ) -> PassResult:
    """Run ``pipeline`` on ``gm`` in place, refreshing shapes after every transform;
    ``instruments`` default to :func:`default_instruments` (dumping under ``name``)."""
    if instruments is None:
        instruments = default_instruments(name)
    return PassManager(pipeline, instruments, shapes=Shapes).run(gm, am)
