"""Locate (analysis): per-class channel masks of every tensor (MDA.md §1.3).

Given per-class contributions ``A^c[o, i]`` of every weighted layer (passes/contributions.py), the
masks are propagated backwards over the graph, from ``M^c = onehot(c)`` on the logits:

* weighted layer (conv, linear; a module or ``F.conv2d``/``F.linear`` on a parameter, keyed as
  ``mdafx.rules.WeightedLayer.key``) with output mask ``M^c``::

      R^c[o,i] = minmax_i(A^c[o,·])[i]          (over the inputs i that o sees: its group)
      B^c[o,i] = 1[R^c[o,i] > α]
      N^c[i]   = Σ_o M^c[o] · B^c[o,i]
      M'^c[i]  = 1[minmax_i(N^c)[i] > β]         (the mask of the layer's input tensor)

  with ``minmax(v) = (v − min v)/(max v − min v + ε)``, ε = 1e-5 (with a cost exponent γ > 0,
  a conv layer's α and β are first multiplied by its cost factor, :class:`Thresholds`). A
  constant vector has no spread to normalise: mdafx defines its min-max as 1 where it is
  positive and 0 elsewhere (the formula would give 0 everywhere and silently drop, e.g., every
  input of a depthwise conv, whose output channel sees exactly one input).
* ops that move channels (rules with ``mask=BY_ID``: activations, BN, pooling, view/flatten, cat,
  split, permute, ...): an input position matters for class c iff some output position holding the
  same channel id does (so a flattened feature's channel matters if any of its features does,
  and cat/split masks split/join by offsets);
* element-wise ops of several tensors: each operand gets the output mask, reduced with OR over the
  dims it is broadcast along; a matmul (``rule.back``) first ORs the mask over the columns a row
  of A feeds (the rows a column of B feeds), so attention masks reach q, k and v;
* a tensor read by several nodes: OR of what each reader asks of it;
* a barrier (no exact rule): every input channel is kept for every class.

The contributions of a layer may be a dense tensor ``[K, O, I/g]`` or a factored one
(``passes.contributions.FactoredContribution``, Linear and 1×1 convs). Either way
:func:`layer_input_mask` works one class at a time, on chunks of the output rows that class wants
(rows with ``M^c[o] = 0`` add nothing to ``N^c`` and are skipped), so a layer never needs more
than about ``chunk_bytes`` of ``A`` at once, whatever ``K``; ``N^c`` is a sum of 0/1 terms, hence
exact in any order, and the masks are identical to :func:`weighted_input_mask` on the dense ``A``.

The result is a ``ChannelMasks`` (bool ``[num_classes, *ids.shape]`` per node name), cached by the
analysis manager per thresholds; nothing is written into the graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
import torch.nn as nn

from mdafx.errors import PreconditionError
from mdafx.passmanager import Analysis, AnalysisManager
from mdafx.rules import BY_ID, POSITIONAL, WEIGHTED, lookup, weighted_layer
from mdafx.passes.channel_groups import ChannelGraph, ChannelGroups
from mdafx.passes.contributions import Contributions, FactoredContribution

EPS = 1e-5
LOCATE_CHUNK_BYTES: int = 16 * 2**20
"""Default budget for the rows of ``A`` that :func:`layer_input_mask` forms at once."""


@dataclass(frozen=True)
class Thresholds:
    """α (relative contribution) and β (input-channel score) per layer type; MDA's defaults.

    ``cost_exponent`` γ (0 = MDA as published) makes the conv thresholds of each layer ℓ grow
    with what one of its input channels costs (:func:`channel_costs`)::

        α_ℓ = α_conv · (c_ℓ / G)^γ,   β_ℓ = β_conv · (c_ℓ / G)^γ

    with ``c_ℓ`` = MACs per input channel of ℓ and ``G`` their geometric mean over the model's
    conv layers (so γ moves thresholds between layers; the multipliers' geometric mean stays 1).
    A channel of a high-resolution layer costs several times one of a late layer, and MDA's
    per-layer min-max treats them alike; see :data:`mdafx.recipes.COST_EXPONENT` for what γ
    measured."""

    conv_alpha: float = 0.3
    conv_beta: float = 0.2
    linear_alpha: float = 0.4
    linear_beta: float = 0.3
    cost_exponent: float = 0.0

    def scaled(self, factor: float) -> "Thresholds":
        return self.scaled_by(factor, factor)

    def scaled_by(self, conv: float, linear: float) -> "Thresholds":
        """The conv thresholds times ``conv``, the linear ones times ``linear``."""
        return replace(self, conv_alpha=self.conv_alpha * conv, conv_beta=self.conv_beta * conv,
                       linear_alpha=self.linear_alpha * linear,
                       linear_beta=self.linear_beta * linear)

    def for_module(self, module: nn.Module) -> tuple[float, float]:
        return self.for_kind("linear" if isinstance(module, nn.Linear) else "conv")

    def for_kind(self, kind: str) -> tuple[float, float]:
        """α, β of a layer of ``kind`` (``WeightedLayer.kind``: "conv" or "linear")."""
        if kind == "linear":
            return self.linear_alpha, self.linear_beta
        return self.conv_alpha, self.conv_beta


def minmax(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Min-max normalisation along ``dim`` with ε = 1e-5; constant vectors map to 1[v > 0]."""
    lo, hi = v.amin(dim, keepdim=True), v.amax(dim, keepdim=True)
    spread = hi - lo
    out = (v - lo) / (spread + EPS)
    return torch.where(spread > 0, out, (v > 0).to(out.dtype))


def weighted_input_mask(A: torch.Tensor, out_mask: torch.Tensor, groups: int,
                        alpha: float, beta: float) -> torch.Tensor:
    """``M'`` ([K, I]) of a weighted layer from ``A`` ([K, O, I/g]) and ``M`` ([K, O]).

    All classes at once on a dense ``A``; :func:`layer_input_mask` gives the same masks one class
    (and row chunk) at a time, and also takes a ``FactoredContribution``."""
    K, O, Ig = A.shape
    B = (minmax(A, dim=2) > alpha).to(A.dtype)                    # [K, O, I/g]
    N = torch.einsum("ko,koj->koj", out_mask.to(A.dtype), B)      # contributions of wanted o
    N = N.reshape(K, groups, O // groups, Ig).sum(2).reshape(K, groups * Ig)  # [K, I]
    return minmax(N, dim=1) > beta


def layer_input_mask(A: torch.Tensor | FactoredContribution, out_mask: torch.Tensor,
                     groups: int, alpha: float, beta: float, *,
                     chunk_bytes: int = LOCATE_CHUNK_BYTES) -> torch.Tensor:
    """:func:`weighted_input_mask` for a dense or factored ``A``, one class at a time.

    Same result as ``weighted_input_mask(densify(A).float(), out_mask, groups, alpha, beta)``
    (``A`` is compared in float32, as :func:`locate` always did), but only the rows ``o`` with
    ``out_mask[k, o]`` are formed, at most ``chunk_bytes`` of them (≥ 1 row) at a time.
    """
    K, O, Ig = A.shape
    if out_mask.shape != (K, O):
        raise ValueError(f"out_mask must be [{K}, {O}], got {tuple(out_mask.shape)}")
    if groups < 1 or O % groups:
        raise ValueError(f"groups={groups} does not divide the {O} output channels")
    factored = isinstance(A, FactoredContribution)
    rows_per_chunk = max(1, chunk_bytes // max(1, Ig * 4))
    out_per_group = O // groups
    counts = torch.zeros(K, groups, Ig, dtype=torch.long)
    for k in range(K):
        wanted = torch.nonzero(out_mask[k]).flatten()
        for start in range(0, wanted.numel(), rows_per_chunk):
            idx = wanted[start:start + rows_per_chunk]
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            index = slice(lo, hi) if hi - lo == idx.numel() else idx  # contiguous: a view
            rows = A.rows(k, index) if factored else A[k, index]
            B = minmax(rows.float(), dim=1) > alpha                  # [r, I/g]
            if groups == 1:
                counts[k, 0] += B.sum(0).cpu()
            else:
                counts[k].index_add_(0, idx // out_per_group, B.long().cpu())
    N = counts.reshape(K, groups * Ig).float()  # exact integers, as the dense sum of 0/1
    return minmax(N, dim=1) > beta


@dataclass
class ChannelMasks:
    """Per node name, bool ``[num_classes, *ids.shape]``: does class c rely on that channel."""

    masks: dict[str, torch.Tensor]
    num_classes: int
    thresholds: Thresholds
    kept_barriers: list[str] = field(default_factory=list)

    def votes(self, classes) -> dict[str, torch.Tensor]:
        """OR over ``classes`` per node: the keep votes of the task (MDA.md §1.4)."""
        index = torch.as_tensor(list(classes), dtype=torch.long)
        return {name: m[index].any(0) for name, m in self.masks.items() if isinstance(m, torch.Tensor)}


def _or_into(store: dict, name: str, mask) -> None:
    if mask is None:
        return
    prev = store.get(name)
    if prev is None:
        store[name] = mask
    elif isinstance(prev, tuple):
        store[name] = tuple(_or(p, m) for p, m in zip(prev, mask))
    else:
        store[name] = prev | mask


def _or(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):  # nested tuples: element by element
        return tuple(_or(x, y) for x, y in zip(a, b))
    return a | b


def _by_id(out_ids: torch.Tensor, out_mask: torch.Tensor, in_ids: torch.Tensor) -> torch.Tensor:
    """Input mask: position p matters iff an output position with the same id does."""
    K = out_mask.shape[0]
    flat_ids = out_ids.expand(out_mask.shape[1:]).reshape(-1)
    distinct, where = torch.unique(flat_ids, return_inverse=True)
    table = torch.zeros(K, distinct.numel(), dtype=torch.uint8)
    table.scatter_reduce_(1, where.expand(K, -1), out_mask.reshape(K, -1).to(torch.uint8), "amax")
    pos = torch.searchsorted(distinct, in_ids.reshape(-1)).clamp(max=distinct.numel() - 1)
    hit = distinct[pos] == in_ids.reshape(-1)
    return (table[:, pos].bool() & hit).reshape(K, *in_ids.shape)


def _broadcast_back(out_mask: torch.Tensor, in_ids: torch.Tensor) -> torch.Tensor:
    K, out_nd = out_mask.shape[0], out_mask.dim() - 1
    lifted = in_ids.reshape((1,) * (out_nd - in_ids.dim()) + tuple(in_ids.shape))
    m = out_mask
    for d in range(out_nd):
        if lifted.shape[d] == 1 and m.shape[d + 1] > 1:
            m = m.any(d + 1, keepdim=True)
    return m.expand(K, *lifted.shape).reshape(K, *in_ids.shape)


def _reduce_to(mask_1d: torch.Tensor, in_ids: torch.Tensor, axis: int) -> torch.Tensor:
    """Lay a per-feature mask [K, F] onto ids compressed or not along ``axis``."""
    K = mask_1d.shape[0]
    axis %= in_ids.dim()
    if in_ids.shape[axis] == 1 and mask_1d.shape[1] != 1:
        mask_1d = mask_1d.any(1, keepdim=True)
    shape = [1] * in_ids.dim()
    shape[axis] = mask_1d.shape[1]
    return mask_1d.reshape(K, *shape).expand(K, *in_ids.shape).clone()


def channel_costs(gm: fx.GraphModule) -> dict[str, int]:
    """``c_ℓ`` per conv layer key: the multiply-accumulates one of its input channels costs per
    image, ``(O / g) · Πk · P`` for a weight ``[O, I/g, *k]`` and ``P`` output positions (from
    the node's ``tensor_meta``; a layer without one is left out), summed over the nodes that
    call the layer (as its contributions are)."""
    costs: dict[str, int] = {}
    for node in gm.graph.nodes:
        layer = weighted_layer(node, gm)
        meta = node.meta.get("tensor_meta")
        if layer is None or layer.kind != "conv" or not hasattr(meta, "shape"):
            continue
        w = layer.weight.shape
        costs[layer.key] = costs.get(layer.key, 0) + (
            int(w[0]) // layer.groups * math.prod(int(k) for k in w[2:])
            * math.prod(int(d) for d in meta.shape[2:]))
    return costs


def cost_multipliers(gm: fx.GraphModule, exponent: float) -> dict[str, float]:
    """``(c_ℓ / G)^γ`` per conv layer key (:class:`Thresholds`); empty for γ = 0."""
    if not exponent:
        return {}
    costs = {k: c for k, c in channel_costs(gm).items() if c > 0}
    if not costs:
        return {}
    log_mean = sum(math.log(c) for c in costs.values()) / len(costs)
    return {k: math.exp(exponent * (math.log(c) - log_mean)) for k, c in costs.items()}


def locate_masks(gm: fx.GraphModule, cg: ChannelGraph,
           contributions: dict[str, torch.Tensor | FactoredContribution],
           thresholds: Thresholds = Thresholds(), *,
           chunk_bytes: int = LOCATE_CHUNK_BYTES) -> ChannelMasks:
    """Backward mask propagation (module docstring) for every class of the contributions.

    ``contributions[layer]`` is a dense ``[K, O, I/g]`` tensor or a ``FactoredContribution``;
    ``chunk_bytes`` bounds the part of one layer's ``A`` formed at once (:func:`layer_input_mask`).
    """
    if not contributions:
        raise PreconditionError("no contributions: run the contribution analysis first")
    K = next(iter(contributions.values())).shape[0]
    out_name = cg.output
    logits = cg.ids.get(out_name)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != K:
        raise PreconditionError(f"the model output {out_name!r} is not [batch, {K}] logits")
    masks: dict[str, object] = {out_name: torch.eye(K, dtype=torch.bool).reshape(K, 1, K)}
    kept_barriers = []
    multipliers = cost_multipliers(gm, thresholds.cost_exponent)
    for node in reversed(gm.graph.nodes):
        if node.op in ("output", "placeholder", "get_attr"):
            continue
        out_mask = masks.get(node.name)
        out_ids = cg.ids.get(node.name)
        if out_mask is None or out_ids is None:
            continue
        inputs = [a for a in node.all_input_nodes if cg.ids.get(a.name) is not None]
        if node.name in cg.barriers:
            kept_barriers.append(node.name)
            for a in inputs:
                _or_into(masks, a.name, _full(cg.ids[a.name], K))
            continue
        rule = lookup(node, gm)
        kind = rule.mask if rule is not None else None
        if kind == WEIGHTED:
            a = node.args[0] if node.args else node.kwargs["input"]
            in_ids = cg.ids[a.name]
            out_axis = rule.out_axis
            m_out = _along_mask(out_mask, out_axis)
            layer = weighted_layer(node, gm)
            A = contributions.get(layer.key) if layer is not None else None
            if A is None:
                in_mask = _full(in_ids, K)
            else:
                alpha, beta = thresholds.for_kind(layer.kind)
                m = multipliers.get(layer.key, 1.0)          # conv layers only, 1 for γ = 0
                alpha, beta = alpha * m, beta * m
                want = (K, layer.weight.shape[0], layer.weight.shape[1])
                if tuple(A.shape) != want:
                    raise PreconditionError(
                        f"contributions of layer {layer.key!r} have shape {tuple(A.shape)}, "
                        f"expected {list(want)} (classes, out, in/groups) for its weight")
                m_in = layer_input_mask(A, m_out, layer.groups, alpha, beta,
                                        chunk_bytes=chunk_bytes)
                in_mask = _reduce_to(m_in, in_ids, out_axis)
            _or_into(masks, a.name, in_mask)
            # the weight and bias (when tensors of the graph) carry no class evidence here
        elif kind == POSITIONAL:
            pairs = (rule.back(node, out_mask) if rule.back is not None
                     else [(a, out_mask) for a in inputs])
            for a, m in pairs:
                if isinstance(a, fx.Node) and cg.ids.get(a.name) is not None:
                    _or_into(masks, a.name, _broadcast_back(m, cg.ids[a.name]))
        elif kind == BY_ID or node.op == "call_function" and rule is None:
            for a in inputs:
                _or_into(masks, a.name, _map_by_id(out_ids, out_mask, cg.ids[a.name]))
        # shape queries and scalar nodes carry no channels
    result = {n: m for n, m in masks.items() if isinstance(m, torch.Tensor)}
    return ChannelMasks(result, K, thresholds, kept_barriers)


def _map_by_id(out_ids, out_mask, in_ids):
    """BY_ID through tensors or tuples (split outputs, getitem of a tuple)."""
    if isinstance(in_ids, tuple):
        if isinstance(out_ids, tuple):  # e.g. passing a tuple through
            return tuple(_map_by_id(o, m, i) for o, m, i in zip(out_ids, out_mask, in_ids))
        # nested tuples (an LSTM's ``(out, (h, c))``) recurse
        return tuple(_map_by_id(out_ids, out_mask, i) if out_mask is not None else None
                     for i in in_ids)
    if isinstance(out_ids, tuple):
        parts = [p for p in (_map_by_id(o, m, in_ids) for o, m in zip(out_ids, out_mask)
                             if m is not None) if p is not None]
        if not parts:
            return None
        acc = parts[0]
        for p in parts[1:]:
            acc = acc | p
        return acc
    return _by_id(out_ids, out_mask, in_ids)


def _along_mask(mask: torch.Tensor, axis: int) -> torch.Tensor:
    """[K, *shape] -> [K, C] along ``axis`` (OR over the other dims)."""
    K = mask.shape[0]
    axis = axis % (mask.dim() - 1) + 1
    return mask.transpose(1, axis).reshape(K, mask.shape[axis], -1).any(2)


def _full(ids, K):
    if isinstance(ids, tuple):
        return tuple(_full(i, K) for i in ids)
    return torch.ones((K, *ids.shape), dtype=torch.bool)


class Locate(Analysis):
    """Per-class channel masks for ``thresholds`` (module docstring); requires ChannelGroups and
    Contributions (seeded from a profile)."""

    name = "locate"

    def __init__(self, thresholds: Thresholds = Thresholds(), *,
                 chunk_bytes: int = LOCATE_CHUNK_BYTES) -> None:
        self.thresholds = thresholds
        self.chunk_bytes = chunk_bytes

    def key(self) -> tuple:
        return (self.thresholds,)

    def compute(self, gm: fx.GraphModule, am: AnalysisManager) -> ChannelMasks:
        return locate_masks(gm, am.get(ChannelGroups), am.get(Contributions), self.thresholds,
                      chunk_bytes=self.chunk_bytes)
