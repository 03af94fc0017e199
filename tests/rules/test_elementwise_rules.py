"""Element-wise rules (mdafx/rules/elementwise.py): residual adds, gates, layer scale and
position embeddings as parameters read as data, addcmul, constant operands, PReLU, functional
activations. Each case: pruned == masked at several densities."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdafx.api import channel_groups
from oracle import assert_exact, cbr, pruned_equals_masked_test, seeded, traced_groups

X = torch.randn(1, 3, 8, 8)


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


class LayerScale(nn.Module):
    """ConvNeXt/CaiT layer scale and an SE gate: a parameter multiplied into the stream."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.se = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv(x) * self.gamma.view(1, -1, 1, 1)
        y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        return self.fc((x + y).mean((2, 3)))


class Tokens(nn.Module):
    """A ViT's front: patches, a class token (cat along tokens), a learned position embedding
    added, a constant attention-like mask added (it must not freeze the channels)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        self.register_buffer("bias", torch.randn(5, 1) * 0.1)   # a constant over tokens
        self.fc1 = nn.Linear(8, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.bias
        return self.fc(F.gelu(self.fc1(x[:, 0])))


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.prelu = nn.PReLU(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.prelu(self.a(x))
        x = F.hardswish(F.silu(F.mish(F.selu(x)))) + F.softplus(x) * F.celu(x)
        x = torch.where(x > 0, x, 0.1 * x).clamp(-3, 3) + torch.exp(-x.abs())
        x = F.normalize(self.b(x), dim=1)     # exact: a dropped channel leaves the norm
        return self.fc(x.mean((2, 3)))


def _unknown(x):
    return torch.logcumsumexp(x, dim=1)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.b(torch.logcumsumexp(self.a(x), dim=1)).mean((2, 3)))


class FrozenLogits(nn.Module):
    """Logits from a barrier: classes are selected by an index node instead of pruning."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return torch.logcumsumexp(self.fc(self.a(x).mean((2, 3))), dim=1)


class Addcmul(nn.Module):
    """ResMLP's Affine and ConvNeXt-V2's GRN: ``torch.addcmul(beta, alpha, x)`` with per-channel
    parameters, and the method form on the stream."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.alpha = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.beta = nn.Parameter(torch.randn(8, 1, 1) * 0.1)
        self.conv = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.addcmul(self.beta, self.alpha, x)
        y = x.addcmul(self.conv(y), y, value=0.5)
        return self.fc(y.mean((2, 3)))


MODULES = [Residual, LayerScale, Tokens, Activations, Unknown, FrozenLogits, Addcmul]


test_pruned_equals_masked = pruned_equals_masked_test(MODULES, X)


def _groups(model):
    return traced_groups(model, X)


def test_residual_add_couples_operands():
    gm, cg = _groups(Residual)
    assert torch.equal(cg.roots("stem_2").reshape(-1), cg.roots("body_2").reshape(-1))


def test_layer_scale_parameter_is_coupled_and_sliced():
    gm, cg = _groups(LayerScale)
    assert not cg.barriers and not bool((cg.roots("conv") == 0).any())
    assert torch.equal(cg.roots("gamma").reshape(-1), cg.roots("conv").reshape(-1))
    _, _, _, pruned, _ = assert_exact(seeded(LayerScale), X, 0.5, classes=[0, 1])
    assert pruned.gamma.shape == (pruned.conv.out_channels,)


def test_addcmul_couples_its_three_operands_and_slices_the_parameters():
    gm, cg = _groups(Addcmul)
    assert not cg.barriers and not bool((cg.roots("stem_2") == 0).any())
    stem = cg.roots("stem_2").reshape(-1)
    for name in ("alpha", "beta", "conv"):
        assert torch.equal(cg.roots(name).reshape(-1), stem), name
    _, _, _, pruned, _ = assert_exact(seeded(Addcmul), X, 0.5, classes=[0, 1])
    assert pruned.alpha.shape == pruned.beta.shape == (pruned.conv.out_channels, 1, 1)


def test_class_token_and_position_embedding_follow_the_stream():
    gm, cg = _groups(Tokens)
    assert not cg.barriers
    patch = cg.roots("patch").reshape(-1)
    assert not bool((patch == 0).any())                      # the constant did not freeze it
    assert torch.equal(cg.roots("cls").reshape(-1), patch)   # coupled by the cat
    _, _, _, pruned, _ = assert_exact(seeded(Tokens), X, 0.5, classes=[0, 1])
    kept = pruned.patch.out_channels
    assert pruned.cls.shape == (1, 1, kept) and pruned.pos.shape == (1, 5, kept) < (1, 5, 8)
    assert pruned.bias.shape == (5, 1)                        # a constant: never sliced


def test_unknown_op_is_a_barrier_and_strict_raises():
    from mdafx.errors import UnsupportedOpError

    gm, cg = _groups(Unknown)
    assert list(cg.barriers) == ["logcumsumexp"]
    assert "no channel rule" in cg.barriers["logcumsumexp"]
    assert bool((cg.roots("a_2") == 0).all()) and bool((cg.roots("logcumsumexp") == 0).all())
    with pytest.raises(UnsupportedOpError, match="logcumsumexp"):
        channel_groups(gm, strict=True)


def test_class_selection_on_frozen_logits():
    m = seeded(FrozenLogits)
    gm, cg, plan, pruned, _ = assert_exact(m, X, 1.0, classes=[4, 1])
    assert pruned.fc.out_features == 5  # frozen logits are not pruned, only selected
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(pruned(x), m(x)[:, [4, 1]], atol=1e-5)


def test_identity_plan_keeps_outputs():
    m = seeded(Tokens)
    gm, cg, plan, pruned, err = assert_exact(m, X, 1.0)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(pruned(x), m(x), atol=1e-6)
