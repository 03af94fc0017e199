"""trace(): shapes on every node, and errors that name where tracing broke."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mdafx.errors import TraceError
from mdafx.ir import shape_of, trace


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: fx cannot trace it
            return x
        return -x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.branch = DataDependent()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.branch(self.stem(x)).mean((2, 3)))


def test_trace_records_shapes_on_every_node():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)),
               torch.randn(1, 3, 8, 8))
    shapes = {n.name: shape_of(n) for n in gm.graph.nodes if n.op != "output"}
    assert shapes == {"input_1": (1, 3, 8, 8), "_0": (1, 4, 6, 6), "_1": (1, 144), "_2": (1, 2)}


def test_untraceable_model_names_submodule_line_and_fix():
    with pytest.raises(TraceError) as err:
        trace(Net(), torch.randn(1, 3, 8, 8))
    message = str(err.value)
    assert "inside submodule: branch" in message
    assert "x.sum() > 0" in message and "test_ir.py" in message
    assert "leaf_modules" in message


def test_leaf_module_makes_it_traceable():
    gm = trace(Net(), torch.randn(1, 3, 8, 8), leaf_modules=[DataDependent])
    assert any(n.op == "call_module" and n.target == "branch" for n in gm.graph.nodes)
