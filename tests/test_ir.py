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


# ------------------------------------------------------------------ what the model runs


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


X = torch.randn(1, 3, 8, 8)


def test_a_forward_rebound_on_the_instance_is_what_is_traced():
    import types

    model = Small().eval()

    def doubled(self, x):
        return self.fc(self.conv(x).mean((2, 3))) * 2

    model.forward = types.MethodType(doubled, model)
    gm = trace(model, X)
    assert torch.allclose(gm(X), model(X)) and not torch.allclose(gm(X), Small.forward(model, X))
    assert type(model) is Small  # the class is left as it was


def test_hooks_on_the_model_are_refused_and_submodule_hooks_are_traced():
    model = Small().eval()
    handle = model.register_forward_hook(lambda m, a, out: out * 2)
    with pytest.raises(TraceError, match="forward hook"):
        trace(model, X)
    handle.remove()
    model.conv.register_forward_hook(lambda m, a, out: out * 3)
    gm = trace(model, X)
    assert torch.allclose(gm(X), model(X))


class AliasedInplace(Small):
    def forward(self, x):
        y = self.conv(x)
        z = y
        z += 1  # writes into y; fx records an out-of-place add: a different model
        return self.fc(y.mean((2, 3)))


def test_a_trace_that_computes_something_else_is_refused():
    with pytest.raises(TraceError, match="computes something else"):
        trace(AliasedInplace().eval(), X)


class ModuleInForward(Small):
    def forward(self, x):
        return self.fc(nn.ReLU()(self.conv(x)).mean((2, 3)))


def test_errors_point_at_the_users_line():
    with pytest.raises(TraceError) as err:
        trace(ModuleInForward(), X)
    assert "test_ir.py" in str(err.value) and "nn.ReLU()(self.conv(x))" in str(err.value)
    assert "mdafx/ir.py" not in str(err.value).split("at:")[1].splitlines()[0]


class OptionalArgs(Small):
    def forward(self, x, mask=None, scale=1.0):
        y = self.conv(x)
        if mask is not None:
            y = y * mask
        return self.fc(y.mean((2, 3))) * scale


def test_optional_forward_arguments_take_their_defaults():
    model = OptionalArgs().eval()
    gm = trace(model, X)
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    assert torch.allclose(gm(X), model(X))


def test_the_suggested_fix_works_end_to_end():
    from mdafx.api import channel_groups, masked_model, plan_random, prune

    with pytest.raises(TraceError, match=r"leaf_modules=\[DataDependent\]"):
        trace(Net(), torch.randn(1, 3, 8, 8))
    gm = trace(Net(), torch.randn(1, 3, 8, 8), leaf_modules=[DataDependent])
    cg = channel_groups(gm)
    assert "no channel rule for DataDependent" in cg.barriers["branch"]
    assert not bool((cg.roots("fc") == 0).any())  # around the leaf, channels stay prunable
    plan = plan_random(cg, 0.5, classes=[1])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(prune(gm, plan, cg=cg)(x), masked_model(gm, plan, cg)(x),
                              atol=1e-6)
