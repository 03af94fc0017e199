"""Whole-model properties over a zoo that covers every channel rule (MDA.md §1.4 oracle)."""
from __future__ import annotations

import pytest
import torch

from mdafx.api import channel_groups, trace
from mdafx.passes.channel_groups import barrier_report
from oracle import assert_exact
from zoo import CI_ZOO, build


@pytest.mark.parametrize("name", list(CI_ZOO))
def test_pruned_equals_masked_and_identity(name):
    model, example = build(name)
    # identity: keeping everything (and every class, in order) changes nothing
    gm, cg, plan, pruned, _ = assert_exact(model, example, 1.0, classes=list(range(10)))
    x = torch.randn(2, *example.shape[1:])
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), rtol=0, atol=1e-5)
    # random keep-masks at two densities and a random subset of classes
    for density, seed in ((0.6, 1), (0.3, 2)):
        classes = torch.randperm(10, generator=torch.Generator().manual_seed(seed))[:3].tolist()
        _, _, _, pruned, _ = assert_exact(model, example, density, seed=seed, classes=classes)
        assert pruned(x).shape == (2, 3)


def test_vit_heads_and_mlp_are_prunable_the_stream_is_kept():
    model, example = build("vit_b_16")
    gm = trace(model, example)
    cg = channel_groups(gm)
    assert not cg.barriers  # nn.MultiheadAttention is traced as its functional ops
    report = barrier_report(gm, cg)
    assert report.share > 0.7, report.lines()  # heads and MLP hidden channels
    assert any("normalises across channels" in r for _, _, r in report.freezes)
