"""Pass infrastructure: analyses, transforms, and the manager that runs a pipeline.

* An ``Analysis`` computes a result from a graph and changes nothing. Results are cached by the
  ``AnalysisManager`` per analysis class and fetched with ``am.get(Cls)``.
* A ``Pass`` transforms the graph and returns ``modified``. It lists the analyses it needs in
  ``requires`` and the ones it keeps valid in ``preserves``; as in LLVM, the default is that a
  pass preserves nothing, so forgetting a declaration only costs a recomputation.
* The ``PassManager`` runs passes in order, lints and recompiles after each modifying pass, calls
  instruments before/after each pass (dumps, timing, verification), and wraps failures in a
  PassError that names the failing pass and the passes that ran before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from .errors import MdafxError, PassError


class Analysis:
    """A cached, read-only computation over a graph. Subclasses set ``name`` and ``compute``."""

    name: ClassVar[str] = "analysis"

    def compute(self, gm: fx.GraphModule, am: "AnalysisManager") -> Any:
        raise NotImplementedError


class AnalysisManager:
    """Caches analysis results for one graph; ``provide`` seeds results computed elsewhere."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._cache: dict[type, Any] = {}
        self._factories: dict[type, Analysis] = {}

    def get(self, cls: type[Analysis]) -> Any:
        if cls not in self._cache:
            analysis = self._factories.get(cls) or cls()
            self._cache[cls] = analysis.compute(self.gm, self)
        return self._cache[cls]

    def provide(self, cls: type[Analysis], result: Any = None, *, factory: Analysis | None = None) -> None:
        """Seed a result (or a configured instance that computes it on first use)."""
        if factory is not None:
            self._factories[cls] = factory
            self._cache.pop(cls, None)
        else:
            self._cache[cls] = result

    def cached(self, cls: type[Analysis]) -> bool:
        return cls in self._cache

    def invalidate(self, preserved: tuple[type, ...] = ()) -> None:
        for cls in list(self._cache):
            if cls not in preserved:
                del self._cache[cls]


class Pass:
    """A graph transformation. ``run`` returns whether it changed the graph."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[type[Analysis], ...]] = ()
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        raise NotImplementedError


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    timings: list[tuple[str, float]] = field(default_factory=list)


class Instrument:
    """Hooks around each pass (MLIR's PassInstrumentation, TVM's PassInstrument)."""

    def run_before_pipeline(self, gm: fx.GraphModule, passes: list[Pass]) -> None: ...
    def run_before_pass(self, p: Pass, gm: fx.GraphModule, index: int) -> None: ...
    def run_after_pass(self, p: Pass, gm: fx.GraphModule, index: int, modified: bool, seconds: float) -> None: ...
    def run_after_pass_failed(self, p: Pass, gm: fx.GraphModule, index: int, error: BaseException) -> None: ...


class PassManager:
    def __init__(self, passes: list[Pass], instruments: list[Instrument] | None = None) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments or [])

    def run(self, gm: fx.GraphModule, am: AnalysisManager | None = None) -> PassResult:
        am = am or AnalysisManager(gm)
        for inst in self.instruments:
            inst.run_before_pipeline(gm, self.passes)
        modified_any, timings = False, []
        for index, p in enumerate(self.passes, start=1):
            for inst in self.instruments:
                inst.run_before_pass(p, gm, index)
            start = time.perf_counter()
            try:
                for req in p.requires:
                    am.get(req)
                modified = p.run(gm, am)
                if not isinstance(modified, bool):
                    raise TypeError(f"{type(p).__name__}.run returned {type(modified).__name__}, not bool")
                if modified:
                    gm.graph.lint()
                    gm.recompile()
                    am.invalidate(p.preserves)
            except Exception as e:
                for inst in self.instruments:
                    inst.run_after_pass_failed(p, gm, index, e)
                before = ", ".join(q.name for q in self.passes[: index - 1]) or "none"
                if isinstance(e, MdafxError) and not isinstance(e, PassError):
                    raise type(e)(f"in pass '{p.name}' (#{index}; ran before: {before}): {e}") from e
                raise PassError(f"pass '{p.name}' (#{index}) failed; ran before: {before}: "
                                f"{type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - start
            timings.append((p.name, seconds))
            modified_any |= modified
            for inst in self.instruments:
                inst.run_after_pass(p, gm, index, modified, seconds)
        return PassResult(gm, modified_any, timings)
