"""Shapes (analysis): the shape and dtype of every node for the graph's recorded input.

It runs fx's ShapeProp on a random input shaped like the placeholder's ``tensor_meta`` (the model
input is never pruned, so that shape survives every transform) and writes fx's own
``node.meta["tensor_meta"]``, the one node key the rest of mdafx reads shapes from. The pass
manager recomputes it after every transform that does not preserve it, so shapes never go stale.
Its result is the input shape it ran with.
"""
from __future__ import annotations

import torch.fx as fx

from mdafx.ir import example_input, input_shape, propagate_shapes
from mdafx.passmanager import Analysis, AnalysisManager


class Shapes(Analysis):
    """``tensor_meta`` of every node (module docstring)."""

    name = "shapes"

    def compute(self, gm: fx.GraphModule, am: AnalysisManager | None = None) -> tuple[int, ...]:
        propagate_shapes(gm, example_input(gm))
        return input_shape(gm)
