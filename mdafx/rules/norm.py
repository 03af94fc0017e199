"""Normalisation layers, as modules and as ``F.*`` calls.

BatchNorm is per-channel: ``y[:, c] = (x[:, c] − μ_c)/σ_c · γ_c + β_c`` in eval mode, and in
training mode (``F.batch_norm(..., training=True)``, e.g. a standardised conv weight) μ_c, σ_c
are the statistics of channel c alone. So dim 1 passes through, every other dim of the input is
one unit with its channel (coupled), and γ, β, μ, σ² are coupled entry by entry with the
channels; pruning slices them (the module is rebuilt; ``F.batch_norm``'s parameters are sliced
where their ``get_attr`` nodes read them).

GroupNorm normalises each group of ``C/G`` channels over the group: dropping a whole group
leaves the others exact. Its channels are coupled per group (a group is one unit), γ, β with
the channels, and pruning rewrites ``num_groups``. A GroupNorm with one group normalises over
every channel: it freezes them.

LayerNorm and RMSNorm normalise with statistics taken *across* the normalised dims, and
LocalResponseNorm mixes neighbouring channels: dropping a channel changes every other channel's
output. mdafx keeps every channel they normalise over (frozen, their affine parameters too) and
passes the ids through; nothing is pruned inside them, so the result stays exact. (An L2
normalisation, ``F.normalize``, is not among them: a dropped channel is zero, which leaves any
p-norm unchanged, so it is element-wise; see elementwise.py.)

Merged layout: a BatchNorm's parameters and statistics are permuted into its input's layout
(channel p takes component k's entry j where ``layout(p) = (k, j)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import BY_ID, Barrier, MergeContext, PruneContext, RuleContext, channel_rule
from ..channels import along
from ..errors import PreconditionError

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _input_ids(ctx: RuleContext):
    src = ctx.node_arg(0, "input")
    ids = ctx.ids_of(src)
    if ids is None:
        raise Barrier("normalisation of a non-tensor")
    return ids


def _couple_vector(ctx: RuleContext, profile: torch.Tensor, arg) -> None:
    """Couple a per-channel vector (a parameter, or a tensor of the graph) with ``profile``."""
    if arg is None:
        return
    ids = ctx.param_dim(arg, 0, like=profile)
    if ids is None:
        data = ctx.ids_of(arg) if not isinstance(arg, torch.Tensor) else None
        if data is None:
            return
        ids = along(ctx.resolve(data, 0), 0, profile.numel())
    ctx.forest.union(profile, ids)


def _per_channel(ctx: RuleContext, vectors) -> torch.Tensor:
    ids = _input_ids(ctx)
    if ids.dim() < 2:
        raise Barrier("batch norm of a tensor without a channel dim")
    width = ctx.value_of(ctx.node_arg(0, "input")).shape[1]
    profile = along(ctx.resolve(ids, 1), 1, width)
    for v in vectors:
        _couple_vector(ctx, profile, v)
    return ids


def prune_batchnorm(p: PruneContext) -> None:
    bn = p.module
    keep = along(p.kept_of(p.node), 1, bn.num_features)
    cls = p.base or type(bn)
    if bool(keep.all()) and type(bn) is cls:
        return
    like = next(iter(list(bn.parameters()) + list(bn.buffers())), None)
    new = cls(int(keep.sum()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats,
              **({"device": like.device, "dtype": like.dtype} if like is not None else {}))
    with torch.no_grad():
        for name in _BN_TENSORS:
            src = getattr(bn, name, None)
            if src is not None:
                getattr(new, name).copy_(src[keep])
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    p.replace_module(new)


def merge_batchnorm(m: MergeContext) -> None:
    src = m.node.args[0]
    layout = m.layout(src)
    bns = m.modules
    if layout is None:
        raise PreconditionError(f"merged layout: a batch norm on the shared input "
                                f"{m.node.format_node()}")
    b0 = bns[0]
    merged = type(b0)(len(layout), eps=b0.eps, momentum=b0.momentum, affine=b0.affine,
                      track_running_stats=b0.track_running_stats)
    with torch.no_grad():
        for name in _BN_TENSORS:
            if getattr(merged, name, None) is not None:
                getattr(merged, name).copy_(torch.stack([getattr(bns[k], name)[j]
                                                         for k, j in layout]))
    m.emit_module(merged.eval(), (m.arg(src),), layout)


@channel_rule(nn.BatchNorm1d, nn.BatchNorm2d, mask=BY_ID, prune=prune_batchnorm,
              merge=merge_batchnorm)
def batchnorm_rule(ctx: RuleContext):
    bn = ctx.module
    return _per_channel(ctx, [getattr(bn, name) for name in _BN_TENSORS
                              if getattr(bn, name, None) is not None])


@channel_rule(F.batch_norm, mask=BY_ID)
def batchnorm_function_rule(ctx: RuleContext):
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)``: the
    per-channel vectors are node arguments (get_attr nodes, or None)."""
    vectors = [ctx.node_arg(i, name) for i, name in enumerate(_BN_TENSORS[2:] + _BN_TENSORS[:2],
                                                              start=1)]
    return _per_channel(ctx, [v for v in vectors if v is not None])


# ----------------------------------------------------------------------------- across channels


def _freeze_params(ctx: RuleContext, tensors) -> None:
    for t in tensors:
        if t is None:
            continue
        value = ctx.value_of(t) if not isinstance(t, torch.Tensor) else t
        if not isinstance(value, torch.Tensor):
            continue
        found = False
        for d in range(value.dim()):
            ids = ctx.param_dim(t, d, like=torch.zeros(value.shape[d], dtype=torch.int64))
            if ids is not None:
                ctx.forest.freeze(ids)
                found = True
        if not found and not isinstance(t, torch.Tensor) and ctx.ids_of(t) is not None:
            ctx.forest.freeze(ctx.ids_of(t))


def _freeze_input(ctx: RuleContext, params) -> torch.Tensor:
    ids = _input_ids(ctx)
    if not bool((ctx.forest.find(ids) == 0).all()):
        ctx.note("normalises across channels: keeps every channel it normalises")
    ctx.forest.freeze(ids)
    _freeze_params(ctx, params)
    return ids


@channel_rule(nn.LayerNorm, mask=BY_ID)
def layernorm_rule(ctx: RuleContext):
    return _freeze_input(ctx, [ctx.module.weight, ctx.module.bias])


@channel_rule(F.layer_norm, mask=BY_ID)
def layernorm_function_rule(ctx: RuleContext):
    return _freeze_input(ctx, [ctx.node_arg(2, "weight"), ctx.node_arg(3, "bias")])


@channel_rule(nn.RMSNorm, mask=BY_ID)
def rmsnorm_rule(ctx: RuleContext):
    return _freeze_input(ctx, [ctx.module.weight])


@channel_rule(F.rms_norm, mask=BY_ID)
def rmsnorm_function_rule(ctx: RuleContext):
    return _freeze_input(ctx, [ctx.node_arg(2, "weight")])


@channel_rule(nn.LocalResponseNorm, F.local_response_norm, mask=BY_ID)
def local_response_norm_rule(ctx: RuleContext):
    return _freeze_input(ctx, [])


def _grouped(ctx: RuleContext, groups, weight, bias) -> torch.Tensor:
    ids = _input_ids(ctx)
    x = ctx.value_of(ctx.node_arg(0, "input"))
    if not isinstance(groups, int) or ids.dim() < 2:
        raise Barrier("group norm with a computed number of groups")
    if groups == 1:
        return _freeze_input(ctx, [weight, bias])
    profile = along(ctx.resolve(ids, 1), 1, x.shape[1]).reshape(groups, -1)
    for j in range(1, profile.shape[1]):
        ctx.forest.union(profile[:, 0], profile[:, j])
    for v in (weight, bias):
        _couple_vector(ctx, profile.reshape(-1), v)
    return ids


def _kept_groups(p: PruneContext, groups: int) -> tuple[torch.Tensor, int]:
    x = p.node.args[0] if p.node.args else p.node.kwargs["input"]
    keep = p.kept_of(x)
    width = p.node.args[0].meta["tensor_meta"].shape[1]
    keep = along(keep, 1, width)
    return keep, int(keep.reshape(groups, -1).any(1).sum())


def prune_groupnorm(p: PruneContext) -> None:
    gn = p.module
    keep, groups = _kept_groups(p, gn.num_groups)
    cls = p.base or type(gn)
    if bool(keep.all()) and type(gn) is cls:
        return
    new = cls(groups, int(keep.sum()), eps=gn.eps, affine=gn.affine,
              **({"device": gn.weight.device, "dtype": gn.weight.dtype} if gn.affine else {}))
    if gn.affine:
        with torch.no_grad():
            new.weight.copy_(gn.weight[keep])
            new.bias.copy_(gn.bias[keep])
    new.train(gn.training)
    p.replace_module(new)


@channel_rule(nn.GroupNorm, mask=BY_ID, prune=prune_groupnorm)
def groupnorm_rule(ctx: RuleContext):
    gn = ctx.module
    return _grouped(ctx, gn.num_groups, gn.weight, gn.bias)


def prune_groupnorm_function(p: PruneContext) -> None:
    node = p.node
    groups = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
    if not isinstance(groups, int) or groups == 1:
        return
    _, kept = _kept_groups(p, groups)
    if len(node.args) > 1:
        node.args = (node.args[0], kept, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "num_groups": kept}


@channel_rule(F.group_norm, mask=BY_ID, prune=prune_groupnorm_function)
def groupnorm_function_rule(ctx: RuleContext):
    return _grouped(ctx, ctx.arg(1, "num_groups"), ctx.node_arg(2, "weight"),
                    ctx.node_arg(3, "bias"))
