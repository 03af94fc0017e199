"""passes/reconstruct.py: closed-form refits keep the architecture and bring a component closer
to its source on the calibration images."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from mdafx.api import channel_groups, plan_from_votes, plan_random, prune, trace
from mdafx.instrument import run_pipeline
from mdafx.passes.reconstruct import ReconstructLayers, kept_channels, residual_tails


class Net(nn.Module):
    """conv-bn (no bias: the intercept goes into the norm), a grouped conv with bias, a
    residual add, flatten into a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.c3 = nn.Conv2d(12, 12, 1, bias=False)
        self.b3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4, 4)

    def forward(self, x):
        h = self.b1(self.c1(x)).relu()
        h = self.b3(self.c3(self.c2(h).relu())) + h
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h.relu(), 2), 1))


def _setup(seed=0):
    torch.manual_seed(seed)
    net = Net().eval()
    for m in net.modules():  # informative norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    gm = trace(net, torch.zeros(1, 3, 8, 8))
    cg = channel_groups(gm)
    plan = plan_random(cg, 0.5, seed=seed, classes=[1, 2])   # half of every coupled group
    return gm, prune(gm, plan, cg=cg), kept_channels(gm, plan, cg)


def _error(gm, module, x):
    with torch.no_grad():
        return float((module(x) - gm(x)[:, [1, 2]]).pow(2).mean())


def test_reconstruction_keeps_the_architecture_and_reduces_the_error():
    gm, comp, kept = _setup()
    calib, held = torch.randn(256, 3, 8, 8), torch.randn(128, 3, 8, 8)
    before = copy.deepcopy(comp)
    shapes = {k: v.shape for k, v in before.state_dict().items()}
    p = ReconstructLayers(gm, kept, calib, ridge=1e-3)
    assert _error(gm, before, calib) > 0                       # the test can fail
    result = run_pipeline([p], comp, instruments=[])
    assert result.modified and set(p.refitted) == {"c1", "c2", "c3", "fc"}
    assert {k: v.shape for k, v in comp.state_dict().items()} == shapes
    assert comp.code == before.code                     # same graph, same modules
    assert _error(gm, comp, calib) < 0.5 * _error(gm, before, calib)
    assert _error(gm, comp, held) < _error(gm, before, held)   # not only on the fit


def test_head_matches_the_source_logits_exactly_when_nothing_was_pruned():
    """With every channel kept, the source itself is the least-squares solution: refitting
    reproduces it (up to the ridge)."""
    gm, _, _ = _setup()
    cg = channel_groups(gm)
    full = prune(gm, plan_from_votes(cg, {}, [1, 2]), cg=cg)
    kept = {n: torch.arange(gm.get_submodule(t).weight.shape[0])
            for n, t in (("c1", "c1"), ("c2", "c2"), ("c3", "c3"))}
    kept["fc"] = torch.tensor([1, 2])
    x = torch.randn(256, 3, 8, 8)
    run_pipeline([ReconstructLayers(gm, kept, x, ridge=1e-8)], full, instruments=[])
    assert _error(gm, full, x) < 1e-8


def test_reconstruction_refuses_a_graph_that_is_not_its_source():
    gm, comp, kept = _setup()
    other = trace(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.zeros(1, 3, 8, 8))
    with pytest.raises(Exception, match="not the component's source"):
        run_pipeline([ReconstructLayers(other, kept, torch.randn(8, 3, 8, 8))], comp,
                     instruments=[])


class Block(nn.Module):
    """A ResNet BasicBlock with a 1x1 conv-bn shortcut, and a tap that reads conv2 twice."""

    def __init__(self, tap: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.short = nn.Conv2d(3, 8, 1, bias=False)
        self.bn_short = nn.BatchNorm2d(8)
        self.tap = tap

    def forward(self, x):
        h = self.conv2(self.bn1(self.conv1(x)).relu())
        out = self.bn2(h) + self.bn_short(self.short(x))
        return out + h if self.tap else out


@pytest.mark.parametrize("model, expected", [
    (Net(), {"add": ("c3", "b3", 0)}),                        # conv-bn + identity
    (Block(), {"add": ("conv2", "bn2", 0)}),                  # the 3x3, not the 1x1 shortcut
    (Block(tap=True), {"add": ("short", "bn_short", 1)}),     # conv2 has a second reader
])
def test_residual_tails_pick_the_largest_layer_that_only_reaches_the_sum(model, expected):
    gm = trace(model.eval(), torch.zeros(1, 3, 8, 8))
    names = {n.name for n in gm.graph.nodes if n.op == "call_module"}
    assert residual_tails(gm, names) == expected


class Deeper(nn.Module):
    """A residual block whose shortcut already carries an error: its input went through a
    layer that lost input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        h = self.b2(self.c2(self.b1(self.c1(x)).relu())).relu()
        h = (self.b3(self.c3(h)) + h).relu()
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def _sum_error(gm, comp, kept, x):
    """Squared error of the component's residual sum against the source's on kept channels."""
    from mdafx.ir import eval_mode

    outs = {}
    for name, module in (("src", gm), ("comp", comp)):
        class Grab(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.name == "add":
                    outs[name] = out
                return out
        with eval_mode(module), torch.no_grad():
            Grab(module).run(x)
    return float((outs["comp"] - outs["src"][:, kept["c3"]]).pow(2).mean())


def test_fitting_through_the_sum_matches_the_sum_better_than_the_layer_alone():
    torch.manual_seed(0)
    gm = trace(Deeper().eval(), torch.zeros(1, 3, 8, 8))
    cg = channel_groups(gm)
    plan = plan_random(cg, 0.5, seed=0, classes=[1, 2])
    comp, kept = prune(gm, plan, cg=cg), kept_channels(gm, plan, cg)
    x = torch.randn(256, 3, 8, 8)
    errors = {}
    for through in (False, True):
        fitted = copy.deepcopy(comp)
        run_pipeline([ReconstructLayers(gm, kept, x, ridge=1e-6, through_sums=through)],
                     fitted, instruments=[])
        errors[through] = _sum_error(gm, fitted, kept, x)
    assert errors[True] < 0.98 * errors[False]   # the least-squares optimum of the sum


@pytest.mark.parametrize("images", [64, 512])
def test_targets_keep_only_the_rows_that_enter_the_fit(images):
    """The source's outputs are stored as at most about ``max_rows`` rows per layer (plus one
    per chunk, where a chunk's first row is sampled), however many images calibrate: memory is
    bounded by the fit, not by the data. The fit still reduces the error."""
    gm, comp, kept = _setup()
    x = torch.randn(images, 3, 8, 8)
    p = ReconstructLayers(gm, kept, x, ridge=1e-3, max_rows=300, chunk=32)
    targets = p._targets(["c1", "c2", "c3", "fc"], {})
    chunks = -(-images // 32)
    for name, t in targets.items():
        assert t.rows.shape[0] <= 300 + chunks, name
        assert t.rows.shape[1] == len(kept[name])
        assert t.rows.is_contiguous() and t.rows.untyped_storage().nbytes() == t.rows.nbytes
    before = _error(gm, comp, x)
    run_pipeline([p], comp, instruments=[])
    assert _error(gm, comp, x) < before
