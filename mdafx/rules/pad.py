"""Padding: ``F.pad`` and the padding modules.

``F.pad(x, (l₀, r₀, l₁, r₁, ...))`` pads the last dim by ``l₀, r₀``, the one before by ``l₁, r₁``
and so on. Along a dim where a tensor's channel ids are constant (a spatial dim), the padded
positions lie inside each channel's plane: the ids pass through unchanged, and dropping a
channel drops its padding with it. Along the dim that carries the channels (padding the channel
dim of an NHWC tensor, a "zero channel" shortcut), zero padding adds new channels: they are
frozen (never dropped), so the padding amounts stay valid after pruning. Reflect, replicate and
circular padding copy entries along the padded dim: that dim becomes one unit. Cropping
(negative padding) of a channel dim is a barrier.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import BY_ID, Barrier, RuleContext, channel_rule


def _pad_ids(ctx: RuleContext, ids: torch.Tensor | None, pad, mode: str):
    if ids is None:
        raise Barrier("padding of a non-tensor")
    if isinstance(pad, int):
        pad = (pad,) * (2 * max(ids.dim() - 2, 1))
    pad = list(pad)
    if len(pad) % 2 or len(pad) // 2 > ids.dim() or not all(isinstance(p, int) for p in pad):
        raise Barrier("padding amounts that do not fit the tensor")
    padded = {ids.dim() - 1 - i: (pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)}
    padded = {d: lr for d, lr in padded.items() if lr != (0, 0)}
    if mode != "constant":
        return ctx.resolve(ids, [d for d in range(ids.dim()) if d not in padded])
    out = ids
    for d, (lo, hi) in sorted(padded.items()):
        if out.shape[d] == 1:
            continue  # inside each channel's plane
        if lo < 0 or hi < 0:
            raise Barrier("cropping a channel dim")
        shape = list(out.shape)
        parts = []
        for n in (lo, hi):
            shape[d] = n
            parts.append(torch.zeros(shape, dtype=out.dtype))  # new channels: frozen
        out = torch.cat([parts[0], out, parts[1]], d)
    return out


@channel_rule(F.pad, mask=BY_ID)
def pad_rule(ctx: RuleContext):
    mode = ctx.arg(2, "mode", "constant")
    return _pad_ids(ctx, ctx.ids_of(ctx.node_arg(0, "input")), ctx.arg(1, "pad"), mode)


PAD_MODES = {
    nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ConstantPad1d: "constant",
    nn.ConstantPad2d: "constant", nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
    nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate",
    nn.CircularPad2d: "circular",
}


@channel_rule(*PAD_MODES, mask=BY_ID)
def pad_module_rule(ctx: RuleContext):
    m = ctx.module
    mode = next(PAD_MODES[c] for c in type(m).__mro__ if c in PAD_MODES)
    return _pad_ids(ctx, ctx.ids_of(ctx.node.args[0]), m.padding, mode)
