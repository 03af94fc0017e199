"""Weighted channel-mixing layers: Conv2d (any groups) and Linear.

A conv with ``groups = g`` computes output channel ``o`` of group ``j = o // (O/g)`` from the
input channels ``j·I/g … (j+1)·I/g − 1`` only. Its output channels are new (fresh ids).

* ``g = 1``: input and output channels are independent: any input column or output row of W can
  go (``W' = W[keep_out][:, keep_in]``).
* ``g > 1`` (grouped, depthwise as the case I/g = O/g = 1): a group's input and output channels
  are coupled into one set, so pruning drops whole groups and the layer stays a valid grouped
  conv with ``g'`` = number of kept groups (``W' = W[keep_out]``; I/g is unchanged).

Linear mixes the last dim: ``y[..., o] = Σ_i W[o, i] x[..., i] + b[o]``; ``W' = W[keep_out][:, keep_in]``.
Its input may be a flattened C×H×W tensor: the flatten rule has already told which channel each
feature belongs to, so input features are kept per feature.

Both require that each channel sit on one index of the mixed axis, i.e. ids constant over the
other dims; otherwise the node is a barrier.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import WEIGHTED, Barrier, PruneContext, RuleContext, channel_rule
from ..channels import along


def _roots_constant_off_axis(ctx: RuleContext, ids: torch.Tensor, axis: int) -> bool:
    roots = ctx.forest.find(ids)
    axis = axis % ids.dim()
    profile = along(roots, axis).reshape([-1 if d == axis else 1 for d in range(ids.dim())])
    return torch.equal(roots, profile.expand_as(roots))


def conv_ids(ctx: RuleContext):
    conv: nn.Conv2d = ctx.module
    ids = ctx.ids_of(ctx.node.args[0])
    if ids is None or ids.dim() != 4:
        raise Barrier("conv input is not an NCHW tensor")
    if not _roots_constant_off_axis(ctx, ids, 1):
        ctx.forest.freeze(ids)
    out = ctx.forest.fresh((1, conv.out_channels, 1, 1))
    g = conv.groups
    if g > 1:
        in_ids = along(ids, 1).reshape(g, -1)
        out_ids = out.reshape(g, -1)
        for j in range(1, in_ids.shape[1]):
            ctx.forest.union(in_ids[:, 0], in_ids[:, j])
        ctx.forest.union(in_ids[:, :1], out_ids)
    return out


def prune_conv(p: PruneContext) -> None:
    conv: nn.Conv2d = p.module
    keep_in = along(p.kept_of(p.node.args[0]), 1, conv.in_channels)
    keep_out = along(p.kept_of(p.node), 1, conv.out_channels)
    if bool(keep_in.all()) and bool(keep_out.all()):
        return
    g = conv.groups
    if g > 1:
        per_group = conv.out_channels // g
        groups = int(keep_out.reshape(g, per_group).any(1).sum())
        weight = conv.weight[keep_out]
        in_channels = groups * conv.weight.shape[1]
    else:
        groups = 1
        weight = conv.weight[keep_out][:, keep_in]
        in_channels = int(keep_in.sum())
    new = nn.Conv2d(in_channels, weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, groups, conv.bias is not None, conv.padding_mode,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias[keep_out])
    p.replace_module(new)


channel_rule(nn.Conv2d, mask=WEIGHTED, prune=prune_conv, name="conv_rule")(conv_ids)


def linear_ids(ctx: RuleContext):
    lin: nn.Linear = ctx.module
    ids = ctx.ids_of(ctx.node.args[0])
    if ids is None:
        raise Barrier("linear of a non-tensor")
    if not _roots_constant_off_axis(ctx, ids, -1):
        ctx.forest.freeze(ids)
    return ctx.forest.fresh((1,) * (ids.dim() - 1) + (lin.out_features,))


def prune_linear(p: PruneContext) -> None:
    lin: nn.Linear = p.module
    keep_in = along(p.kept_of(p.node.args[0]), -1, lin.in_features)
    keep_out = along(p.kept_of(p.node), -1, lin.out_features)
    if bool(keep_in.all()) and bool(keep_out.all()):
        return
    weight = lin.weight[keep_out][:, keep_in]
    new = nn.Linear(weight.shape[1], weight.shape[0], lin.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias[keep_out])
    p.replace_module(new)


channel_rule(nn.Linear, mask=WEIGHTED, prune=prune_linear, name="linear_rule")(linear_ids)
