"""Attention: matmul, einsum, softmax and ``F.scaled_dot_product_attention``.

``C = A @ B`` with ``A [..., n, k]`` and ``B [..., k, m]`` computes ``C[..., n, m] =
Σ_k A[..., n, k] B[..., k, m]``. Its batch dims combine position by position like an
element-wise op (``elementwise.combine``), row ``n`` comes from A and column ``m`` from B. The
contracted dim ``k`` leaves no trace in C, so its entries must stay whole: where A (or B) has
channels along ``k`` they are made one unit (coupled) with the rest of their row (column). In a
transformer this is what makes heads the prunable unit: ``q @ kᵀ`` over ``head_dim`` couples the
head dims of q and of k, the batch dim ``heads`` couples q's head h with k's, and ``attn @ v``
couples them with v's head h, so each head (its q/k/v rows in the qkv projection, its columns in
the output projection) is kept or dropped whole, and the reshape constants (``num_heads``) are
rewritten by the reshape rule.

``einsum`` is the same with letters: a letter of an operand that the output lacks is contracted
(one unit), the others combine position by position. ``softmax`` (function, method or
``nn.Softmax``) over a dim normalises across it: that dim is one unit per remaining position.

``F.scaled_dot_product_attention(q, k, v, attn_mask)`` is ``softmax(q kᵀ · scale + mask) v``:
q's ``E`` and k's ``E`` and ``S`` dims, and v's ``S``, are units; the batch dims (heads) combine
q, k, v and the mask, q's ``L`` and v's ``Ev`` pass to the output. Its default scale
``1/√E`` reads q's last dim, which is never sliced (a unit), so it stays exact.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import BY_ID, POSITIONAL, Barrier, RuleContext, channel_rule
from .elementwise import combine
from ..channels import varying_dims


def _operand(ctx: RuleContext, arg):
    ids, value = ctx.ids_of(arg), ctx.value_of(arg)
    if ids is None or not isinstance(value, torch.Tensor):
        raise Barrier("matmul of a non-tensor")
    return ids, value


def _unit(ctx: RuleContext, ids: torch.Tensor, dims) -> torch.Tensor:
    """``ids`` made one unit along ``dims`` (negative dims), then narrowed to one entry there."""
    dims = [d % ids.dim() for d in dims]
    ctx.resolve(ids, [d for d in range(ids.dim()) if d not in dims])
    for d in dims:
        ids = ids.narrow(d, 0, 1)
    return ids


def matmul_back(node, out_mask: torch.Tensor) -> list:
    """Row n of A matters if any column of C's row n does; column m of B likewise."""
    return [(node.args[0], out_mask.any(-1, keepdim=True)),
            (node.args[1], out_mask.any(-2, keepdim=True))]


def sdpa_back(node, out_mask: torch.Tensor) -> list:
    args = [node.args[i] if len(node.args) > i else node.kwargs.get(name)
            for i, name in enumerate(("query", "key", "value", "attn_mask"))]
    rows = out_mask.any(-1, keepdim=True)
    pairs = [(args[0], rows), (args[1], rows.any(-2, keepdim=True)),
             (args[2], out_mask.any(-2, keepdim=True))]
    return pairs + ([(args[3], rows)] if args[3] is not None else [])


@channel_rule(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", mask=POSITIONAL,
              back=matmul_back)
def matmul_rule(ctx: RuleContext):
    (a, va), (b, vb) = _operand(ctx, ctx.node.args[0]), _operand(ctx, ctx.node.args[1])
    out = ctx.out
    if va.dim() < 2 or vb.dim() < 2 or not isinstance(out, torch.Tensor):
        raise Barrier("matmul with a vector operand")
    a0 = _unit(ctx, a, [-1])        # [..., n, 1]
    b0 = _unit(ctx, b, [-2])        # [..., 1, m]
    shape_a = (*va.shape[:-1], 1)
    shape_b = (*vb.shape[:-2], 1, vb.shape[-1])
    return combine(ctx, [(a0, shape_a), (b0, shape_b)], out.shape)


@channel_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax",
              "log_softmax", nn.Softmax, nn.LogSoftmax, mask=BY_ID)
def softmax_rule(ctx: RuleContext):
    """Softmax mixes the positions along one dim: that dim is one unit; where it carries a
    tensor's only channels they are all kept (reported). ``nn.Softmax(dim)`` is the same op."""
    ids = ctx.ids_of(ctx.node_arg(0, "input"))
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim")
    if ids is None or not isinstance(dim, int):
        raise Barrier(f"{describe(ctx)} without a dim")
    dim %= ids.dim()
    if varying_dims(ctx.forest.find(ids)) == [dim]:
        ctx.note(f"{describe(ctx)} across channels: keeps every channel it mixes")
        ctx.forest.freeze(ids)
    ctx.resolve(ids, [d for d in range(ids.dim()) if d != dim])
    return ids


def describe(ctx: RuleContext) -> str:
    if ctx.module is not None:
        return type(ctx.module).__name__
    return getattr(ctx.node.target, "__name__", str(ctx.node.target))


@channel_rule(F.scaled_dot_product_attention, mask=POSITIONAL, back=sdpa_back)
def sdpa_rule(ctx: RuleContext):
    (q, vq), (k, vk), (v, vv) = (_operand(ctx, ctx.node_arg(i, name))
                                 for i, name in enumerate(("query", "key", "value")))
    if ctx.arg(8, "enable_gqa", False) or vq.dim() < 3:
        raise Barrier("grouped-query attention")
    operands = [(_unit(ctx, q, [-1]), (*vq.shape[:-1], 1)),
                (_unit(ctx, k, [-1, -2]), (*vk.shape[:-2], 1, 1)),
                (_unit(ctx, v, [-2]), (*vv.shape[:-2], 1, vv.shape[-1]))]
    mask = ctx.node_arg(3, "attn_mask")
    if mask is not None:
        m, vm = _operand(ctx, mask)
        operands.append((_unit(ctx, m, [-1]), (*vm.shape[:-1], 1)))
    return combine(ctx, operands, ctx.out.shape)


# ----------------------------------------------------------------------------- einsum
# ``torch.einsum("bhid,bhjd->bhij", q, k)``: a letter in the output and in an operand is a batch
# or free dim (positions combine as in an element-wise op); a letter of an operand missing from
# the output is contracted (made one unit, like a matmul's k).


def _einsum_parts(node) -> tuple[list[str], str] | None:
    eq = node.args[0] if node.args else None
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    inputs = lhs.split(",")
    if len(inputs) != len(node.args) - 1 or any(len(set(s)) != len(s) for s in inputs + [out]):
        return None
    return inputs, out


def _to_output(ids: torch.Tensor, sub: str, out: str) -> torch.Tensor:
    """Operand ids (contracted letters already narrowed to 1) laid out in the output's letters."""
    keep = [c for c in sub if c in out]
    ids = ids.reshape([ids.shape[i] for i, c in enumerate(sub) if c in out] or [1])
    ids = ids.permute([keep.index(c) for c in out if c in keep]) if keep else ids
    shape, it = [], iter(ids.shape)
    for c in out:
        shape.append(next(it) if c in keep else 1)
    return ids.reshape(shape)


def einsum_back(node, out_mask: torch.Tensor) -> list:
    parts = _einsum_parts(node)
    if parts is None:
        return [(a, out_mask.any()) for a in node.args[1:]]
    inputs, out = parts
    pairs = []
    for a, sub in zip(node.args[1:], inputs):
        m = out_mask
        for d, c in reversed(list(enumerate(out))):  # OR over the letters a does not have
            if c not in sub:
                m = m.any(d + 1, keepdim=True)
        m = m.squeeze(tuple(d + 1 for d, c in enumerate(out) if c not in sub)) if any(
            c not in sub for c in out) else m
        order = [c for c in out if c in sub]
        m = m.permute(0, *[order.index(c) + 1 for c in sub if c in order]) if order else m
        for d, c in enumerate(sub):  # contracted letters: size 1, broadcast back
            if c not in out:
                m = m.unsqueeze(d + 1)
        pairs.append((a, m))
    return pairs


@channel_rule(torch.einsum, mask=POSITIONAL, back=einsum_back)
def einsum_rule(ctx: RuleContext):
    parts = _einsum_parts(ctx.node)
    if parts is None or not isinstance(ctx.out, torch.Tensor):
        raise Barrier("einsum with an ellipsis, repeated letters or a list of operands")
    inputs, out = parts
    operands = []
    for a, sub in zip(ctx.node.args[1:], inputs):
        ids, value = _operand(ctx, a)
        contracted = [d for d, c in enumerate(sub) if c not in out]
        if contracted:
            ids = _unit(ctx, ids, [d - len(sub) for d in contracted])
        shape = [1 if c not in out else value.shape[d] for d, c in enumerate(sub)]
        operands.append((_to_output(ids, sub, out),
                         _to_output(torch.empty(shape), sub, out).shape))
    return combine(ctx, operands, ctx.out.shape)
