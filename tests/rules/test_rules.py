"""Per-op channel rule tables: each small module, pruned at several keep densities, equals its
masked model; targeted checks pin what each rule couples or freezes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdafx.api import channel_groups, trace
from mdafx.errors import UnsupportedOpError
from oracle import assert_exact


def cbr(i, o, **kw):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, **kw), nn.BatchNorm2d(o), nn.ReLU())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.body = nn.Sequential(cbr(8, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.body(x) + x)
        return self.head(x.mean((2, 3)))


class GroupedAndDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, groups=16)
        self.dw_mult = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.bn(self.dw_mult(F.relu(self.dw(self.grouped(self.a(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FlattenIntoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 6)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(self.a(x))
        x = x.view(x.size(0), 6 * 4 * 4)
        return self.fc2(F.relu(self.bn1(self.fc1(x))))


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


class ChannelsLast(nn.Module):
    """ConvNeXt-style block: permute to NHWC, Linear over channels, permute back, SE gate."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.se = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.a(x)
        y = self.down(F.gelu(self.up(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        y = y * torch.sigmoid(self.se(F.adaptive_avg_pool2d(y, 1)))
        return self.fc((x + y).mean((2, 3)))


class NormBarrier(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.b(self.gn(self.a(x)))
        return self.fc(self.ln(x.mean((2, 3))))


def _unknown(x):
    return torch.cumsum(x, dim=1)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.b(torch.cumsum(self.a(x), dim=1)).mean((2, 3)))


MODULES = [Residual, GroupedAndDepthwise, FlattenIntoLinear, CatSplit, Shuffle, ChannelsLast,
           NormBarrier, Unknown]


def _seeded(cls, seed=0):
    torch.manual_seed(seed)
    m = cls().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("density", [1.0, 0.6, 0.25])
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_equals_masked(cls, density, seed):
    assert_exact(_seeded(cls, seed), torch.randn(1, 3, 8, 8), density, seed=seed, classes=[4, 0, 2])


def _groups(model):
    gm = trace(model, torch.randn(1, 3, 8, 8))
    return gm, channel_groups(gm)


def test_identity_plan_keeps_outputs():
    m = _seeded(CatSplit)
    gm, cg, plan, pruned, err = assert_exact(m, torch.randn(1, 3, 8, 8), 1.0)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(pruned(x), m(x))


def test_residual_add_couples_operands():
    gm, cg = _groups(_seeded(Residual))
    stem, body = cg.roots("stem_2"), cg.roots("body_2")
    assert torch.equal(stem.reshape(-1), body.reshape(-1))


def test_depthwise_couples_in_and_out_grouped_keeps_whole_groups():
    gm, cg = _groups(_seeded(GroupedAndDepthwise))
    grouped, dw = cg.roots("grouped").reshape(-1), cg.roots("dw").reshape(-1)
    assert torch.equal(grouped, dw)
    a = cg.roots("a_2").reshape(-1)
    # groups=4: 2 input and 4 output channels per group share one root
    assert torch.equal(a.reshape(4, 2)[:, 0], grouped.reshape(4, 4)[:, 0])
    assert len(set(grouped.tolist())) == 4


def test_flatten_maps_features_to_channels():
    gm, cg = _groups(_seeded(FlattenIntoLinear))
    view = cg.roots("view").reshape(-1)
    channel = cg.roots("pool").reshape(-1)
    assert torch.equal(view, channel.repeat_interleave(16))


def test_norms_over_channels_freeze():
    gm, cg = _groups(_seeded(NormBarrier))
    assert bool((cg.roots("a_2") == 0).all())      # GroupNorm input
    assert bool((cg.roots("b") == 0).all())        # LayerNorm (over the mean of b) freezes b
    assert not bool((cg.roots("fc") == 0).any())   # logits stay prunable


def test_unknown_op_is_a_barrier_and_strict_raises():
    gm, cg = _groups(_seeded(Unknown))
    assert list(cg.barriers) == ["cumsum"]
    assert "no channel rule" in cg.barriers["cumsum"]
    assert bool((cg.roots("a_2") == 0).all()) and bool((cg.roots("cumsum") == 0).all())
    with pytest.raises(UnsupportedOpError, match="cumsum"):
        channel_groups(gm, strict=True)


class FrozenLogits(nn.Module):
    """Logits from a barrier: classes are selected by an index node instead of pruning."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return torch.cumsum(self.fc(self.a(x).mean((2, 3))), dim=1)


def test_class_selection_on_frozen_logits():
    m = _seeded(FrozenLogits)
    assert_exact(m, torch.randn(1, 3, 8, 8), 0.5, classes=[4, 1])
    gm, cg, plan, pruned, _ = assert_exact(m, torch.randn(1, 3, 8, 8), 1.0, classes=[4, 1])
    assert pruned.fc.out_features == 5  # frozen logits are not pruned, only selected
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(pruned(x), m(x)[:, [4, 1]], atol=1e-5)
