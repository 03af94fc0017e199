"""ChannelSelection (analysis, training-free): MDA's thresholds say *how many* channels of each
group a component keeps; where only one layer reads a group, choose *which* ones by what that
layer loses, on calibration images.

MDA keeps a channel when its contribution to the task's logits passes a threshold (§1.3): a
ranking by relevance, blind to what the layer that reads the channel can rebuild from the others
once ReconstructLayers refits it. Two channels that carry the same evidence both pass, and a
channel whose information nothing else carries can fall just below. Measured (README, "Which
channels": experiment at the `default` thresholds, same counts): ResNet-20 all ten −4.83 →
−3.17 points on test, five (A) −1.98 → −1.40, {cat, dog} −1.75 → −1.40.

**Free roots.** A channel group (a union-find root of ChannelGroups) is *free for* a weighted
layer ``L`` (a Conv2d with ``groups == 1`` or a Linear) when every user of every node carrying
the group is ``L`` or a node carrying it whose channel rule maps channels one to one (by id, or
element-wise: mdafx.rules), never mixes them: dropping it changes the model only through
the columns of ``L``'s input it occupies (its block: kh·kw columns of a conv, H·W of a Linear
over a flattened map, one of a Linear). A residual stream is never free (the sum reads it too);
a block's interior, a plain chain's channels and a classifier's hidden units are.

**Block OBS.** With ``X`` the source's input of ``L`` unfolded as ReconstructLayers sees it (one
row per output position, a ones column for the intercept) on calibration images, ``W₀`` the
source's weights on the output channels the plan keeps (``[d, outs]``, the bias as the
intercept's row) and ``H = XᵀX + λ·(tr XᵀX / d)·I`` (λ = ``ridge``, as in the refit), the refit's
objective is ``E(W) = ||X(W − W₀)||² + λ'·||W − W₀||² = tr((W − W₀)ᵀ H (W − W₀))``: zero with
every column kept. Forcing the block ``b`` to zero and refitting the rest raises it by

    ΔE_b = tr(W_bᵀ [H⁻¹]_bb⁻¹ W_b)      (W the current optimum, [H⁻¹]_bb the block of H⁻¹)

(Optimal Brain Surgeon, one block at a time), and the optimum and the inverse update in closed
form: ``W ← W − H⁻¹[:, b] [H⁻¹]_bb⁻¹ W_b``, ``H⁻¹ ← H⁻¹ − H⁻¹[:, b] [H⁻¹]_bb⁻¹ H⁻¹[b, :]``.
Starting from every free block, the cheapest is dropped until as many remain as the plan keeps
(ties: the lowest root). Columns that are not free stay as the plan says (kept ones in the
problem, dropped ones out of it). Layers are visited from the output backwards, so that the
outputs a layer must reproduce are those already chosen for its reader.

``X`` is the *source's* input (an approximation: the refit then sees the component's); the
objective is the refit's own (raw layer outputs, before any norm). Sums in float64, as in
ReconstructLayers; every step is deterministic.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from mdafx.channels import FROZEN
from mdafx.errors import PreconditionError
from mdafx.ir import eval_mode, module_device
from mdafx.passes.channel_groups import ChannelGraph
from mdafx.passes.prune_channels import ChannelPlan
from mdafx.rules import BY_ID, POSITIONAL, lookup
from mdafx.passes.reconstruct import (MAX_ROWS, _input_rows, _Normal, _step, kept_channels,
                                      weighted_nodes)

__all__ = ["ChannelSelection", "FreeBlocks", "free_blocks", "obs_eliminate"]


@dataclass(frozen=True)
class FreeBlocks:
    """The free roots of one reader layer and the columns of its input each occupies."""

    reader: str                     # the weighted node that reads them
    target: str                     # its module
    column_roots: torch.Tensor      # [d]: the root of every input column of the reader
    roots: torch.Tensor             # [g]: the free roots, ascending
    columns: torch.Tensor           # [g, block]: their columns (one block size per reader)


def _channel_roots(cg: ChannelGraph, name: str) -> torch.Tensor | None:
    """The roots along ``name``'s channel dim, one per channel, or None where they vary along
    another dim too (then the columns cannot be mapped)."""
    roots = cg.roots(name) if name in cg.ids else None
    dim = cg.channel_dim(name) if isinstance(roots, torch.Tensor) else None
    if dim is None:
        return None
    flat = roots.movedim(dim, 0).reshape(roots.shape[dim], -1)
    return flat[:, 0] if bool((flat == flat[:, :1]).all()) else None


def _reader_columns(gm: fx.GraphModule, cg: ChannelGraph, reader: fx.Node
                    ) -> torch.Tensor | None:
    """The root of every column of ``reader``'s weight (channel-major, as its weight is laid
    out), or None where they cannot be mapped."""
    layer = gm.get_submodule(reader.target)
    x = reader.args[0]
    if not isinstance(x, fx.Node):
        return None
    roots = _channel_roots(cg, x.name)
    if roots is None:
        return None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or roots.numel() != layer.in_channels:
            return None
        return roots.repeat_interleave(layer.kernel_size[0] * layer.kernel_size[1])
    if roots.numel() != layer.in_features or cg.channel_dim(x.name) != len(
            cg.roots(x.name).shape) - 1:
        return None
    return roots


def _channelwise(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node``'s output channel ``r`` is computed from its inputs' channel ``r`` only
    (its rule maps channels by id, or broadcasts them element-wise), not mixed by a weight."""
    rule = lookup(node, gm)
    return rule is not None and (rule.mask == BY_ID or
                                 (rule.mask == POSITIONAL and rule.back is None))


def free_blocks(gm: fx.GraphModule, cg: ChannelGraph) -> list[FreeBlocks]:
    """Every weighted layer's free roots (module docstring), in graph order; layers with none
    are left out."""
    carriers: dict[int, set[str]] = {}       # root -> the nodes whose output carries it
    for name in cg.tensor_nodes():
        for r in torch.unique(cg.roots(name)).tolist():
            carriers.setdefault(r, set()).add(name)
    nodes = {n.name: n for n in gm.graph.nodes}
    passes_through = {n.name: _channelwise(n, gm) for n in gm.graph.nodes}
    out = []
    for reader in weighted_nodes(gm):
        if reader.name in cg.barriers:
            continue
        cols = _reader_columns(gm, cg, reader)
        if cols is None:
            continue
        free = []
        for r in torch.unique(cols).tolist():
            held = carriers.get(r, set())
            if r == FROZEN or reader.name in held or not held:
                continue
            if all(u is reader or (u.name in held and passes_through[u.name])
                   for n in held for u in nodes[n].users):
                free.append(r)
        if not free:
            continue
        roots = torch.as_tensor(free, dtype=torch.int64)
        blocks = [torch.nonzero(cols == r).reshape(-1) for r in free]
        if len({len(b) for b in blocks}) != 1:
            continue                         # blocks of different widths: left to the plan
        out.append(FreeBlocks(reader.name, reader.target, cols, roots, torch.stack(blocks)))
    return out


def obs_eliminate(gram: torch.Tensor, prior: torch.Tensor, blocks: torch.Tensor, keep: int,
                  ridge: float) -> torch.Tensor:
    """Which of ``blocks`` (``[g, block]`` column indices into ``gram``) survive when the
    cheapest is dropped one at a time until ``keep`` remain (module docstring: ΔE_b on
    ``H = gram + ridge·(tr gram / d)·I`` and the optimum ``prior`` ``[d, outs]``). Returns a
    bool ``[g]``. Columns of ``gram`` outside ``blocks`` are always kept."""
    g = blocks.shape[0]
    alive = torch.ones(g, dtype=torch.bool)
    if keep >= g:
        return alive
    d = gram.shape[0]
    scale = gram.diagonal().mean().clamp_min(1e-12)
    h = gram.double() + ridge * scale * torch.eye(d, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    w = prior.double().clone()
    while int(alive.sum()) > keep:
        live = torch.nonzero(alive).reshape(-1)
        idx = blocks[live]                                          # [a, block]
        hbb = hinv[idx[:, :, None], idx[:, None, :]]                # [a, block, block]
        wb = w[idx]                                                 # [a, block, outs]
        cost = (wb * torch.linalg.solve(hbb, wb)).sum((1, 2))
        pick = int(live[int(torch.argmin(cost))])                   # first minimum: lowest
        b = blocks[pick]
        inv_bb = torch.linalg.inv(hinv[b][:, b])
        w.addmm_(hinv[:, b], inv_bb @ w[b], alpha=-1.0)
        hinv.addmm_(hinv[:, b], inv_bb @ hinv[b, :], alpha=-1.0)
        # (the dropped block's rows are now zero up to rounding; no live entry reads them)
        alive[pick] = False
        stale = ~alive & (blocks[:, 0] >= 0)          # dropped, still in the matrix
        if int(stale.sum()) * blocks.shape[1] * 2 > hinv.shape[0] and int(alive.sum()) > keep:
            # most of the matrix is dropped blocks: keep only the other columns
            cols = torch.ones(hinv.shape[0], dtype=torch.bool)
            cols[blocks[stale].reshape(-1)] = False
            new_index = torch.cumsum(cols, 0) - 1
            hinv, w = hinv[cols][:, cols], w[cols]
            blocks = torch.where(alive[:, None], new_index[blocks.clamp_min(0)], -1)
    return alive


class _Grams(fx.Interpreter):
    """Runs the source and accumulates, per reader, ``XᵀX`` of its input rows (with a ones
    column), sampled as ReconstructLayers samples them."""

    def __init__(self, gm: fx.GraphModule, readers: set[str], images: int) -> None:
        super().__init__(gm)
        self.readers, self.images = readers, images
        self.normal: dict[str, _Normal] = {}
        self.steps: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.readers:
            layer = self.module.get_submodule(n.target)
            x = self.env[n.args[0]]
            if n.name not in self.steps:
                per_image = (layer(x[:1])[0, 0].numel() if isinstance(layer, nn.Conv2d)
                             else x[0].numel() // x.shape[-1])
                self.steps[n.name] = _step(self.images, per_image, MAX_ROWS)
                cols = layer.weight[0].numel()
                self.normal[n.name] = _Normal(1, cols, 1, True, x.device)
            rows = _input_rows(layer, x, self.steps[n.name])
            self.normal[n.name].add(rows, rows.new_zeros(len(rows), 1))   # no target: XᵀX only
        return super().run_node(n)


class ChannelSelection:
    """The free blocks of a source and their readers' Grams on calibration images: refines any
    plan of that source (:meth:`refine`) at the cost of one source forward, measured once."""

    def __init__(self, gm: fx.GraphModule, cg: ChannelGraph, blocks: list[FreeBlocks],
                 grams: Mapping[str, torch.Tensor], ridge: float) -> None:
        self.gm, self.cg, self.blocks = gm, cg, blocks
        self.grams, self.ridge = dict(grams), ridge

    @classmethod
    def measure(cls, gm: fx.GraphModule, cg: ChannelGraph, images: torch.Tensor, *,
                ridge: float = 0.1, chunk: int = 64) -> "ChannelSelection":
        """Find the free blocks of ``gm`` and accumulate their readers' Grams over ``images``."""
        if not 0.0 < ridge:
            raise PreconditionError(f"channel selection needs a positive ridge, got {ridge}")
        blocks = free_blocks(gm, cg)
        capture = _Grams(gm, {b.reader for b in blocks}, len(images))
        device = module_device(gm)
        with eval_mode(gm), torch.no_grad():
            for start in range(0, len(images), chunk):
                capture.run(images[start:start + chunk].to(device))
        grams = {name: normal.gram[0].cpu() for name, normal in capture.normal.items()}
        return cls(gm, cg, blocks, grams, ridge)

    def refine(self, plan: ChannelPlan) -> tuple[ChannelPlan, int]:
        """``plan`` with the free roots of every reader chosen by block OBS, as many kept per
        reader as ``plan`` keeps, and the number of roots that changed places."""
        keep = plan.keep.clone()
        changed = 0
        for fb in reversed(self.blocks):
            chosen = keep[fb.roots]
            k = int(chosen.sum())
            if k in (0, len(fb.roots)):
                continue
            outs = kept_channels(self.gm, ChannelPlan(keep, plan.classes), self.cg,
                                 {fb.reader})[fb.reader]
            layer = self.gm.get_submodule(fb.target)
            weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)[outs].T
            bias = (layer.bias.detach()[outs] if layer.bias is not None
                    else weight.new_zeros(len(outs)))
            prior = torch.cat([weight, bias[None]]).double()         # [d + 1, outs]
            # the problem: every column the plan keeps (free or not) and the intercept
            col_kept = keep[fb.column_roots].clone()
            col_kept[fb.columns.reshape(-1)] = True
            active = torch.cat([torch.nonzero(col_kept).reshape(-1),
                                torch.as_tensor([len(fb.column_roots)])])
            position = torch.full((len(fb.column_roots) + 1,), -1, dtype=torch.int64)
            position[active] = torch.arange(len(active))
            gram = self.grams[fb.reader][active][:, active]
            alive = obs_eliminate(gram, prior[active], position[fb.columns], k, self.ridge)
            changed += int((alive != chosen).sum()) // 2
            keep[fb.roots] = alive
        return ChannelPlan(keep, plan.classes), changed

