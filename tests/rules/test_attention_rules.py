"""Attention (mdafx/rules/attention.py): timm's Attention (qkv Linear, reshape to heads, matmul,
softmax, matmul, proj), its fused form (F.scaled_dot_product_attention), a relative position
bias, nn.MultiheadAttention (traced as its functional ops). Heads are pruned whole: q/k/v head
dims coupled, ``num_heads`` constants rewritten."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdafx.api import channel_groups, trace
from oracle import DENSITIES, assert_exact, seeded

X = torch.randn(1, 3, 16, 16)
HEADS, HEAD_DIM, WIDTH = 4, 3, 12


class Attention(nn.Module):
    def __init__(self, fused=False, rel_pos=False, einsum=False):
        super().__init__()
        self.fused, self.rel_pos, self.einsum = fused, rel_pos, einsum
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.table = nn.Parameter(torch.randn(9, HEADS) * 0.1)
        self.register_buffer("index", torch.randint(0, 9, (16 * 16,)))

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        elif self.einsum:  # torchvision MaxViT's form
            attn = torch.einsum("bhid,bhjd->bhij", q * HEAD_DIM ** -0.5, k).softmax(-1)
            x = torch.einsum("bhij,bhjd->bhid", attn, v)
        else:
            attn = (q * HEAD_DIM ** -0.5) @ k.transpose(-2, -1)
            if self.rel_pos:
                bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1)
                attn = attn + bias.unsqueeze(0)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = Attention(**kw)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 24), nn.Linear(24, WIDTH)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.patch = nn.Conv2d(3, WIDTH, 4, stride=4)
        self.block = Block(**kw)
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.block(x).mean(1))


class TorchMHA(nn.Module):
    """torchvision's encoder block: nn.MultiheadAttention (batch first) + MLP."""

    def __init__(self, need_weights=False):
        super().__init__()
        self.need_weights = need_weights
        self.patch = nn.Conv2d(3, WIDTH, 4, stride=4)
        self.ln = nn.LayerNorm(WIDTH)
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        y = self.ln(x)
        y, _ = self.mha(y, y, y, need_weights=self.need_weights)
        return self.head((x + y).mean(1))


CASES = {
    "timm": lambda: ViT(),
    "fused": lambda: ViT(fused=True),
    "rel_pos": lambda: ViT(rel_pos=True),
    "einsum": lambda: ViT(einsum=True),
    "mha": lambda: TorchMHA(),
    "mha_weights": lambda: TorchMHA(need_weights=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_equals_masked(case, density, seed):
    assert_exact(seeded(CASES[case](), seed), X, density, seed=seed, classes=[4, 0, 2])


def _heads_of(roots: torch.Tensor) -> list[int]:
    """Root of each head from a qkv output's roots laid out as (3, heads, head_dim)."""
    r = roots.reshape(3, HEADS, HEAD_DIM)
    assert bool((r == r[:1, :, :1]).all()), "q/k/v and head dims of one head not coupled"
    return r[0, :, 0].tolist()


@pytest.mark.parametrize("case", ["timm", "fused", "rel_pos", "einsum"])
def test_heads_are_whole_units(case):
    gm = trace(seeded(CASES[case]()), X)
    cg = channel_groups(gm)
    assert not cg.barriers
    heads = _heads_of(cg.roots("block_attn_qkv").reshape(-1))
    assert len(set(heads)) == HEADS and 0 not in heads
    assert bool((cg.roots("patch") == 0).all())                 # the stream: LayerNorm
    assert not bool((cg.roots("block_fc1") == 0).any())         # the MLP: prunable


@pytest.mark.parametrize("case", ["timm", "rel_pos", "mha"])
def test_pruning_drops_whole_heads_and_rewrites_num_heads(case):
    for seed in range(6):
        gm, cg, plan, pruned, _ = assert_exact(seeded(CASES[case]()), X, 0.5, seed=seed,
                                               classes=[0, 1])
        reshapes = [n for n in pruned.graph.nodes if n.target in ("reshape", torch.reshape)
                    and len(n.args) == 6]
        kept_heads = reshapes[0].args[4]
        if kept_heads < HEADS:
            break
    else:
        pytest.fail("no plan dropped a head")
    qkv = pruned.get_submodule("block.attn.qkv") if case != "mha" else None
    if qkv is not None:
        assert qkv.out_features == 3 * kept_heads * HEAD_DIM
        assert pruned.get_submodule("block.attn.proj").in_features == kept_heads * HEAD_DIM
    if case == "rel_pos":
        assert pruned.get_submodule("block.attn").table.shape == (9, kept_heads)


def test_multihead_attention_is_traced_as_functional_ops():
    gm = trace(seeded(TorchMHA()), X)
    targets = {n.target for n in gm.graph.nodes}
    assert F.scaled_dot_product_attention in targets and F.linear in targets
    assert "mha" not in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    cg = channel_groups(gm)
    assert not cg.barriers
