"""Padding rules (mdafx/rules/pad.py): spatial padding keeps channels, padding the channel dim
adds frozen channels, reflect padding makes its dim one unit."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdafx.api import channel_groups, trace
from oracle import DENSITIES, assert_exact, cbr, seeded

X = torch.randn(1, 3, 8, 8)


class Pads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.zero = nn.ZeroPad2d((1, 0, 1, 0))
        self.b = nn.Conv2d(8, 8, 2)
        self.refl = nn.ReflectionPad2d(1)
        self.c = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 + 2, 5)

    def forward(self, x):
        x = self.b(self.zero(self.a(x)))
        x = self.c(self.refl(F.pad(x, (1, 1, 1, 1), value=0.5)))
        # a channel-dim pad of an NHWC tensor (the "zero channels" shortcut): new, frozen
        y = F.pad(x.permute(0, 2, 3, 1), (0, 2))
        return self.fc(y.mean((1, 2)))


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_equals_masked(density, seed):
    assert_exact(seeded(Pads, seed), X, density, seed=seed, classes=[4, 0, 2])


def test_spatial_pad_keeps_channels_channel_pad_adds_frozen_ones():
    gm = trace(seeded(Pads), X)
    cg = channel_groups(gm)
    assert not cg.barriers
    assert torch.equal(cg.roots("zero"), cg.roots("a_2"))
    c = cg.roots("c").reshape(-1)
    padded = cg.roots("pad_1").reshape(-1)
    assert torch.equal(padded[:8], c) and padded[8:].tolist() == [0, 0]
    assert not bool((c == 0).any())
