"""Normalisation layers.

BatchNorm in eval mode is per-channel affine: ``y[:, c] = (x[:, c] − μ_c)/σ_c · γ_c + β_c``. The
channel axis (dim 1) passes through, and pruning slices γ, β, μ, σ² with the kept channels.

LayerNorm and GroupNorm normalise with statistics taken *across* channels: dropping a channel
changes every other channel's output. mdafx therefore keeps every channel they normalise over
(frozen, reported as a barrier on those channels) and passes the ids through; nothing is pruned
inside them, so the result stays exact.

Merged layout: a BatchNorm's parameters and statistics are permuted into its input's layout
(channel p takes component k's entry j where ``layout(p) = (k, j)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import BY_ID, Barrier, MergeContext, PruneContext, RuleContext, channel_rule
from .elementwise import unary_rule
from ..channels import along
from ..errors import PreconditionError


def prune_batchnorm(p: PruneContext) -> None:
    bn = p.module
    keep = along(p.kept_of(p.node), 1, bn.num_features)
    if bool(keep.all()):
        return
    new = type(bn)(int(keep.sum()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
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
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(merged, name, None) is not None:
                getattr(merged, name).copy_(torch.stack([getattr(bns[k], name)[j]
                                                         for k, j in layout]))
    m.emit_module(merged.eval(), (m.arg(src),), layout)


@channel_rule(nn.BatchNorm1d, nn.BatchNorm2d, mask=BY_ID, prune=prune_batchnorm,
              merge=merge_batchnorm)
def batchnorm_rule(ctx: RuleContext):
    ids = unary_rule(ctx)
    if ids.dim() == 3 and ids.shape[2] != 1:
        raise Barrier("BatchNorm1d over a sequence whose ids vary along it")
    return ids


def _freeze_trailing(ctx: RuleContext, ndims: int):
    ids = ctx.ids_of(ctx.node.args[0])
    if ids is None:
        raise Barrier("normalisation of a non-tensor")
    ctx.forest.freeze(ids.flatten(-ndims) if ndims <= ids.dim() else ids)
    return ids


@channel_rule(nn.LayerNorm, mask=BY_ID)
def layernorm_rule(ctx: RuleContext):
    return _freeze_trailing(ctx, len(ctx.module.normalized_shape))


@channel_rule(F.layer_norm, mask=BY_ID)
def layernorm_function_rule(ctx: RuleContext):
    shape = ctx.arg(1, "normalized_shape")
    return _freeze_trailing(ctx, len(shape) if isinstance(shape, (tuple, list)) else 1)


@channel_rule(nn.GroupNorm, nn.LocalResponseNorm, F.group_norm, F.local_response_norm, mask=BY_ID)
def groupnorm_rule(ctx: RuleContext):
    ids = ctx.ids_of(ctx.node.args[0])
    if ids is None:
        raise Barrier("normalisation of a non-tensor")
    ctx.forest.freeze(ids)
    return ids
