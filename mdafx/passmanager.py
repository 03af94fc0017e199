"""Pass infrastructure: analyses, transforms, and the manager that runs a pipeline.

* An ``Analysis`` computes a result from a graph and changes nothing. The ``AnalysisManager``
  caches results per analysis *and its parameters* (``Locate(thresholds)`` with two thresholds
  is two entries; ``am.get(ChannelGroups)`` is ``am.get(ChannelGroups())``) and ``provide``
  seeds a result computed elsewhere (contributions read from a profile file). Results live in
  the manager, not in ``node.meta``; the only meta an analysis writes is fx's own
  ``tensor_meta`` (``Shapes``), because rules, dumps and file writers read shapes from nodes.
* A ``Pass`` transforms the graph and returns ``modified``. It lists the analyses it needs in
  ``requires`` and the ones it keeps valid in ``preserves`` (classes: all their parameterisations
  survive); as in LLVM, the default is that a pass preserves nothing, so forgetting a declaration
  only costs a recomputation, never stale data.
* The ``PassManager`` runs passes in order. After each modifying pass it lints and recompiles
  the graph, invalidates what the pass did not preserve and refreshes the shapes of every node
  (``shapes``, unless the pass preserves them), so the IR always carries current shapes. It calls
  instruments before/after each pass (dumps, timing, verification) and wraps failures in an error
  that names the failing pass and the passes that ran before it.

>>> import torch, torch.fx as fx
>>> class CountNodes(Analysis):
...     name = "count-nodes"
...     def compute(self, gm, am):
...         return len(gm.graph.nodes)
>>> gm = fx.symbolic_trace(torch.nn.ReLU())
>>> am = AnalysisManager(gm)
>>> am.get(CountNodes), am.cached(CountNodes)
(3, True)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from .errors import InternalError, MdafxError, PassError

__all__ = ["Analysis", "AnalysisManager", "Pass", "PassResult", "Instrument", "PassManager"]


class Analysis:
    """A cached, read-only computation over a graph. Subclasses set ``name`` and ``compute``;
    ``key()`` returns the parameters that make two instances compute different results."""

    name: ClassVar[str] = "analysis"

    def compute(self, gm: fx.GraphModule, am: "AnalysisManager") -> Any:
        raise NotImplementedError

    def key(self) -> tuple:
        return ()


AnalysisLike = Analysis | type[Analysis]


def _instance(analysis: AnalysisLike) -> Analysis:
    return analysis() if isinstance(analysis, type) else analysis


class AnalysisManager:
    """Caches analysis results for one graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._cache: dict[tuple, Any] = {}

    @staticmethod
    def _key(analysis: Analysis) -> tuple:
        return (type(analysis), analysis.key())

    def get(self, analysis: AnalysisLike) -> Any:
        analysis = _instance(analysis)
        key = self._key(analysis)
        if key not in self._cache:
            self._cache[key] = analysis.compute(self.gm, self)
        return self._cache[key]

    def provide(self, analysis: AnalysisLike, result: Any) -> None:
        """Seed the result of ``analysis`` (computed elsewhere, e.g. read from a file)."""
        self._cache[self._key(_instance(analysis))] = result

    def cached(self, analysis: AnalysisLike) -> bool:
        return self._key(_instance(analysis)) in self._cache

    def invalidate(self, preserved: tuple[type, ...] = ()) -> None:
        for key in list(self._cache):
            if key[0] not in preserved:
                del self._cache[key]


class Pass:
    """A graph transformation. ``run`` returns whether it changed the graph."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[AnalysisLike, ...]] = ()
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        raise NotImplementedError


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    timings: list[tuple[str, float]] = field(default_factory=list)


class Instrument:
    """Hooks around each pass (MLIR's PassInstrumentation, TVM's PassInstrument). Every hook
    gets the analysis manager, so an instrument reads analyses (channel groups for a dump)
    through the same cache the passes use."""

    def run_before_pipeline(self, gm: fx.GraphModule, passes: list[Pass],
                            am: AnalysisManager) -> None: ...

    def run_before_pass(self, p: Pass, gm: fx.GraphModule, index: int,
                        am: AnalysisManager) -> None: ...

    def run_after_pass(self, p: Pass, gm: fx.GraphModule, index: int, modified: bool,
                       seconds: float, am: AnalysisManager) -> None: ...

    def run_after_pass_failed(self, p: Pass, gm: fx.GraphModule, index: int,
                              error: BaseException, am: AnalysisManager) -> None: ...


class PassManager:
    """Runs ``passes`` in order over one graph (module docstring). ``shapes`` is the analysis
    that refreshes ``tensor_meta`` after a modifying pass (``mdafx.passes.Shapes``)."""

    def __init__(self, passes: list[Pass], instruments: list[Instrument] | None = None, *,
                 shapes: type[Analysis] | None = None) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments or [])
        self.shapes = shapes

    def run(self, gm: fx.GraphModule, am: AnalysisManager | None = None) -> PassResult:
        am = am or AnalysisManager(gm)
        if am.gm is not gm:
            raise PassError("the analysis manager belongs to another graph")
        for inst in self.instruments:
            inst.run_before_pipeline(gm, self.passes, am)
        modified_any, timings = False, []
        for index, p in enumerate(self.passes, start=1):
            for inst in self.instruments:
                inst.run_before_pass(p, gm, index, am)
            start = time.perf_counter()
            try:
                for req in p.requires:
                    am.get(req)
                modified = p.run(gm, am)
                if not isinstance(modified, bool):
                    raise InternalError(f"{type(p).__name__}.run returned {type(modified).__name__}, "
                                    "not bool")
                if modified:
                    gm.graph.lint()
                    gm.recompile()
                    am.invalidate(p.preserves)
                    if self.shapes is not None and self.shapes not in p.preserves:
                        am.get(self.shapes)
            except Exception as e:
                for inst in self.instruments:
                    inst.run_after_pass_failed(p, gm, index, e, am)
                before = ", ".join(q.name for q in self.passes[: index - 1]) or "none"
                if isinstance(e, MdafxError) and not isinstance(e, PassError):
                    raise type(e)(f"in pass '{p.name}' (#{index}; ran before: {before}): {e}") from e
                if isinstance(e, PassError):
                    raise
                raise PassError(f"pass '{p.name}' (#{index}) failed; ran before: {before}: "
                                f"{type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - start
            timings.append((p.name, seconds))
            modified_any |= modified
            for inst in self.instruments:
                inst.run_after_pass(p, gm, index, modified, seconds, am)
        return PassResult(gm, modified_any, timings)
