"""passes/logit_scaling.py: MDA §2.1's factors, InsertLogitScale and FoldLogitScale."""
from __future__ import annotations

import torch
import torch.nn as nn

from mdafx.instrument import run_pipeline
from mdafx.ir import trace
from mdafx.passes.logit_scaling import FoldLogitScale, InsertLogitScale, calibrate_scales


class Head(nn.Module):
    """Two Linear heads concatenated, the second one reordered: every foldable shape."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.a = nn.Linear(6, 2)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x).relu()
        return torch.cat([self.a(h), self.b(h)[:, [2, 0, 1]]], 1)


def test_calibrate_scales_and_degenerate_classes():
    logits = torch.tensor([[4.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 5.0, 1.0], [3.0, 0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 2])  # sample 3 (class 2) is misclassified
    s = calibrate_scales(logits, labels)
    assert torch.allclose(s.factors[:2], torch.tensor([1 / 3.0, 1 / 5.0]))
    assert torch.isclose(s.factors[2], torch.tensor(1 / ((4 + 2 + 5) / 3)))  # component-wide
    assert 2 in s.fallbacks and "no correctly classified" in s.fallbacks[2]
    negative = calibrate_scales(torch.tensor([[-1.0, -3.0]]), torch.tensor([0]))
    assert torch.equal(negative.factors, torch.ones(2)) and set(negative.fallbacks) == {0, 1}
    assert bool(torch.isfinite(negative.factors).all())


def test_insert_then_fold_through_cat_and_reordering_is_exact():
    gm = trace(Head(), torch.zeros(1, 4))
    x = torch.randn(5, 4)
    with torch.no_grad():
        before = gm(x)
    factors, offsets = torch.tensor([0.5, 4.0, 2.0, 3.0, 0.25]), torch.arange(5.0)
    run_pipeline([InsertLogitScale(factors, offsets)], gm, instruments=[])
    with torch.no_grad():
        scaled = gm(x)
    assert torch.allclose(scaled, before * factors + offsets, atol=1e-5)
    n_nodes = len(gm.graph.nodes)
    assert run_pipeline([FoldLogitScale()], gm, instruments=[]).modified
    assert len(gm.graph.nodes) == n_nodes - 4  # mul, add and their two constants
    assert not any(n.name.startswith("mdafx_scale") for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(gm(x), scaled, atol=1e-5)
    assert not run_pipeline([FoldLogitScale()], gm, instruments=[]).modified  # no-op case


def test_fold_leaves_a_scale_it_cannot_fold():
    """A conv head (or a max over classes) is not a Linear: the scale stays a node."""
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    gm = trace(net, torch.zeros(1, 3, 4, 4))
    run_pipeline([InsertLogitScale(torch.tensor([2.0, 3.0]))], gm, instruments=[])
    assert not run_pipeline([FoldLogitScale()], gm, instruments=[]).modified
    assert any(n.name == "mdafx_scale_0" for n in gm.graph.nodes)
