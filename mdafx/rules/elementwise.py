"""Element-wise ops: a channel stays where it is.

Unary ops (activations, dropout, identity, casts, ``exp``/``sqrt``/``pow`` by a number, ...) give
their output the input's ids: ``y[..., c, ...] = f(x[..., c, ...])``, so dropping channel c of x
drops exactly channel c of y, whatever ``f(0)`` is (the masked model zeroes y's channel c too).
An L2 (any p-) normalisation is element-wise in this sense: a dropped channel is zero, which
leaves the norm unchanged. PReLU's per-channel slope is coupled with the channels.

N-ary ops with broadcasting (add/sub/mul/div/where/addcmul of tensors, as in residual adds, SE
gating, layer scale and position embeddings) mix the operands position by position, so the
operands' channels at one output position must be kept or dropped together: the output gets
fresh ids, coupled with each tensor operand's ids broadcast to the output. An operand of size 1
along a dim is shared by every channel there. A *constant* operand (all frozen: an attention
mask, a fixed table, a frozen input) is not coupled position by position, which would freeze the
other operands: it only forbids slicing the output along the dims where it has more than one
entry (the output is coupled along them), so ``logits + mask`` keeps its heads prunable.

Merged layout: unary ops run unchanged on the merged tensor; an element-wise op of two tensors
first brings the second operand into the first one's layout (an ``index_select``).
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from . import BY_ID, POSITIONAL, Barrier, MergeContext, RuleContext, channel_rule, merge_same
from ..channels import FROZEN, along, compress, varying_dims
from ..errors import PreconditionError

UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.ELU,
    nn.LeakyReLU, nn.Hardtanh, nn.Mish, nn.CELU, nn.SELU, nn.Softplus,
)
UNARY_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.elu,
    F.leaky_relu, F.hardtanh, F.mish, torch.clone, operator.neg, torch.neg,
    torchvision.ops.stochastic_depth, F.softplus, F.selu, F.celu, F.logsigmoid, F.normalize,
    torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.erf, torch.clamp,
    torch.zeros_like, torch.ones_like, operator.abs,
)
UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach",
    "float", "neg", "to", "type_as", "exp", "abs", "sqrt", "rsqrt", "square", "clamp",
    "clamp_min", "clamp_max", "half", "bfloat16", "erf",
)


@channel_rule(*UNARY_MODULES, *UNARY_FUNCTIONS, *UNARY_METHODS, mask=BY_ID, merge=merge_same)
def unary_rule(ctx: RuleContext):
    x = ctx.args[0] if ctx.args else next(iter(ctx.kwargs.values()))
    if not isinstance(ctx.out, torch.Tensor) or not isinstance(x, torch.Tensor) or ctx.out.shape != x.shape:
        raise Barrier("unary op changed the shape")
    src = ctx.node.args[0] if ctx.node.args else next(iter(ctx.node.kwargs.values()))
    return ctx.ids_of(src)


def prune_prelu(p) -> None:
    if p.module is None or p.module.num_parameters == 1:
        return
    keep = along(p.kept_of(p.node), 1, p.module.num_parameters)
    cls = p.base or type(p.module)
    if bool(keep.all()) and type(p.module) is cls:
        return
    w = p.module.weight
    new = cls(int(keep.sum()), p.module.init, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(p.module.weight[keep])
    p.replace_module(new)


@channel_rule(nn.PReLU, torch.prelu, mask=BY_ID, prune=prune_prelu)
def prelu_rule(ctx: RuleContext):
    """``y = max(0, x) + a_c · min(0, x)``: one slope per channel (dim 1) or one for all."""
    ids = unary_rule(ctx)
    weight = ctx.module.weight if ctx.module is not None else ctx.node_arg(1, "weight")
    value = weight if isinstance(weight, torch.Tensor) else ctx.value_of(weight)
    if value.numel() == 1:  # one slope for every channel
        return ids
    if ids.dim() < 2:
        raise Barrier("prelu of a tensor without a channel dim")
    profile = along(ctx.resolve(ids, 1), 1, value.numel())
    slope = ctx.param_dim(weight, 0, like=profile)
    if slope is not None:
        ctx.forest.union(profile, slope)
    return ids


NARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.where,
    torch.maximum, torch.minimum, "add", "sub", "mul", "div", "add_", "mul_", "pow",
    "masked_fill", torch.addcmul, "addcmul", operator.gt, operator.lt, operator.ge, operator.le,
    operator.eq, operator.ne,
)


def merge_broadcast(m: MergeContext) -> None:
    tensors = [a for a in m.node.args[:2] if hasattr(a, "name")]
    base = m.layout(tensors[0])
    args = list(m.arg(m.node.args))
    for i, a in enumerate(m.node.args[:2]):
        if hasattr(a, "name") and m.layout(a) != base:
            if base is None or m.layout(a) is None:
                raise PreconditionError(f"merged layout: {m.node.format_node()} mixes the shared "
                                        "input with a component tensor")
            args[i] = m.permute(args[i], m.layout(a), base)
    m.emit(tuple(args), m.arg(m.node.kwargs), base)


def combine(ctx: RuleContext, operands: list[tuple[torch.Tensor, torch.Size]],
            out_shape) -> torch.Tensor:
    """Ids of a broadcasting combination of ``operands`` (``(ids, value shape)``, in any rank
    up to the output's) into a tensor of ``out_shape`` (module docstring): one output channel per
    distinct tuple of the live operands' channels, coupled with each of them; a constant
    operand only couples the output along the dims where it has several entries."""
    ndim = len(out_shape)
    live, constant = [], []
    for ids, shape in operands:
        lifted = _lift(ids, ndim)
        if bool((ctx.forest.find(lifted) == FROZEN).all()):
            constant.append((1,) * (ndim - len(shape)) + tuple(shape))
        else:
            live.append(lifted)
    if not live:
        return torch.zeros((1,) * ndim, dtype=torch.int64)
    if len(live) == 1:
        out = live[0]
    else:
        shape = torch.broadcast_shapes(*(ids.shape for ids in live))
        # One output channel per distinct tuple of operand channels: positions that combine
        # the same operand channels (e.g. every token of a residual stream) share an id.
        columns = [ids.expand(shape).reshape(-1) for ids in live]
        where = torch.zeros_like(columns[0])
        for col in columns:
            where = torch.unique(where * (int(col.max()) + 1) + col, return_inverse=True)[1]
        fresh = ctx.forest.fresh((int(where.max()) + 1,))
        first = torch.empty_like(fresh).scatter_(0, where, torch.arange(where.numel()))
        for col in columns:
            ctx.forest.union(fresh, col[first])
        out = compress(fresh[where].reshape(shape))
    # the output cannot be sliced where a constant has several entries: one unit there
    dims = {d for shape in constant for d in range(ndim) if shape[d] > 1 and out.shape[d] > 1}
    if dims:
        ctx.resolve(out, [d for d in range(ndim) if d not in dims])
        if not varying_dims(ctx.forest.find(out)):  # one unit left: nothing can be sliced
            ctx.forest.freeze(out)
    return out


@channel_rule(*NARY, mask=POSITIONAL, merge=merge_broadcast)
def broadcast_rule(ctx: RuleContext):
    out = ctx.out
    if not isinstance(out, torch.Tensor):
        raise Barrier("element-wise op without a tensor result")
    args = list(ctx.node.args) + list(ctx.node.kwargs.values())
    operands = [(ctx.ids_of(a), ctx.value_of(a).shape) for a in args
                if ctx.ids_of(a) is not None]
    if any(len(shape) > out.dim() for _, shape in operands):
        raise Barrier("element-wise op whose result has a lower rank than an operand")
    if len(operands) == 1 and tuple(operands[0][1]) == tuple(out.shape):
        return operands[0][0]  # x op scalar: positions do not change
    return combine(ctx, operands, out.shape)


def _lift(ids: torch.Tensor, ndim: int) -> torch.Tensor:
    """Ids of a lower-rank operand viewed at the output's rank (broadcasting prepends dims)."""
    return ids.reshape((1,) * (ndim - ids.dim()) + tuple(ids.shape))
