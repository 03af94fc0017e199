"""AlignPadding (transform, MDA.md §2.2): merge isomorphic branches into one wider network.

Input: an assembled graph in the parallel layout, whose logits are ``mdafx_branches =
cat([branch_0(x), ..., branch_{k-1}(x)], 1)`` with every branch a component read straight from
the shared input ``x``. Output: the same function computed by *one* network whose every layer
holds all k components' channels, with zero ("empty") kernels between components, and the
branches' nodes and modules gone.

Every merged tensor carries a *layout*: for each index p of its channel axis (dim 1), the pair
``(k, j)`` = "channel j of component k's tensor"; the shared input has none (every component reads
all of it). What each op does to layouts, and which merged node it emits, is the ``merge`` entry
of its channel rule (``mdafx.rules``): weighted layers read any layout and write the standard one
(component 0's channels, then component 1's, ...) with block weights placed by their input's
layout, so concats (inception, densenet) need no reordering (the reference code interleaves
components there and gets wrong outputs); batch norms permute their parameters; element-wise
ops of two tensors bring the second into the first's layout (``index_select`` nodes
``mdafx_pad_<n>``). The merged output is permuted into the concatenation's order, so every later
node (scaling, class merging) is untouched. An op without a merge entry, or branches that are
not isomorphic, raise PreconditionError naming the node: use the parallel layout there.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from mdafx.errors import PreconditionError
from mdafx.ir import shape_of
from mdafx.passmanager import AnalysisManager, Pass
from mdafx.rules import Layout, MergeContext, lookup
from mdafx.rules.movement import is_class_select

__all__ = ["AlignPadding", "BRANCHES"]

BRANCHES = "mdafx_branches"      # the concat of the branches' logits (mdafx.assembly names it)
MERGED = "merged"                # where the merged layers live in the module tree


def _branch_nodes(out: fx.Node, shared: fx.Node) -> list[fx.Node]:
    """Every node ``out`` depends on, up to the shared input, in graph order."""
    seen, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in seen or n is shared:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in out.graph.nodes if n in seen]


def _signature(gm: fx.GraphModule, nodes: list[fx.Node], shared: fx.Node) -> list[tuple]:
    position = {n: i for i, n in enumerate(nodes)}
    position[shared] = "input"
    sig = []
    for n in nodes:
        kind = type(gm.get_submodule(n.target)) if n.op == "call_module" else n.target
        refs = [position.get(a, "other") for a in n.all_input_nodes]
        sig.append((n.op, kind, len(n.args), tuple(refs)))
    return sig


class _Builder:
    """Builds the merged nodes before ``anchor``; ``env``/``layouts`` map column-0 node names
    to the merged value and its layout."""

    def __init__(self, gm: fx.GraphModule, shared: fx.Node, prefix: str) -> None:
        self.gm, self.graph, self.prefix = gm, gm.graph, prefix
        self.env: dict[str, Any] = {shared.name: shared}
        self.layouts: dict[str, Layout | None] = {shared.name: None}
        self.pads = 0

    def arg(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.env[n.name])

    def _record(self, n0: fx.Node, node: fx.Node, layout: Layout | None) -> None:
        self.env[n0.name], self.layouts[n0.name] = node, layout

    def emit_module(self, n0: fx.Node, module: torch.nn.Module, args: tuple,
                    layout: Layout | None) -> None:
        path = f"{MERGED}.{n0.target.removeprefix(self.prefix)}"
        self.gm.add_submodule(path, module)
        self._record(n0, self.graph.call_module(path, tuple(args)), layout)

    def emit(self, n0: fx.Node, args: tuple, kwargs: dict, layout: Layout | None) -> None:
        self._record(n0, self.graph.create_node(n0.op, n0.target, tuple(args), dict(kwargs)),
                     layout)

    def permute(self, value: fx.Node, layout: Layout, want: Layout) -> fx.Node:
        if layout == want:
            return value
        pos = {kj: p for p, kj in enumerate(layout)}
        name = f"mdafx_pad_{self.pads}"
        self.pads += 1
        self.gm.register_buffer(f"{name}_index", torch.tensor([pos[kj] for kj in want]))
        index = self.graph.get_attr(f"{name}_index")
        out = self.graph.call_function(torch.index_select, (value, 1, index))
        out.name = name
        return out


class AlignPadding(Pass):
    """The merged layout of MDA §2.2 (module docstring)."""

    name = "align-padding"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        cat = next((n for n in gm.graph.nodes if n.name == BRANCHES), None)
        if cat is None:
            raise PreconditionError(f"align-padding needs an assembled graph in the parallel "
                                    f"layout (a node named {BRANCHES})")
        shared = next(n for n in gm.graph.nodes if n.op == "placeholder")
        outs = list(cat.args[0])
        # a component's final class reordering is not merged: it becomes the merged output's
        # order (components of the same architecture may reorder or not)
        selects = [list(o.args[1][1]) if is_class_select(o) else None for o in outs]
        bodies = [o.args[0] if sel is not None else o for o, sel in zip(outs, selects)]
        branches = [_branch_nodes(out, shared) for out in bodies]
        reference = _signature(gm, branches[0], shared)
        for k, nodes in enumerate(branches[1:], 1):
            if _signature(gm, nodes, shared) != reference:
                raise PreconditionError(f"component {k} is not isomorphic to component 0 "
                                        "(different graphs); the merged layout needs the same "
                                        "architecture: use layout='parallel'")
        builder = _Builder(gm, shared, _prefix(branches[0]))
        with gm.graph.inserting_before(cat):
            for column in zip(*branches):
                self._merge(gm, builder, list(column))
            want = [(k, j) for k, (body, sel) in enumerate(zip(bodies, selects))
                    for j in (sel if sel is not None else range((shape_of(body) or (0, 0))[1]))]
            merged = builder.permute(builder.env[bodies[0].name],
                                     builder.layouts[bodies[0].name], want)
        cat.replace_all_uses_with(merged)
        gm.graph.erase_node(cat)
        for out, sel, nodes in zip(outs, selects, branches):
            for n in ([out] if sel is not None else []) + list(reversed(nodes)):
                gm.graph.erase_node(n)
        gm.delete_all_unused_submodules()
        return True

    @staticmethod
    def _merge(gm: fx.GraphModule, builder: _Builder, column: list[fx.Node]) -> None:
        n0 = column[0]
        if n0.op == "get_attr":
            raise PreconditionError(f"merged layout: constant {n0.format_node()} inside a "
                                    "component; use layout='parallel'")
        rule = lookup(n0, gm)
        if rule is None or rule.merge is None:
            raise PreconditionError(f"merged layout: no merge rule for {n0.format_node()}; "
                                    "use layout='parallel'")
        modules = [gm.get_submodule(n.target) if n.op == "call_module" else None
                   for n in column]
        rule.merge(MergeContext(column, modules, builder))


def _prefix(nodes: list[fx.Node]) -> str:
    """``branches.0.``: the module-path prefix of branch 0's layers."""
    for n in nodes:
        if n.op == "call_module":
            parts = n.target.split(".")
            return ".".join(parts[:2]) + "."
    return ""
