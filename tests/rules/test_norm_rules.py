"""Norm rules (mdafx/rules/norm.py): BatchNorm as module and F.batch_norm (timm's norm+act
layers), frozen-BN arithmetic on buffers, GroupNorm by whole groups, LayerNorm/RMSNorm freezing
only what they normalise."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oracle import assert_exact, cbr, pruned_equals_masked_test, seeded, traced_groups

X = torch.randn(1, 3, 8, 8)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward calls F.batch_norm."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.0, self.eps)
        return F.relu(x)


class FrozenBatchNorm(nn.Module):
    """torchvision's FrozenBatchNorm2d: arithmetic on buffers."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n) * 0.1)
        self.register_buffer("running_mean", torch.randn(n) * 0.1)
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bna = BatchNormAct(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fbn = FrozenBatchNorm(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.gn = nn.GroupNorm(4, 8)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.fbn(self.c2(self.bna(self.c1(x))))
        x = self.c4(F.relu(self.gn(self.c3(x))))
        x = F.group_norm(x, 2, self.w, None)
        return self.fc(x.mean((2, 3)))


class Stream(nn.Module):
    """A pre-norm residual stream: LayerNorm freezes the stream, not the MLP inside it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.ln = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)          # [B, 4, 8] tokens
        x = x + self.fc2(F.gelu(self.fc1(self.ln(x))))
        return self.head(self.rms(x).mean(1))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: permute, F.layer_norm over channels, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = LayerNorm2d(8)
        self.pw1, self.pw2 = nn.Conv2d(8, 32, 1), nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw2(F.gelu(self.pw1(self.norm(self.dw(x)))))
        return self.fc(x.mean((2, 3)))


MODULES = [Norms, Stream, ConvNeXtish]


test_pruned_equals_masked = pruned_equals_masked_test(MODULES, X)


def _groups(model):
    return traced_groups(model, X)


def test_functional_batch_norm_and_buffer_arithmetic_keep_channels_prunable():
    gm, cg = _groups(Norms)
    assert not cg.barriers
    assert cg.rules["batch_norm"] == "batchnorm_function_rule"
    for name in ("c1", "c2"):
        assert not bool((cg.roots(name) == 0).any()), name
    _, _, plan, pruned, _ = assert_exact(seeded(Norms), X, 0.5, classes=[0, 1])
    assert pruned.bna.running_mean.shape == pruned.bna.weight.shape == (pruned.c1.out_channels,)
    assert pruned.fbn.weight.shape == (pruned.c2.out_channels,)


def test_group_norm_keeps_or_drops_whole_groups():
    gm, cg = _groups(Norms)
    c3 = cg.roots("c3").reshape(4, 2)
    assert torch.equal(c3[:, 0], c3[:, 1])              # 4 groups of 2
    assert len(set(c3[:, 0].tolist())) == 4
    _, _, plan, pruned, _ = assert_exact(seeded(Norms), X, 0.5, seed=3, classes=[0, 1])
    assert pruned.gn.num_groups * 2 == pruned.gn.num_channels == pruned.c3.out_channels


def test_layer_norm_freezes_the_stream_but_not_the_mlp():
    gm, cg = _groups(Stream)
    assert bool((cg.roots("stem") == 0).all())          # the stream the norm reads
    assert not bool((cg.roots("fc1") == 0).any())       # the MLP's hidden channels
    assert "normalises across channels" in cg.notes["ln"]


def test_layer_norm_2d_freezes_its_stream_only():
    gm, cg = _groups(ConvNeXtish)
    assert bool((cg.roots("dw") == 0).all())
    assert not bool((cg.roots("pw1") == 0).any())
