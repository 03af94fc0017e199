"""Per-channel ops that mix positions inside a channel: pooling, adaptive pooling, mean/sum.

``y[b, c] = pool(x[b, c])``: each output channel reads only its own input channel, so the channel
axis passes through unchanged. That holds when each channel sits on a single index of the
channel axis, i.e. the input ids are constant over the pooled (spatial) dims; where they vary
there, the pooled positions are coupled first (one unit), which keeps it exact.

A reduction (``mean``/``amax``/... over ``dim``) is per-channel under the same condition (the
reduced positions are coupled). Over the dim that carries the channels it mixes them: a mean
divides by their count and a max can pick a dropped zero, so the input is frozen; a *sum* over
channels is exact as it is (a dropped channel is zero), its result is a new tensor without
those channels.

Merged layout: pooling runs unchanged on the merged tensor; so does a reduction that keeps dim 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import BY_ID, Barrier, MergeContext, RuleContext, channel_rule, merge_same
from .elementwise import broadcast_rule
from ..channels import compress, varying_dims
from ..errors import PreconditionError
from ..ir import shape_of

POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
)
POOL_FUNCTIONS = (
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.max_pool2d,
    torch.avg_pool1d, F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.interpolate,
    F.adaptive_max_pool1d, F.lp_pool2d,
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
    ctx.resolve(ids, (0, 1))  # the pooled positions of a channel are one unit
    return compress(ids[(slice(None), slice(None)) + (slice(0, 1),) * (ids.dim() - 2)])


REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin",
              "max", "min", torch.max, torch.min, "norm", torch.norm)
# a dropped channel is zero: it adds nothing to these (any p-norm included)
ZERO_NEUTRAL = (torch.sum, "sum", "norm", torch.norm)


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
    norm = ctx.node.target in ("norm", torch.norm)
    dims = ctx.arg(2 if norm else 1, "dim")
    keepdim = bool(ctx.arg(3 if norm else 2, "keepdim", False))
    if isinstance(dims, torch.Tensor):  # torch.max(a, b): element-wise
        return broadcast_rule(ctx)
    if ids is None or dims is None:
        raise Barrier("reduction over all dims")
    if not isinstance(ctx.out, (torch.Tensor, tuple)):
        raise Barrier("reduction without a tensor result")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % ids.dim() for d in dims)
    target = ctx.node.target
    summing = target in ZERO_NEUTRAL
    channel_dims = [d for d in dims if ids.shape[d] > 1 and _carries_channels(ctx, ids, d)]
    if channel_dims and summing:  # exact: a dropped channel adds zero; a new tensor results
        ids = torch.zeros((1,) * ids.dim(), dtype=torch.int64)
    elif channel_dims:
        if not bool((ctx.forest.find(ids) == 0).all()):  # e.g. an RMS norm's mean of x² over C
            name = getattr(target, "__name__", str(target))
            ctx.note(f"{name} over channels: keeps every channel it reduces")
        ctx.forest.freeze(ids)
    ctx.resolve(ids, [d for d in range(ids.dim()) if d not in dims])
    ids = compress(ids[tuple(slice(0, 1) if d in dims else slice(None)
                             for d in range(ids.dim()))])
    if not keepdim:
        ids = ids.reshape([s for d, s in enumerate(ids.shape) if d not in dims])
    if isinstance(ctx.out, tuple):  # max/min over a dim: (values, indices)
        return (ids, ids)
    return ids


def _carries_channels(ctx: RuleContext, ids: torch.Tensor, dim: int) -> bool:
    """Whether ``dim`` is the only dim along which ``ids``' roots vary (its real channels),
    rather than one of several, which coupling resolves."""
    return varying_dims(ctx.forest.find(ids)) == [dim]
