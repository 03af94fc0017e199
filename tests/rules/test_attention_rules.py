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
    def __init__(self, fused=False, rel_pos=False, einsum=False, module=False, cpb=False):
        super().__init__()
        self.fused, self.rel_pos, self.einsum, self.cpb = fused, rel_pos or cpb, einsum, cpb
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.table = nn.Parameter(torch.randn(9, HEADS) * 0.1)
        self.register_buffer("index", torch.randint(0, 9, (16 * 16,)))
        # Swin's nn.Softmax(dim=-1); Swin V2's continuous position bias: an MLP on a fixed
        # table of coordinates (its input does not depend on the sample)
        self.softmax = nn.Softmax(dim=-1) if module else None
        self.register_buffer("coords", torch.randn(9, 2))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, HEADS))

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
                table = self.cpb_mlp(self.coords) if self.cpb else self.table
                bias = table[self.index].view(N, N, -1).permute(2, 0, 1)
                attn = attn + bias.unsqueeze(0)
            x = (self.softmax(attn) if self.softmax is not None else attn.softmax(dim=-1)) @ v
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
    "softmax_module": lambda: ViT(module=True),
    "cpb": lambda: ViT(cpb=True),
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


@pytest.mark.parametrize("case", ["timm", "fused", "rel_pos", "einsum", "softmax_module", "cpb"])
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


def test_a_layer_on_a_fixed_table_is_not_profiled_and_the_mda_path_is_exact():
    """Swin V2's position-bias MLP sees no sample: it has no contributions (its inputs are
    kept), and profile -> locate -> cut still equals the masked model of the task's plan."""
    from mdafx.api import build_profile, cut, masked_model, source_analyses
    from mdafx.passes.locate import Thresholds
    from mdafx.passes.prune_channels import TaskPlan
    from mdafx.rules import weighted_layer

    model = seeded(CASES["cpb"]())
    gm = trace(model, X)
    layers = {str(n.target): weighted_layer(n, gm) for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)}
    assert layers["block.attn.cpb_mlp.0"] is None and layers["block.attn.cpb_mlp.2"] is None
    assert layers["block.attn.qkv"] is not None and layers["head"] is not None
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(10, *X.shape[1:], generator=g), torch.arange(5).repeat(2)
    prof = build_profile(gm, [(images, labels)], 5, progress=False)
    assert "block.attn.cpb_mlp.0" not in prof.layers
    cg = channel_groups(gm)
    am = source_analyses(gm, prof, cg)
    comp = cut(gm, prof, [3, 1], am=am)
    x = torch.randn(2, *X.shape[1:], generator=g)
    with torch.no_grad():
        want = masked_model(gm, am.get(TaskPlan([3, 1], Thresholds())), cg)(x)
        torch.testing.assert_close(comp(x), want, rtol=1e-5, atol=1e-5)


class SizeGrid(nn.Module):
    """XCiT's position encoding: a conv on a grid built from the input's sizes only."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.pos = nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        y = self.stem(x)
        h, w = y.shape[2], y.shape[3]
        grid = torch.stack(torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w,
                                          indexing="ij")).unsqueeze(0)
        return self.head((y + self.pos(grid)).mean((2, 3)))


def test_a_layer_on_sizes_of_the_input_only_is_not_profiled():
    from mdafx.rules import weighted_layer

    gm = trace(seeded(SizeGrid()), X)
    assert any(n.target == "size" or n.target is getattr for n in gm.graph.nodes)  # not ints
    got = {n.target: weighted_layer(n, gm) for n in gm.graph.nodes if n.op == "call_module"}
    assert got["pos"] is None and got["stem"] is not None and got["head"] is not None
