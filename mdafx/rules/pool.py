"""Per-channel ops that mix positions inside a channel: pooling, adaptive pooling, mean/sum.

``y[b, c] = pool(x[b, c])``: each output channel reads only its own input channel, so the channel
axis passes through unchanged. That holds only when each channel sits on a single index of the
channel axis, i.e. the input ids are constant over the pooled (spatial) dims; otherwise pooling
would mix channels and the node is a barrier.

A reduction (``mean``/``sum`` over ``dim``) is per-channel under the same condition; a reduction
over the channel axis itself mixes channels and is a barrier.

Merged layout: pooling runs unchanged on the merged tensor; so does a reduction that keeps dim 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import BY_ID, Barrier, MergeContext, RuleContext, channel_rule, merge_same
from ..errors import PreconditionError
from ..ir import shape_of

POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
)
POOL_FUNCTIONS = (
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.max_pool2d,
    torch.avg_pool1d, F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.interpolate,
)


@channel_rule(*POOL_MODULES, *POOL_FUNCTIONS, mask=BY_ID, merge=merge_same)
def pool_rule(ctx: RuleContext):
    src = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs.get("input")
    ids = ctx.ids_of(src)
    out = ctx.out
    if isinstance(out, tuple):  # max pool with return_indices
        raise Barrier("pooling that returns indices")
    if ids is None or not isinstance(out, torch.Tensor) or out.dim() != ids.dim() or out.dim() < 3:
        raise Barrier("pooling of an unexpected rank")
    if any(s != 1 for s in ids.shape[2:]):
        raise Barrier("channel ids vary over the pooled dims")
    return ids


REDUCTIONS = (torch.mean, torch.sum, torch.amax, "mean", "sum", "amax")


def merge_reduction(m: MergeContext) -> None:
    dims = m.node.args[1] if len(m.node.args) > 1 else m.node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    rank = len(shape_of(m.node.args[0]) or ())
    if not dims or not rank or any(d % rank in (0, 1) for d in dims):
        raise PreconditionError(f"merged layout: {m.node.format_node()} reduces over the batch "
                                "or channel dim")
    merge_same(m)


@channel_rule(*REDUCTIONS, mask=BY_ID, merge=merge_reduction)
def reduction_rule(ctx: RuleContext):
    src = ctx.node.args[0]
    ids = ctx.ids_of(src)
    dims = ctx.arg(1, "dim")
    keepdim = bool(ctx.arg(2, "keepdim", False))
    if ids is None or dims is None or not isinstance(ctx.out, torch.Tensor):
        raise Barrier("reduction over all dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % ids.dim() for d in dims)
    if any(ids.shape[d] != 1 for d in dims):
        raise Barrier(f"reduction over dims {dims} mixes channels")
    if keepdim:
        return ids
    return ids.reshape([s for d, s in enumerate(ids.shape) if d not in dims])
