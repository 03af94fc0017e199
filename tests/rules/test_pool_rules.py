"""Pooling and reduction rules (mdafx/rules/pool.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdafx.api import channel_groups, trace
from oracle import cbr, pruned_equals_masked_test, seeded

X = torch.randn(1, 3, 8, 8)


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 + 8 + 1, 5)

    def forward(self, x):
        x = F.max_pool2d(self.a(x), 2)
        y = F.avg_pool2d(self.b(x), 2, ceil_mode=True)
        z = F.interpolate(y, scale_factor=2.0)
        spatial = z.sum(1, keepdim=True)             # a sum over channels: exact
        pooled = F.adaptive_max_pool2d(z, 1).flatten(1)
        values, _ = x.flatten(2).max(dim=2)
        return self.fc(torch.cat([pooled, values, spatial.mean((2, 3))], 1))


class MeanOverChannels(nn.Module):
    """CBAM's spatial gate: a mean over channels mixes them: its input is kept."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.a(x)
        gate = torch.sigmoid(x.mean(1, keepdim=True))
        return self.fc((self.b(x) * gate).amax((2, 3)))


MODULES = [Pools, MeanOverChannels]


test_pruned_equals_masked = pruned_equals_masked_test(MODULES, X)


def test_sum_over_channels_keeps_them_mean_freezes_them():
    gm = trace(seeded(Pools), X)
    cg = channel_groups(gm)
    assert not bool((cg.roots("b") == 0).any())
    gm = trace(seeded(MeanOverChannels), X)
    cg = channel_groups(gm)
    assert bool((cg.roots("a_2") == 0).all()) and not bool((cg.roots("b") == 0).any())
