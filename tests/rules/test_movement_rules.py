"""Movement rules (mdafx/rules/movement.py): cat/split/chunk/slices, channel shuffle, index
tables (tensor indices), unbind, roll, squeeze. Each case: pruned == masked at several
densities."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oracle import assert_exact, cbr, pruned_equals_masked_test, seeded, traced_groups

X = torch.randn(1, 3, 8, 8)


class CatSplit(nn.Module):
    """Inception-style cat, a split with constant sizes, chunk, a slice and an int index."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 4), cbr(3, 6), cbr(3, 5)
        self.d = cbr(15, 10)
        self.e = cbr(4, 6)
        self.fc = nn.Linear(3 + 3 + 3 + 1, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x), self.c(x)], 1)
        p, q = torch.split(self.d(y), [4, 6], dim=1)
        r, s = self.e(p).chunk(2, dim=1)
        t = q[:, 1:4]
        u = q[:, 0:1]
        z = torch.cat([r, s, t, u], 1).mean((2, 3))
        return self.fc(z)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 6), cbr(3, 6)
        self.c = cbr(12, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, ch, h, w = y.size()
        y = y.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, ch, h, w)
        return self.fc(self.c(y).mean((2, 3)))


class Windows(nn.Module):
    """Swin-style: channels last, a cyclic shift, window partition and merge, a relative
    position table gathered by an index buffer, unbind of stacked tensors, squeeze(dim)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.table = nn.Parameter(torch.randn(7, 8) * 0.1)
        self.register_buffer("index", torch.randint(0, 7, (4,)))
        self.fc1 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)                        # [B, 4, 4, 8]
        x = torch.roll(x, shifts=(1, 1), dims=(1, 2))
        b = x.shape[0]
        w = x.view(b, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 8)
        w = w + self.table[self.index].unsqueeze(0)                 # [4, 8] per window token
        a, c = torch.stack([self.fc1(w), w], 0).unbind(0)
        x = (a + c).view(b, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 4, 8)
        return self.fc(x.mean((1, 2)).unsqueeze(1).squeeze(1))


MODULES = [CatSplit, Shuffle, Windows]


test_pruned_equals_masked = pruned_equals_masked_test(MODULES, X)


def _groups(model):
    return traced_groups(model, X)


def test_shuffle_couples_across_groups_only():
    gm, cg = _groups(Shuffle)
    a, b = cg.roots("a_2").reshape(-1), cg.roots("b_2").reshape(-1)
    assert torch.equal(a, b) and len(set(a.tolist())) == 6   # channel j of both groups


def test_index_table_roll_and_unbind_keep_channels_prunable():
    gm, cg = _groups(Windows)
    assert not cg.barriers
    stem = cg.roots("stem").reshape(-1)
    assert not bool((stem == 0).any())
    assert torch.equal(cg.roots("table")[0].reshape(-1), stem)  # the table's channels
    _, _, _, pruned, _ = assert_exact(seeded(Windows), X, 0.5, classes=[0, 1])
    assert pruned.table.shape == (7, pruned.stem.out_channels)
    assert pruned.index.shape == (4,)
