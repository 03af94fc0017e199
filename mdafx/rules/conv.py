"""Weighted channel-mixing layers: Conv1d/Conv2d (any groups) and Linear, as modules and as
``F.conv1d``/``F.conv2d``/``F.linear`` calls.

A conv with ``groups = g`` computes output channel ``o`` of group ``j = o // (O/g)`` from the
input channels ``j·I/g … (j+1)·I/g − 1`` only. Its output channels are the rows of W: their ids
are the ids of W's entries along dim 0 (``ctx.param_dim``), and the input channels are coupled
with W's columns, so a weight used at several call sites (a module called twice, one parameter
read by two ``F.conv2d``) keeps or drops the same rows and columns at every use.

* ``g = 1``: input and output channels are independent: any input column or output row of W can
  go (``W' = W[keep_out][:, keep_in]``).
* ``g > 1`` (grouped, depthwise as the case I/g = O/g = 1): a group's input and output channels
  are coupled into one set, so pruning drops whole groups and the layer stays a valid grouped
  conv with ``g'`` = number of kept groups (``W' = W[keep_out]``; I/g is unchanged).

Linear mixes the last dim: ``y[..., o] = Σ_i W[o, i] x[..., i] + b[o]``; ``W' = W[keep_out][:, keep_in]``.
Its input may be a flattened C×H×W tensor: the flatten rule has already told which channel each
feature belongs to, so input features are kept per feature.

Both require that each channel sit on one index of the mixed axis: an input whose channels
vary over other dims too is coupled over them first. A weight computed in the graph (a
standardised conv: ``F.batch_norm`` over the reshaped weight) keeps the rows its own ids allow
and every input channel (its columns cannot be sliced). The functional forms need no rewrite
beyond ``groups``: PruneChannels slices the parameters their ``get_attr`` nodes read.

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
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import (BY_ID, WEIGHTED, Barrier, Layout, MergeContext, PruneContext, RuleContext, WeightedLayer,
               channel_rule, fetch)
from ..channels import along
from ..errors import PreconditionError


def _weighted_ids(ctx: RuleContext, x_arg, weight_arg, bias_arg, groups: int, axis: int):
    """Ids of a conv (``axis`` 1) or linear (``axis`` -1) output; the weight is a parameter
    (``param_dim`` gives its rows and columns) or a tensor computed in the graph."""
    x_ids = ctx.ids_of(x_arg)
    weight = ctx.value_of(weight_arg)
    if x_ids is None or not isinstance(weight, torch.Tensor):
        raise Barrier("weighted layer without a tensor input and weight")
    if axis == 1 and x_ids.dim() < 3:
        raise Barrier("conv input is not a batched N×C×... tensor")
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    # each input channel must sit on one index of the mixed axis: couple it over the others
    profile = along(ctx.resolve(x_ids, axis), axis, in_per_group * groups)
    rows = ctx.param_dim(weight_arg, 0)
    cols = ctx.param_dim(weight_arg, 1, like=profile if groups == 1 else
                         torch.zeros(in_per_group, dtype=torch.int64))
    if rows is None:  # a weight computed in the graph: its rows follow its own ids
        w_ids = ctx.ids_of(weight_arg)
        rows = along(ctx.resolve(w_ids, 0), 0, out_ch) if w_ids is not None else None
        if rows is None:
            raise Barrier("weight is not a tensor of the graph")
        ctx.forest.freeze(profile)  # its columns cannot be sliced: keep every input channel
        ctx.note("weight computed in the graph (e.g. standardised): its input channels are kept")
    elif groups == 1:
        ctx.forest.union(profile, cols)
    if groups > 1:
        if cols is not None:
            ctx.forest.freeze(cols)  # the in-group index: never sliced
        in_g, out_g = profile.reshape(groups, -1), rows.reshape(groups, -1)
        for j in range(1, in_g.shape[1]):
            ctx.forest.union(in_g[:, 0], in_g[:, j])
        ctx.forest.union(in_g[:, :1], out_g)
    if bias_arg is not None:
        bias = ctx.param_dim(bias_arg, 0, like=rows)
        if bias is None:
            b_ids = ctx.ids_of(bias_arg)
            bias = along(ctx.resolve(b_ids, 0), 0, out_ch) if b_ids is not None else None
        if bias is not None:
            ctx.forest.union(bias, rows)
    shape = [1] * x_ids.dim()
    shape[axis] = out_ch
    return rows.reshape(shape)


def conv_ids(ctx: RuleContext):
    conv = ctx.module
    return _weighted_ids(ctx, ctx.node.args[0], conv.weight, conv.bias, conv.groups, 1)


def _module_pruned(p: PruneContext, keep_in: torch.Tensor, keep_out: torch.Tensor) -> bool:
    """Nothing to drop and already of the registered class: leave the module alone."""
    return bool(keep_in.all()) and bool(keep_out.all()) and type(p.module) is (p.base or
                                                                             type(p.module))


def _install(p: PruneContext, layer: nn.Module, new: nn.Module, weight: torch.Tensor,
             keep_out: torch.Tensor) -> None:
    """Give the smaller layer ``new`` the kept ``weight`` and bias entries of ``layer`` (a
    conv, transposed conv or linear) and its training mode, and put it in ``layer``'s place."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias[keep_out])
    new.train(layer.training)
    p.replace_module(new)


def prune_conv(p: PruneContext) -> None:
    conv = p.module
    keep_in = along(p.kept_of(p.node.args[0]), 1, conv.in_channels)
    keep_out = along(p.kept_of(p.node), 1, conv.out_channels)
    if _module_pruned(p, keep_in, keep_out):
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
    cls = p.base or type(conv)
    new = cls(in_channels, weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
              conv.dilation, groups, conv.bias is not None, conv.padding_mode,
              device=weight.device, dtype=weight.dtype)
    _install(p, conv, new, weight, keep_out)


def conv_layer(node: fx.Node, gm: fx.GraphModule) -> WeightedLayer | None:
    conv = gm.get_submodule(node.target)
    if not isinstance(conv, nn.Conv2d):
        return None  # contributions (box sums) are defined for 2-D convs
    return WeightedLayer(str(node.target), "conv", conv.weight, conv.bias, tuple(conv.kernel_size),
                         tuple(conv.stride), conv.padding if isinstance(conv.padding, str)
                         else tuple(conv.padding), tuple(conv.dilation), conv.groups,
                         conv.padding_mode, conv, type(conv).__name__)


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


channel_rule(nn.Conv1d, nn.Conv2d, mask=WEIGHTED, prune=prune_conv, merge=merge_conv,
             name="conv_rule", out_axis=1, layer=conv_layer)(conv_ids)


def conv_transpose_ids(ctx: RuleContext):
    """``ConvTranspose2d``: weight ``[I, O/g, kh, kw]``, its rows are the input channels and its
    columns the output channels (groups = 1; grouped transposed convs are a barrier)."""
    conv = ctx.module
    if conv.groups != 1:
        raise Barrier("grouped transposed conv")
    x_ids = ctx.ids_of(ctx.node.args[0])
    if x_ids is None or x_ids.dim() < 3:
        raise Barrier("transposed conv input is not a batched N×C×... tensor")
    profile = along(ctx.resolve(x_ids, 1), 1, conv.in_channels)
    cols = ctx.param_dim(conv.weight, 1)
    ctx.forest.union(profile, ctx.param_dim(conv.weight, 0, like=profile))
    if conv.bias is not None:
        ctx.forest.union(cols, ctx.param_dim(conv.bias, 0, like=cols))
    return cols.reshape([1, -1] + [1] * (x_ids.dim() - 2))


def prune_conv_transpose(p: PruneContext) -> None:
    conv = p.module
    keep_in = along(p.kept_of(p.node.args[0]), 1, conv.in_channels)
    keep_out = along(p.kept_of(p.node), 1, conv.out_channels)
    if _module_pruned(p, keep_in, keep_out):
        return
    weight = conv.weight[keep_in][:, keep_out]
    cls = p.base or type(conv)
    new = cls(weight.shape[0], weight.shape[1], conv.kernel_size, conv.stride, conv.padding,
              conv.output_padding, 1, conv.bias is not None, conv.dilation, conv.padding_mode,
              device=weight.device, dtype=weight.dtype)
    _install(p, conv, new, weight, keep_out)


channel_rule(nn.ConvTranspose2d, mask=BY_ID, prune=prune_conv_transpose,
             name="conv_transpose_rule", out_axis=1)(conv_transpose_ids)


def linear_ids(ctx: RuleContext):
    lin = ctx.module
    return _weighted_ids(ctx, ctx.node.args[0], lin.weight, lin.bias, 1, -1)


def prune_linear(p: PruneContext) -> None:
    lin: nn.Linear = p.module
    keep_in = along(p.kept_of(p.node.args[0]), -1, lin.in_features)
    keep_out = along(p.kept_of(p.node), -1, lin.out_features)
    if _module_pruned(p, keep_in, keep_out):
        return
    weight = lin.weight[keep_out][:, keep_in]
    new = nn.Linear(weight.shape[1], weight.shape[0], lin.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    _install(p, lin, new, weight, keep_out)


def linear_layer(node: fx.Node, gm: fx.GraphModule) -> WeightedLayer | None:
    lin = gm.get_submodule(node.target)
    return WeightedLayer(str(node.target), "linear", lin.weight, lin.bias, module=lin,
                         type_name=type(lin).__name__)


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
             name="linear_rule", out_axis=-1, layer=linear_layer)(linear_ids)


# ----------------------------------------------------------------------------- functional forms
# F.conv2d(x, weight, bias, stride, padding, dilation, groups) and F.linear(x, weight, bias) on
# parameters read by get_attr nodes: the same channel maps as the modules; pruning slices the
# parameters themselves (passes/prune_channels.py) and rewrites ``groups``.

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def conv_function_ids(ctx: RuleContext):
    groups = ctx.arg(6, "groups", 1)
    if not isinstance(groups, int):
        raise Barrier("conv groups computed in the graph")
    return _weighted_ids(ctx, ctx.node_arg(0, "input"), ctx.node_arg(1, "weight"),
                         ctx.node_arg(2, "bias"), groups, 1)


def prune_conv_function(p: PruneContext) -> None:
    node = p.node
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if not isinstance(groups, int) or groups == 1:
        return
    keep_out = along(p.kept_of(node), 1)
    if keep_out.numel() == 1:
        return
    kept_groups = int(keep_out.reshape(groups, -1).any(1).sum())
    if len(node.args) > 6:
        node.args = (*node.args[:6], kept_groups, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": kept_groups}


def _pair(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_function_layer(node: fx.Node, gm: fx.GraphModule) -> WeightedLayer | None:
    get = lambda i, name, default=None: (node.args[i] if len(node.args) > i  # noqa: E731
                                         else node.kwargs.get(name, default))
    weight, bias = fetch(gm, get(1, "weight")), fetch(gm, get(2, "bias"))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or (
            get(2, "bias") is not None and not isinstance(bias, torch.Tensor)):
        return None  # a weight computed in the graph, or not a 2-D conv: not profiled
    stride, padding, dilation, groups = (get(3, "stride", 1), get(4, "padding", 0),
                                         get(5, "dilation", 1), get(6, "groups", 1))
    if any(isinstance(v, fx.Node) for v in (stride, padding, dilation, groups)):
        return None
    return WeightedLayer(node.name, "conv", weight, bias, tuple(weight.shape[2:]),
                         _pair(stride, 2), padding if isinstance(padding, str)
                         else _pair(padding, 2), _pair(dilation, 2), int(groups), "zeros",
                         None, "conv2d")


def linear_function_ids(ctx: RuleContext):
    return _weighted_ids(ctx, ctx.node_arg(0, "input"), ctx.node_arg(1, "weight"),
                         ctx.node_arg(2, "bias"), 1, -1)


def linear_function_layer(node: fx.Node, gm: fx.GraphModule) -> WeightedLayer | None:
    w_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    weight, bias = fetch(gm, w_arg), fetch(gm, b_arg)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or (
            b_arg is not None and not isinstance(bias, torch.Tensor)):
        return None
    return WeightedLayer(node.name, "linear", weight, bias, type_name="linear")


channel_rule(F.conv1d, F.conv2d, mask=WEIGHTED, prune=prune_conv_function,
             name="conv_function_rule", out_axis=1, layer=conv_function_layer)(conv_function_ids)
channel_rule(F.linear, mask=WEIGHTED, name="linear_function_rule", out_axis=-1,
             layer=linear_function_layer)(linear_function_ids)
