"""Alignment padding (MDA.md §2.2): merge isomorphic components into one wider network.

Every merged tensor carries a *layout*: for each index p of its channel axis (dim 1), the pair
(k, j) = "channel j of component k's tensor". The shared input has no layout (every component
reads all of it). Weighted layers read any layout and write the standard one (component 0's
channels, then component 1's, ...):

    W[(k, o), p] = W_k[o, j]   if layout(p) = (k, j)         (zero — "empty" kernels — otherwise)

i.e. the block-diagonal ``[[W1, 0], [0, W2]]`` of the paper when the input layout is standard,
and ``W[(k, o), :] = W_k[o, :]`` (stacked filters) on the shared input. Because each weight column
is placed by the layout of its input, a concat of merged tensors (inception, densenet) needs no
reordering: cat([a, b]) has layout (a's, then b's) — interleaved per component, which the
reference code mistakes for contiguous. Per-channel layers (BatchNorm) permute their parameters
by the layout; element-wise ops of two tensors first bring the second into the first's layout
(an index_select node ``mdafx_pad_<n>``); flatten maps (k, j) to features (k, j·HW + s). Grouped
convs need the standard layout (inserted when needed) and stack their groups.

Ops outside this list raise PreconditionError naming the node: use the parallel layout there.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from mdafx.errors import PreconditionError
from mdafx.rules.elementwise import NARY, UNARY_FUNCTIONS, UNARY_METHODS, UNARY_MODULES
from mdafx.rules.pool import POOL_FUNCTIONS, POOL_MODULES

Layout = list  # list[tuple[int, int]] or None (shared)


def _signature(gm: fx.GraphModule) -> list:
    sig = []
    for n in gm.graph.nodes:
        kind = type(gm.get_submodule(n.target)) if n.op == "call_module" else n.target
        sig.append((n.op, kind if n.op != "get_attr" else "get_attr", len(n.args)))
    return sig


def merge_components(modules: list[fx.GraphModule], scales: list[torch.Tensor],
                     groups: list[list[int]]) -> fx.GraphModule:
    """One GraphModule computing ``cat_k(module_k(x) * scales[k])`` (then merge-by-max of
    ``groups``) as a single layer-wise wider network."""
    stripped = [_strip_select(m) for m in modules]
    modules, selects = [m for m, _ in stripped], [sel for _, sel in stripped]
    sig = _signature(modules[0])
    for k, m in enumerate(modules[1:], 1):
        if _signature(m) != sig:
            raise PreconditionError(f"component {k} is not isomorphic to component 0 (different "
                                    "graphs); the merged layout needs the same architecture — "
                                    "use layout='parallel'")
    return _Merger(modules).build(scales, groups, selects)


def _strip_select(gm: fx.GraphModule):
    """A copy of ``gm`` without its final class-reordering getitem, and that getitem's index."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last = out.args[0]
    if not (isinstance(last, fx.Node) and last.target is operator.getitem and _is_class_select(last)):
        return gm, None
    copy_gm = fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    out = next(n for n in copy_gm.graph.nodes if n.op == "output")
    sel = out.args[0]
    index = list(sel.args[1][1])
    out.args = (sel.args[0],)
    copy_gm.graph.erase_node(sel)
    copy_gm.recompile()
    return copy_gm, index


class _Merger:
    def __init__(self, modules: list[fx.GraphModule]) -> None:
        self.mods = modules
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, fx.Node] = {}
        self.layout: dict[str, Layout] = {}
        self.pads = 0

    # --------------------------------------------------------------- helpers
    def _add_module(self, name: str, module: nn.Module) -> str:
        path = name.replace(".", "_")
        self.root.add_module(path, module)
        return path

    def _standard(self, sizes: list[int]) -> Layout:
        return [(k, j) for k, n in enumerate(sizes) for j in range(n)]

    def _permute(self, node: fx.Node, layout: Layout, want: Layout) -> fx.Node:
        if layout == want:
            return node
        pos = {kj: p for p, kj in enumerate(layout)}
        index = torch.tensor([pos[kj] for kj in want])
        name = f"mdafx_pad_{self.pads}"
        self.pads += 1
        self.root.register_buffer(name + "_index", index)
        idx = self.graph.get_attr(name + "_index")
        out = self.graph.call_function(torch.index_select, (node, 1, idx))
        out.name = name
        return out

    def _sizes(self, layout: Layout) -> list[int]:
        sizes = [0] * len(self.mods)
        for k, _ in layout:
            sizes[k] += 1
        return sizes

    # --------------------------------------------------------------- build
    def build(self, scales, groups, selects) -> fx.GraphModule:
        self.selects = selects
        nodes = [list(m.graph.nodes) for m in self.mods]
        for column in zip(*nodes):
            n0 = column[0]
            if n0.op == "placeholder":
                self.env[n0.name] = self.graph.placeholder(n0.name)
                self.layout[n0.name] = None
            elif n0.op == "output":
                self._output(column, scales, groups)
            elif n0.op == "call_module":
                self._module(column)
            elif n0.op in ("call_function", "call_method"):
                self._function(column)
            else:
                raise PreconditionError(f"merged layout: unsupported node {n0.format_node()}")
        gm = fx.GraphModule(self.root, self.graph, "Merged")
        gm.graph.lint()
        return gm.eval()

    def _arg(self, a):
        return fx.node.map_arg(a, lambda n: self.env[n.name])

    def _module(self, column) -> None:
        n0 = column[0]
        mods = [m.get_submodule(n.target) for m, n in zip(self.mods, column)]
        src = n0.args[0]
        layout = self.layout[src.name]
        x = self.env[src.name]
        m0 = mods[0]
        if isinstance(m0, nn.Conv2d):
            merged, x, out_layout = self._conv(mods, x, layout, n0)
        elif isinstance(m0, nn.Linear):
            merged, out_layout = self._linear(mods, layout), self._standard([m.out_features for m in mods])
        elif isinstance(m0, (nn.BatchNorm1d, nn.BatchNorm2d)):
            merged, out_layout = self._batchnorm(mods, layout, n0), layout
        elif isinstance(m0, UNARY_MODULES + POOL_MODULES + (nn.Flatten,)):
            merged, out_layout = m0, layout
            if isinstance(m0, nn.Flatten):
                out_layout = self._flatten_layout(layout, n0)
        else:
            raise PreconditionError(f"merged layout: no rule for {type(m0).__name__} at "
                                    f"{n0.format_node()}; use layout='parallel'")
        path = self._add_module(n0.target, merged)
        self.env[n0.name] = self.graph.call_module(path, (x,) + tuple(self._arg(n0.args[1:])))
        self.layout[n0.name] = out_layout

    def _conv(self, convs, x, layout, n0):
        c0 = convs[0]
        for c in convs[1:]:
            if (c.kernel_size, c.stride, c.padding, c.dilation, c.padding_mode) != (
                    c0.kernel_size, c0.stride, c0.padding, c0.dilation, c0.padding_mode):
                raise PreconditionError(f"merged layout: convs differ at {n0.format_node()}")
        outs = [c.out_channels for c in convs]
        out_layout = self._standard(outs)
        bias = any(c.bias is not None for c in convs)
        g = [c.groups for c in convs]
        if max(g) > 1:
            if layout is None or {c.weight.shape[1] for c in convs} != {c0.weight.shape[1]}:
                raise PreconditionError(f"merged layout: grouped conv {n0.format_node()} needs "
                                        "equal group widths and a per-component input")
            x = self._permute(x, layout, self._standard(self._sizes(layout)))
            weight = torch.cat([c.weight for c in convs], 0)
            in_ch, groups = sum(c.in_channels for c in convs), sum(g)
        else:
            in_ch = c0.in_channels if layout is None else len(layout)
            weight, groups = _block_weight([c.weight for c in convs], layout, in_ch), 1
        merged = nn.Conv2d(in_ch, sum(outs), c0.kernel_size, c0.stride, c0.padding, c0.dilation,
                           groups, bias, c0.padding_mode)
        with torch.no_grad():
            merged.weight.copy_(weight)
            if bias:
                merged.bias.copy_(torch.cat([c.bias if c.bias is not None else
                                             torch.zeros(c.out_channels) for c in convs]))
        return merged, x, out_layout

    def _linear(self, lins, layout):
        outs = [m.out_features for m in lins]
        in_f = lins[0].in_features if layout is None else len(layout)
        weight = _block_weight([m.weight for m in lins], layout, in_f)
        bias = any(m.bias is not None for m in lins)
        merged = nn.Linear(in_f, sum(outs), bias)
        with torch.no_grad():
            merged.weight.copy_(weight)
            if bias:
                merged.bias.copy_(torch.cat([m.bias if m.bias is not None else
                                             torch.zeros(m.out_features) for m in lins]))
        return merged

    def _batchnorm(self, bns, layout, n0):
        if layout is None:
            raise PreconditionError(f"merged layout: BatchNorm on the shared input {n0.format_node()}")
        merged = type(bns[0])(len(layout), eps=bns[0].eps, momentum=bns[0].momentum)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(merged, name).copy_(torch.stack([getattr(bns[k], name)[j] for k, j in layout]))
        return merged.eval()

    def _flatten_layout(self, layout, n0):
        shape = n0.args[0].meta.get("tensor_meta")
        if layout is None:
            return None
        hw = 1
        for s in (tuple(shape.shape)[2:] if shape is not None else ()):
            hw *= s
        return [(k, j * hw + s) for k, j in layout for s in range(hw)]

    def _function(self, column) -> None:
        n0 = column[0]
        t = n0.target
        ins = [a for a in n0.all_input_nodes]
        layouts = [self.layout[a.name] for a in ins]
        if t in UNARY_FUNCTIONS or t in UNARY_METHODS or t in POOL_FUNCTIONS or (
                t in (torch.mean, "mean") and _dims(n0) == (2, 3)):
            out_layout = layouts[0]
            args = self._arg(n0.args)
        elif t in NARY:
            tensors = [a for a in n0.args[:2] if isinstance(a, fx.Node)]
            base = self.layout[tensors[0].name]
            args = list(self._arg(n0.args))
            for i, a in enumerate(n0.args[:2]):
                if isinstance(a, fx.Node) and self.layout[a.name] != base:
                    if base is None or self.layout[a.name] is None:
                        raise PreconditionError(f"merged layout: {n0.format_node()} mixes the "
                                                "shared input with a component tensor")
                    args[i] = self._permute(args[i], self.layout[a.name], base)
            args, out_layout = tuple(args), base
        elif t in (torch.cat, torch.concat) and _cat_dim(n0) == 1:
            if any(lay is None for lay in layouts):
                raise PreconditionError(f"merged layout: concat with the shared input {n0.format_node()}")
            # channel j of component k's input i sits after k's channels of inputs 0..i-1
            offset, out_layout = [0] * len(self.mods), []
            for lay in (self.layout[a.name] for a in n0.args[0]):
                out_layout += [(k, j + offset[k]) for k, j in lay]
                offset = [o + s for o, s in zip(offset, self._sizes(lay))]
            args = self._arg(n0.args)
        elif t in (torch.flatten, "flatten") and _flatten_start(n0) == 1:
            out_layout = self._flatten_layout(layouts[0], n0)
            args = self._arg(n0.args)
        elif t is operator.getitem and _is_class_select(n0):
            self._select(column)
            return
        else:
            raise PreconditionError(f"merged layout: no rule for {n0.format_node()}; use "
                                    "layout='parallel'")
        kind = self.graph.call_method if n0.op == "call_method" else self.graph.call_function
        self.env[n0.name] = kind(t, tuple(args), self._arg(n0.kwargs))
        self.layout[n0.name] = out_layout

    def _select(self, column) -> None:
        n0 = column[0]
        layout = self.layout[n0.args[0].name]
        pos = {kj: p for p, kj in enumerate(layout)}
        index, out_layout = [], []
        for k, n in enumerate(column):
            for j_new, j in enumerate(n.args[1][1]):
                index.append(pos[(k, j)])
                out_layout.append((k, j_new))
        x = self.env[n0.args[0].name]
        self.env[n0.name] = self.graph.call_function(operator.getitem, (x, (slice(None), index)))
        self.layout[n0.name] = out_layout

    def _output(self, column, scales, groups) -> None:
        n0 = column[0]
        src = n0.args[0]
        want = [(k, j) for k, s in enumerate(scales)
                for j in (self.selects[k] if self.selects[k] is not None else range(len(s)))]
        x = self._permute(self.env[src.name], self.layout[src.name], want)
        self.root.register_buffer("mdafx_scale_0_factors", torch.cat(scales).reshape(1, -1))
        factors = self.graph.get_attr("mdafx_scale_0_factors")
        x = self.graph.call_function(torch.mul, (x, factors))
        x.name = "mdafx_scale_0"
        if any(len(g) > 1 for g in groups):
            cols = []
            for g in groups:
                if len(g) == 1:
                    cols.append(self.graph.call_function(operator.getitem, (x, (slice(None), slice(g[0], g[0] + 1)))))
                else:
                    sel = self.graph.call_function(operator.getitem, (x, (slice(None), list(g))))
                    cols.append(self.graph.call_method("amax", (sel, 1), {"keepdim": True}))
            x = self.graph.call_function(torch.cat, (cols, 1))
        self.graph.output(x)


def _block_weight(weights: list[torch.Tensor], layout: Layout, in_width: int) -> torch.Tensor:
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


def _dims(n):
    d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return tuple(d) if isinstance(d, (tuple, list)) else (d,)


def _cat_dim(n):
    return n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)


def _flatten_start(n):
    return n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)


def _is_class_select(n):
    idx = n.args[1]
    return (isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None)
            and isinstance(idx[1], list))
