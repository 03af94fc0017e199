"""Element-wise ops: a channel stays where it is.

Unary ops (activations, dropout, identity, stochastic depth) give their output the input's ids:
``y[..., c, ...] = f(x[..., c, ...])``, so dropping channel c of x drops exactly channel c of y.

N-ary ops with broadcasting (add/sub/mul/div of tensors, as in residual adds, SE gating and layer
scale) mix the operands position by position, so the operands' channels at one output position
must be kept or dropped together: the output gets fresh ids, coupled with each tensor operand's
ids broadcast to the output. An operand of size 1 along a dim is shared by every channel there.

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
from ..channels import compress
from ..errors import PreconditionError

UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.ELU, nn.LeakyReLU,
    nn.Hardtanh, nn.Mish, nn.CELU, nn.SELU, nn.Softplus,
)
UNARY_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.elu,
    F.leaky_relu, F.hardtanh, F.mish, torch.clone, operator.neg, torch.neg,
    torchvision.ops.stochastic_depth,
)
UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach",
    "float", "neg",
)


@channel_rule(*UNARY_MODULES, *UNARY_FUNCTIONS, *UNARY_METHODS, mask=BY_ID, merge=merge_same)
def unary_rule(ctx: RuleContext):
    x = ctx.args[0] if ctx.args else next(iter(ctx.kwargs.values()))
    if not isinstance(ctx.out, torch.Tensor) or not isinstance(x, torch.Tensor) or ctx.out.shape != x.shape:
        raise Barrier("unary op changed the shape")
    src = ctx.node.args[0] if ctx.node.args else next(iter(ctx.node.kwargs.values()))
    return ctx.ids_of(src)


NARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, "add", "sub", "mul", "div", "add_", "mul_",
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


@channel_rule(*NARY, mask=POSITIONAL, merge=merge_broadcast)
def broadcast_rule(ctx: RuleContext):
    out = ctx.out
    if not isinstance(out, torch.Tensor):
        raise Barrier("element-wise op without a tensor result")
    operands = [(a, ctx.ids_of(a)) for a in ctx.node.args[:2]]
    tensor_ids = [ids for _, ids in operands if ids is not None]
    if len(tensor_ids) == 1:  # x op scalar: positions do not change
        return tensor_ids[0]
    lifted = [_lift(ids, out.dim()) for ids in tensor_ids]
    shape = torch.broadcast_shapes(*(ids.shape for ids in lifted))
    # One output channel per distinct tuple of operand channels: positions that combine the
    # same operand channels (e.g. every token of a residual stream) share an id.
    columns = [ids.expand(shape).reshape(-1) for ids in lifted]
    where = torch.zeros_like(columns[0])
    for col in columns:
        where = torch.unique(where * (int(col.max()) + 1) + col, return_inverse=True)[1]
    fresh = ctx.forest.fresh((int(where.max()) + 1,))
    first = torch.empty_like(fresh).scatter_(0, where, torch.arange(where.numel()))
    for col in columns:
        ctx.forest.union(fresh, col[first])
    return compress(fresh[where].reshape(shape))


def _lift(ids: torch.Tensor, ndim: int) -> torch.Tensor:
    """Ids of a lower-rank operand viewed at the output's rank (broadcasting prepends dims)."""
    return ids.reshape((1,) * (ndim - ids.dim()) + tuple(ids.shape))
