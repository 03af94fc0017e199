"""Data movement: view, reshape, flatten, permute, transpose, (un)squeeze, expand, cat, stack,
split, chunk and tensor indexing.

These ops move values without arithmetic, so mdafx runs the op itself on the id tensors
(materialised at the real shape) and reads off where every channel went: the mapping is exact by
construction, whatever the op's arguments (channel shuffle, flatten of C×H×W into a Linear,
NCHW <-> NHWC permutes, concat offsets, split sizes).

Two constraints keep the pruned graph expressible:

* A pruned tensor must be a sub-grid of the original, so at most one dimension of a tensor may
  carry independently droppable channels. A result may have several for a while (a channel axis
  split into ``groups × C/groups`` by a shuffle, into ``3 × heads × head_dim`` by an attention
  block, a concat along a non-channel dim): the op that reads it decides (a matmul makes the
  contracted ``head_dim`` one unit, so whole heads remain), and ChannelGroups finally couples
  every dim but the last of what is left.
* Constant sizes and indices that address a channel dim (``view(B, 512·7·7)``, ``split([64, 64])``,
  ``x[:, :c]``) are rewritten by ``prune`` (a size computed in the graph, ``C`` of
  ``B, N, C = x.shape``, becomes the kept count). Ops that address positions by value (an
  integer or tensor index, ``unbind``, ``roll``) make that dim one unit, so it is never sliced
  (``qkv[0]``, ``x[:, 0]``, ``table[index]`` stay exact); a list index freezes the channels it
  names, and a strided slice on a channel dim is a barrier. ``squeeze()`` of a tensor with
  droppable channels is frozen: pruning to one channel would change what it squeezes.

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
from ..channels import along, compress, expand_to, varying_dims
from ..errors import InternalError, PreconditionError
from ..ir import shape_of

RESHAPES = ("view", "reshape", "expand", torch.reshape)
SPLITS = ("split", "chunk", torch.split, torch.chunk)
PLAIN = (
    "flatten", "permute", "transpose", "unsqueeze", "swapaxes", torch.flatten, torch.permute,
    torch.transpose, torch.unsqueeze, torch.swapaxes, torch.cat, torch.concat, torch.stack,
    nn.Flatten, "view_as", "reshape_as", "expand_as", "repeat", "tile", torch.tile, "flip",
    torch.flip, "movedim", torch.movedim,
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


def _finish(ctx: RuleContext, out):
    if isinstance(out, torch.Tensor):
        return compress(out)
    if isinstance(out, (tuple, list)):
        return tuple(_finish(ctx, o) for o in out)
    raise Barrier(f"unexpected result type {type(out).__name__}")


def movement_rule(ctx: RuleContext):
    if ctx.node.kwargs.get("out") is not None:
        raise Barrier("out= argument")
    if ctx.ids_of(ctx.node.args[0] if ctx.node.args else None) is None and not isinstance(
            ctx.node.args[0] if ctx.node.args else None, (list, tuple)):
        raise Barrier("data movement of a non-tensor")
    return _finish(ctx, _run_on_ids(ctx))


def _dims_arg(ctx: RuleContext, i: int, name: str, ndim: int) -> list[int]:
    dims = ctx.arg(i, name, 0)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return [d % ndim for d in dims]


@channel_rule("unbind", torch.unbind, mask=BY_ID)
def unbind_rule(ctx: RuleContext):
    """Each result is one index along ``dim``: that dim is one unit (never sliced)."""
    ids = ctx.ids_of(ctx.node.args[0])
    if ids is None:
        raise Barrier("unbind of a non-tensor")
    dim = _dims_arg(ctx, 1, "dim", ids.dim())[0]
    ctx.resolve(ids, [d for d in range(ids.dim()) if d != dim])
    return _finish(ctx, _run_on_ids(ctx))


@channel_rule("roll", torch.roll, mask=BY_ID)
def roll_rule(ctx: RuleContext):
    """A shift along ``dims`` (Swin's shifted windows): those dims are one unit."""
    ids = ctx.ids_of(ctx.node.args[0])
    if ids is None:
        raise Barrier("roll of a non-tensor")
    dims = ctx.arg(2, "dims")
    if dims is None:
        raise Barrier("roll of the flattened tensor")
    dims = _dims_arg(ctx, 2, "dims", ids.dim())
    ctx.resolve(ids, [d for d in range(ids.dim()) if d not in dims])
    return _finish(ctx, _run_on_ids(ctx))


@channel_rule("repeat_interleave", torch.repeat_interleave, mask=BY_ID)
def repeat_interleave_rule(ctx: RuleContext):
    """Each entry repeated a constant number of times: a dropped channel drops its copies.
    Per-entry repeats (a tensor) would no longer fit a pruned dim: that dim is one unit."""
    ids = ctx.ids_of(ctx.node.args[0])
    if ids is None or ctx.arg(2, "dim") is None:
        raise Barrier("repeat_interleave of a non-tensor or of the flattened tensor")
    if isinstance(ctx.arg(1, "repeats"), torch.Tensor):
        dim = ctx.arg(2, "dim") % ids.dim()
        ctx.resolve(ids, [d for d in range(ids.dim()) if d != dim])
    return _finish(ctx, _run_on_ids(ctx))


@channel_rule("squeeze", torch.squeeze, mask=BY_ID)
def squeeze_rule(ctx: RuleContext):
    ids = ctx.ids_of(ctx.node.args[0])
    explicit = len(ctx.node.args) > 1 or "dim" in ctx.node.kwargs
    if ids is not None and not explicit and varying_dims(ctx.forest.find(ids)):
        ctx.forest.freeze(ids)
    return _finish(ctx, _run_on_ids(ctx))


def _int_list(c) -> bool:
    return isinstance(c, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in c)


def _consumes(c) -> int:
    """How many input dims an index component (a value, or the fx Node of one) addresses."""
    if isinstance(c, fx.Node):
        meta = c.meta.get("tensor_meta")
        return len(meta.shape) if getattr(meta, "dtype", None) == torch.bool else 1
    if isinstance(c, torch.Tensor) and c.dtype == torch.bool:
        return c.dim()
    if isinstance(c, (int, slice, torch.Tensor)) and not isinstance(c, bool) or _int_list(c):
        return 1
    return 0


def _index_components(index, ndim: int) -> list[tuple[int, object]]:
    """(input dim, component) for each int/slice/list/tensor component of an index (a boolean
    mask over k dims is listed at each of them); raises Barrier."""
    if not isinstance(index, tuple):
        index = (index,)
    consumed = sum(_consumes(c) for c in index)
    if sum(1 for c in index if _int_list(c)) > 1:
        raise Barrier("more than one list index")
    out, dim = [], 0
    for c in index:
        if c is Ellipsis:
            dim += ndim - consumed
        elif c is None:
            continue
        elif _consumes(c):
            for _ in range(_consumes(c)):
                out.append((dim, c))
                dim += 1
        else:
            raise Barrier(f"index {type(c).__name__}")
    return out


def _slot_of_dim(index: tuple, ndim: int, dim: int) -> int | None:
    """Position in ``index`` of the component that addresses input dim ``dim``."""
    consumed = sum(_consumes(c) for c in index)
    d = 0
    for i, c in enumerate(index):
        if c is Ellipsis:
            d += ndim - consumed
        elif _consumes(c):
            if d <= dim < d + _consumes(c):
                return i
            d += _consumes(c)
    return None


def getitem_rule(ctx: RuleContext):
    container = ctx.value_of(ctx.node.args[0])
    if not isinstance(container, torch.Tensor):
        ids = ctx.ids_of(ctx.node.args[0])
        return None if ids is None else ids[ctx.args[1]]
    ids = ctx.ids_of(ctx.node.args[0])
    if ids is None:
        raise Barrier("index of a tensor without ids")
    index = ctx.args[1]
    for dim, c in _index_components(index, container.dim()):
        if ids.shape[dim] == 1:
            continue
        if isinstance(c, (int, torch.Tensor)):  # addressed by value: one unit along dim
            ctx.resolve(ids, [d for d in range(ids.dim()) if d != dim])
        elif not isinstance(c, slice):  # a list picks channels: keep each one it names
            if dim in varying_dims(ctx.forest.find(ids)):
                full = expand_to(ids, container.shape)
                ctx.forest.freeze(full.index_select(dim, torch.tensor(c)))
        elif c.step not in (None, 1) and dim in varying_dims(ctx.forest.find(ids)):
            raise Barrier("strided slice of a channel dim")
    return _finish(ctx, expand_to(ids, container.shape)[index])


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
    if dim >= len(sizes) or isinstance(sizes[dim], int) and sizes[dim] == -1:
        return
    if not isinstance(sizes[dim], (int, fx.Node)):
        return
    sizes[dim] = _kept_count(p.kept_of(node), dim)  # a size computed in the graph too
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
    metas = node.meta.get("tensor_meta") or ()
    sizes = [int(along(k, dim, m.shape[dim]).sum()) if hasattr(m, "shape") else
             _kept_count(k, dim) for k, m in zip(p.kept_of(node), metas)]
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
    slot = _slot_of_dim(tuple(components), roots.dim(), dim)
    if slot is None:
        return
    c, n = components[slot], kept.numel()
    if isinstance(c, torch.Tensor):
        raise InternalError(f"tensor index on the channel dim of {node.format_node()}")
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
