"""The graph IR: torch.fx GraphModules with shapes on every node, and the helpers every layer
above shares (one copy each).

``trace`` is the only way models enter mdafx. It returns a GraphModule whose nodes carry
``node.meta["tensor_meta"]`` (fx's ShapeProp) for an example input, so every later pass can read
shapes without running the model again; the pass manager refreshes them after each transform.

The only mdafx key in ``node.meta`` is :data:`META_KEPT`, which PruneChannels writes for dumps;
analysis results live in the analysis manager (``mdafx.passmanager``).
"""
from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterable, Iterator

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import PreconditionError, TraceError

__all__ = ["META_KEPT", "trace", "propagate_shapes", "shape_of", "input_shape", "example_input",
           "eval_mode", "module_device", "count_params", "count_macs"]

META_KEPT = "mdafx.kept"          # (kept, total) channels of the output after pruning (dumps)


class _ReportingTracer(fx.Tracer):
    """A Tracer that remembers which module it was inside, to name it when tracing fails."""

    def __init__(self, leaf_modules: Iterable[type] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf_modules)
        self.path: list[str] = []
        self.failed_in: list[str] | None = None  # the module path when tracing first failed

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.path)
            raise
        finally:
            self.path.pop()


def trace(
    model: torch.nn.Module,
    example: torch.Tensor,
    *,
    leaf_modules: Iterable[type] = (),
    concrete_args: dict | None = None,
) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) into a GraphModule with shapes for ``example``.

    Raises TraceError naming the submodule and source line that torch.fx could not trace.
    """
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        tracer = _ReportingTracer(leaf_modules)
        with eval_mode(model):
            try:
                graph = tracer.trace(model, concrete_args=concrete_args)
            except Exception as e:  # fx raises many types; all mean "not traceable"
                raise _trace_error(model, tracer, e) from e
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.eval()
    propagate_shapes(gm, example)
    return gm


def _trace_error(model: torch.nn.Module, tracer: _ReportingTracer, e: Exception) -> TraceError:
    where = (tracer.failed_in or [type(model).__name__])[-1]
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "torch/fx" not in f.filename]
    line = f"{frames[-1].filename}:{frames[-1].lineno} `{frames[-1].line}`" if frames else "?"
    return TraceError(
        f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
        f"  inside submodule: {where}\n  at: {line}\n"
        "  Fix: make that submodule a leaf (trace(..., leaf_modules=[ItsClass]); its "
        "channels are then kept as a barrier), or pass concrete_args for Python control "
        "flow that depends on inputs.")


class _ShapeProp(fx.Interpreter):
    """fx's ShapeProp (the same ``tensor_meta`` and ``type`` keys), failing with one line that
    names the node that does not execute instead of printing a traceback."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise PreconditionError(f"the graph does not execute at node {n.format_node()}: "
                                    f"{type(e).__name__}: {first}") from e
        found = False

        def meta(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        value = fx.node.map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = value
        n.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Fill ``node.meta['tensor_meta']`` for ``example`` (fx's ShapeProp), in eval mode; a node
    that does not execute is a PreconditionError naming it."""
    with eval_mode(gm), torch.no_grad():
        _ShapeProp(gm).run(example)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _placeholder(gm: fx.GraphModule) -> fx.Node:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise PreconditionError(f"mdafx models take one input tensor; this graph has "
                                f"{len(placeholders)} placeholders")
    return placeholders[0]


def input_shape(gm: fx.GraphModule) -> tuple[int, ...]:
    """The recorded shape of the graph's one input (batch included), from its placeholder."""
    ph = _placeholder(gm)
    shape = shape_of(ph)
    if shape is None:
        raise PreconditionError(f"placeholder {ph.name} has no shape: trace the model with "
                                "mdafx.trace first")
    return shape


def example_input(gm: fx.GraphModule, batch: int | None = None, *, seed: int | None = 0,
                  ) -> torch.Tensor:
    """A random input of the graph's recorded shape (``batch`` rows if given), in its dtype;
    drawn from its own generator, so the global RNG is untouched."""
    ph = _placeholder(gm)
    shape = list(input_shape(gm))
    if batch is not None:
        shape[0] = batch
    dtype = ph.meta["tensor_meta"].dtype
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(shape, generator=generator).to(dtype)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module.eval()`` for the duration, then every submodule gets back its own training
    flag (a model with some submodules frozen in eval mode stays that way)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module with none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: torch.nn.Module, shape: Iterable[int] | None = None) -> int:
    """Multiply-accumulates of one forward at input ``shape`` (default: the graph's recorded
    input at batch 1), as FLOPs / 2 from torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    if shape is None:
        if not isinstance(module, fx.GraphModule):
            raise PreconditionError("count_macs needs the input shape of a plain nn.Module")
        shape = (1, *input_shape(module)[1:])
    device = module_device(module)
    with eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(*shape, device=device))
    return int(counter.get_total_flops()) // 2
