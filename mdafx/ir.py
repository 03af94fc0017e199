"""The graph IR: torch.fx GraphModules with shapes on every node.

``trace`` is the only way models enter mdafx. It returns a GraphModule whose nodes carry
``node.meta["tensor_meta"]`` (fx's ShapeProp) for an example input, so every later pass can read
shapes without running the model again.

Meta keys written by mdafx passes are namespaced ``mdafx.<thing>`` and listed here.
"""
from __future__ import annotations

import traceback
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError

META_IDS = "mdafx.ids"            # channel-id tensor(s) of the node's output (ChannelGroups)
META_RULE = "mdafx.rule"          # name of the channel rule that handled the node
META_BARRIER = "mdafx.barrier"    # why the node keeps all its channels, if it does
META_KEPT = "mdafx.kept"          # (kept, total) channels of the output after pruning
META_MASK = "mdafx.mask"          # per-class channel masks (Locate)


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
        was_training = model.training
        model.eval()
        tracer = _ReportingTracer(leaf_modules)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as e:  # fx raises many types; all mean "not traceable"
            where = (tracer.failed_in or [type(model).__name__])[-1]
            frames = [f for f in traceback.extract_tb(e.__traceback__) if "torch/fx" not in f.filename]
            line = f"{frames[-1].filename}:{frames[-1].lineno} `{frames[-1].line}`" if frames else "?"
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
                f"  inside submodule: {where}\n  at: {line}\n"
                "  Fix: make that submodule a leaf (trace(..., leaf_modules=[ItsClass]); its "
                "channels are then kept as a barrier), or pass concrete_args for Python control "
                "flow that depends on inputs."
            ) from e
        finally:
            model.train(was_training)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.eval()
    propagate_shapes(gm, example)
    return gm


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Fill ``node.meta['tensor_meta']`` for ``example`` (fx's ShapeProp)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(example)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: torch.nn.Module, input_shape) -> int:
    """Multiply-accumulates of one forward at ``input_shape`` (FLOPs / 2, FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.zeros(*input_shape))
    finally:
        module.train(was_training)
    return int(counter.get_total_flops()) // 2
