"""Data movement: view, reshape, flatten, permute, transpose, (un)squeeze, expand, cat, stack,
split, chunk and tensor indexing.

These ops move values without arithmetic, so mdafx runs the op itself on the id tensors
(materialised at the real shape) and reads off where every channel went: the mapping is exact by
construction, whatever the op's arguments (channel shuffle, flatten of C×H×W into a Linear,
NCHW <-> NHWC permutes, concat offsets, split sizes).

Two constraints keep the pruned graph expressible:

* A pruned tensor must be a sub-grid of the original, so at most one dimension of a result may
  carry independently droppable channels. Where a result has several (a channel axis split into
  ``groups × C/groups`` by a shuffle, a concat along a non-channel dim), the channels along every
  such dim but the last are coupled.
* Constant sizes and indices that address a channel dim (``view(B, 512·7·7)``, ``split([64, 64])``,
  ``x[:, :c]``, ``x[:, 0]``) are rewritten by ``prune``; an integer index on a channel dim freezes
  the channel it reads, and a strided slice or tensor index on a channel dim is a barrier.
  ``squeeze`` of a tensor with droppable channels is frozen: pruning to one channel would change
  what it squeezes.

Merged layout: a concat along dim 1 of merged tensors lays the inputs' layouts end to end, so
component k's channels of input i follow its channels of inputs 0..i-1 (the layout records it;
nothing is reordered); a flatten from dim 1 maps ``(k, j)`` to features ``(k, j·HW + s)``. Other
data movement cannot be merged (the final class-reordering ``getitem`` of a component,
:func:`is_class_select`, is not merged but folded into the merged output's order).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from . import BY_ID, Barrier, Layout, MergeContext, PruneContext, RuleContext, channel_rule
from ..channels import ChannelForest, along, compress, expand_to, varying_dims
from ..errors import InternalError, PreconditionError
from ..ir import shape_of

RESHAPES = ("view", "reshape", "expand", torch.reshape)
SPLITS = ("split", "chunk", torch.split, torch.chunk)
PLAIN = (
    "flatten", "permute", "transpose", "unsqueeze", "swapaxes", torch.flatten, torch.permute,
    torch.transpose, torch.unsqueeze, torch.swapaxes, torch.cat, torch.concat, torch.stack,
    nn.Flatten,
)


def _full_args(ctx: RuleContext):
    def full(a):
        value = ctx.value_of(a)
        if isinstance(value, torch.Tensor):
            return expand_to(ctx.ids_of(a), value.shape)
        return value

    return fx.node.map_arg(ctx.node.args, full), fx.node.map_arg(ctx.node.kwargs, full)


def _run_on_ids(ctx: RuleContext):
    args, kwargs = _full_args(ctx)
    node = ctx.node
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return ctx.module(*args, **kwargs)
    return node.target(*args, **kwargs)


def _one_channel_dim(forest: ChannelForest, ids: torch.Tensor) -> torch.Tensor:
    ids = compress(ids)
    dims = varying_dims(forest.find(ids))
    for d in dims[:-1]:
        forest.union(ids, ids.narrow(d, 0, 1))
    return compress(ids)


def _finish(ctx: RuleContext, out):
    if isinstance(out, torch.Tensor):
        return _one_channel_dim(ctx.forest, out)
    if isinstance(out, (tuple, list)):
        return tuple(_finish(ctx, o) for o in out)
    raise Barrier(f"unexpected result type {type(out).__name__}")


def movement_rule(ctx: RuleContext):
    if ctx.node.kwargs.get("out") is not None:
        raise Barrier("out= argument")
    return _finish(ctx, _run_on_ids(ctx))


@channel_rule("squeeze", torch.squeeze, mask=BY_ID)
def squeeze_rule(ctx: RuleContext):
    ids = ctx.ids_of(ctx.node.args[0])
    if ids is not None and varying_dims(ctx.forest.find(ids)):
        ctx.forest.freeze(ids)
    return _finish(ctx, _run_on_ids(ctx))


def _int_list(c) -> bool:
    return isinstance(c, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in c)


def _index_components(index, ndim: int) -> list[tuple[int, object]]:
    """(input dim, component) for each int/slice component of a basic index; raises Barrier."""
    if not isinstance(index, tuple):
        index = (index,)
    consumed = sum(1 for c in index if isinstance(c, (int, slice)) or _int_list(c))
    if sum(1 for c in index if _int_list(c)) > 1:
        raise Barrier("more than one list index")
    out, dim = [], 0
    for c in index:
        if c is Ellipsis:
            dim += ndim - consumed
        elif c is None:
            continue
        elif isinstance(c, (int, slice)) and not isinstance(c, bool) or _int_list(c):
            out.append((dim, c))
            dim += 1
        else:
            raise Barrier(f"advanced index {type(c).__name__}")
    return out


def getitem_rule(ctx: RuleContext):
    container = ctx.value_of(ctx.node.args[0])
    if not isinstance(container, torch.Tensor):
        ids = ctx.ids_of(ctx.node.args[0])
        return None if ids is None else ids[ctx.args[1]]
    ids = ctx.ids_of(ctx.node.args[0])
    full = expand_to(ids, container.shape)
    channel_dims = set(varying_dims(ctx.forest.find(ids)))
    for dim, c in _index_components(ctx.args[1], container.dim()):
        if dim not in channel_dims:
            continue
        if isinstance(c, int):
            ctx.forest.freeze(full.select(dim, c))
        elif not isinstance(c, slice):  # a list picks channels: keep each one it names
            ctx.forest.freeze(full.index_select(dim, torch.tensor(c)))
        elif c.step not in (None, 1):
            raise Barrier("strided slice of a channel dim")
    return _finish(ctx, _run_on_ids(ctx))


# ----------------------------------------------------------------------------- pruning


def _kept_count(kept: torch.Tensor, dim: int) -> int:
    return int(along(kept, dim).sum())


def _channel_dim(p: PruneContext, node) -> int | None:
    dims = varying_dims(p.roots_of(node))
    if len(dims) > 1:
        raise InternalError(f"{node} has channels on several dims {dims}")
    return dims[0] if dims else None


def prune_reshape(p: PruneContext) -> None:
    node = p.node
    dim = _channel_dim(p, node)
    if dim is None:
        return
    shape_args = list(node.args[1:])
    packed = len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list))
    if "shape" in node.kwargs or "size" in node.kwargs:
        key = "shape" if "shape" in node.kwargs else "size"
        sizes = list(node.kwargs[key])
    else:
        sizes = list(shape_args[0]) if packed else shape_args
    if dim >= len(sizes) or not isinstance(sizes[dim], int) or sizes[dim] == -1:
        return
    sizes[dim] = _kept_count(p.kept_of(node), dim)
    if "shape" in node.kwargs or "size" in node.kwargs:
        node.kwargs = {**node.kwargs, key: tuple(sizes)}
    elif packed:
        node.args = (node.args[0], tuple(sizes))
    else:
        node.args = (node.args[0], *sizes)


def prune_split(p: PruneContext) -> None:
    node = p.node
    x = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    ndim = p.roots_of(x).dim()
    dim %= ndim
    if _channel_dim(p, x) != dim:
        return
    sizes = [_kept_count(k, dim) for k in p.kept_of(node)]
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (x, sizes), {"dim": dim}


def prune_getitem(p: PruneContext) -> None:
    node = p.node
    x = node.args[0]
    roots = p.roots_of(x)
    if not isinstance(roots, torch.Tensor):
        return
    dim = _channel_dim(p, x)
    if dim is None:
        return
    kept = along(p.kept_of(x), dim)
    before = torch.cat([torch.zeros(1, dtype=torch.int64), kept.cumsum(0)])
    index = node.args[1]
    as_tuple = isinstance(index, tuple)
    components = list(index) if as_tuple else [index]
    positions = {d: i for i, (d, _) in enumerate(_index_components(tuple(components), roots.dim()))}
    if dim not in positions:
        return
    slot = [i for i, c in enumerate(components)
            if isinstance(c, (int, slice)) or _int_list(c)][positions[dim]]
    c, n = components[slot], kept.numel()
    if isinstance(c, int):
        components[slot] = int(before[c % n])
    elif not isinstance(c, slice):
        components[slot] = [int(before[i % n]) for i in c]
    else:
        lo, hi, _ = c.indices(n)
        components[slot] = slice(int(before[lo]), int(before[max(hi, lo)]), c.step)
    node.args = (x, tuple(components) if as_tuple else components[0])



# ----------------------------------------------------------------------------- merged layout


def _refuse(m: MergeContext) -> None:
    raise PreconditionError(f"merged layout: no merge for {m.node.format_node()}; use "
                            "layout='parallel'")


def _flatten_layout(layout: Layout | None, shape) -> Layout | None:
    if layout is None:
        return None
    hw = 1
    for s in tuple(shape or ())[2:]:
        hw *= s
    return [(k, j * hw + s) for k, j in layout for s in range(hw)]


def merge_movement(m: MergeContext) -> None:
    """cat along dim 1 and flatten from dim 1 (module docstring); anything else is refused."""
    node, target = m.node, m.node.target
    if target in (torch.cat, torch.concat):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim != 1 or any(m.layout(a) is None for a in node.args[0]):
            _refuse(m)
        offset, layout = [0] * len(m.column), []
        for part in node.args[0]:
            part_layout = m.layout(part)
            layout += [(k, j + offset[k]) for k, j in part_layout]
            offset = [o + s for o, s in zip(offset, m.sizes(part_layout))]
        m.emit(m.arg(node.args), m.arg(node.kwargs), layout)
        return
    is_flatten = target in (torch.flatten, "flatten") or node.op == "call_module" and isinstance(
        m.modules[0], nn.Flatten)
    if is_flatten:
        start = (m.modules[0].start_dim if node.op == "call_module" else
                 node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0))
        if start != 1:
            _refuse(m)
        layout = _flatten_layout(m.layout(node.args[0]), shape_of(node.args[0]))
        if node.op == "call_module":
            m.emit_module(m.modules[0], m.arg(node.args), layout)
        else:
            m.emit(m.arg(node.args), m.arg(node.kwargs), layout)
        return
    _refuse(m)


def is_class_select(node: fx.Node) -> bool:
    """``x[:, [i, j, ...]]``: the class reordering PruneChannels appends to a component."""
    idx = node.args[1] if len(node.args) > 1 else None
    return (node.target is operator.getitem and isinstance(idx, tuple) and len(idx) == 2
            and idx[0] == slice(None) and isinstance(idx[1], list))


channel_rule(*PLAIN, merge=merge_movement, name="movement_rule")(movement_rule)
channel_rule(*RESHAPES, prune=prune_reshape, name="reshape_rule")(movement_rule)
channel_rule(*SPLITS, prune=prune_split, name="split_rule")(movement_rule)
channel_rule(operator.getitem, prune=prune_getitem, name="getitem_rule")(getitem_rule)
