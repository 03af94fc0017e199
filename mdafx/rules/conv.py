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

Merged layout (alignment padding, MDA.md §2.2): the merged layer holds every component's filters.
Its input channel p holds channel j of component k (``layout(p) = (k, j)``), so

    W[(k, o), p] = W_k[o, j]   if layout(p) = (k, j),   0 otherwise ("empty" kernels)

which is the block-diagonal ``[[W1, 0], [0, W2]]`` of the paper on a standard input layout, and
stacked filters ``W[(k, o), :] = W_k[o, :]`` on the shared input; biases concatenate. Its output
is in the standard layout (component 0's channels, then 1's, ...). A grouped conv needs its input
in the standard layout (a permutation is inserted) and stacks the components' groups.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import WEIGHTED, Barrier, Layout, MergeContext, PruneContext, RuleContext, channel_rule
from ..channels import along
from ..errors import PreconditionError


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


def block_weight(weights: list[torch.Tensor], layout: Layout | None, in_width: int
                 ) -> torch.Tensor:
    """Rows of component k come from ``weights[k]``; its columns go where ``layout`` holds
    component k's input channels (all columns on the shared input), zeros elsewhere."""
    out = torch.zeros(sum(w.shape[0] for w in weights), in_width, *weights[0].shape[2:],
                      dtype=weights[0].dtype)
    offset = 0
    for k, w in enumerate(weights):
        rows = slice(offset, offset + w.shape[0])
        if layout is None:
            out[rows] = w
        else:
            cols = [p for p, (kk, _) in enumerate(layout) if kk == k]
            src = [j for kk, j in layout if kk == k]
            out[rows, cols] = w[:, src]
        offset += w.shape[0]
    return out


def _stacked_bias(layers: list[nn.Module], widths: list[int]) -> torch.Tensor | None:
    if all(m.bias is None for m in layers):
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(w)
                      for m, w in zip(layers, widths)])


def merge_conv(m: MergeContext) -> None:
    convs: list[nn.Conv2d] = m.modules
    c0 = convs[0]
    config = lambda c: (c.kernel_size, c.stride, c.padding, c.dilation, c.padding_mode)  # noqa: E731
    if any(config(c) != config(c0) for c in convs[1:]):
        raise PreconditionError(f"merged layout: the components' convs differ at "
                                f"{m.node.format_node()}")
    src = m.node.args[0]
    x, layout = m.arg(src), m.layout(src)
    outs = [c.out_channels for c in convs]
    if max(c.groups for c in convs) > 1:
        if layout is None or len({c.weight.shape[1] for c in convs}) != 1:
            raise PreconditionError(f"merged layout: grouped conv {m.node.format_node()} needs "
                                    "equal group widths and a per-component input")
        x = m.permute(x, layout, m.standard(m.sizes(layout)))
        weight = torch.cat([c.weight.detach() for c in convs], 0)
        in_ch, groups = sum(c.in_channels for c in convs), sum(c.groups for c in convs)
    else:
        in_ch = c0.in_channels if layout is None else len(layout)
        weight = block_weight([c.weight.detach() for c in convs], layout, in_ch)
        groups = 1
    bias = _stacked_bias(convs, outs)
    merged = nn.Conv2d(in_ch, sum(outs), c0.kernel_size, c0.stride, c0.padding, c0.dilation,
                       groups, bias is not None, c0.padding_mode)
    with torch.no_grad():
        merged.weight.copy_(weight)
        if bias is not None:
            merged.bias.copy_(bias)
    m.emit_module(merged, (x,), m.standard(outs))


channel_rule(nn.Conv2d, mask=WEIGHTED, prune=prune_conv, merge=merge_conv,
             name="conv_rule")(conv_ids)


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


def merge_linear(m: MergeContext) -> None:
    lins: list[nn.Linear] = m.modules
    src = m.node.args[0]
    x, layout = m.arg(src), m.layout(src)
    outs = [lin.out_features for lin in lins]
    in_f = lins[0].in_features if layout is None else len(layout)
    bias = _stacked_bias(lins, outs)
    merged = nn.Linear(in_f, sum(outs), bias is not None)
    with torch.no_grad():
        merged.weight.copy_(block_weight([lin.weight.detach() for lin in lins], layout, in_f))
        if bias is not None:
            merged.bias.copy_(bias)
    m.emit_module(merged, (x,), m.standard(outs))


channel_rule(nn.Linear, mask=WEIGHTED, prune=prune_linear, merge=merge_linear,
             name="linear_rule")(linear_ids)
