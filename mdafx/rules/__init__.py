"""Channel rules: what each op does to channels, as data in a registry keyed on the op.

A rule answers three questions about one node, without keeping any state of its own:

* ``forward(ctx) -> ids``: the channel ids of the node's output, given its inputs' ids
  (``mdafx.channels``); it may couple (``forest.union``) or freeze channels, and raises
  ``Barrier(reason)`` when it cannot map the channels exactly.
* ``mask``: how a per-channel mask on the output maps back onto the inputs during locating:
  ``BY_ID`` (the input position that holds the same channel id), ``POSITIONAL`` (broadcasting
  operands of an element-wise op), ``WEIGHTED`` (a conv/linear: MDA's α/β rule, in passes/locate.py).
* ``prune(pctx)``: rewrite the node's module or constant arguments so the pruned graph computes
  exactly the kept channels. ``None`` when the op is shape-agnostic.
* ``merge(mctx)``: how the merged layout of alignment padding (MDA.md §2.2,
  ``mdafx.passes.align_padding``) builds this op from its copies in k isomorphic components:
  which merged node it emits and in which *layout* its output channels lie (a list of
  ``(component, channel)`` pairs, ``None`` for the shared input). ``None``: the op cannot be
  merged, and the merged layout refuses the graph naming the node.

Rules are registered with ``@channel_rule(key, ...)``; the key is the module class (exact type,
never a subclass: a subclass may override ``forward``), the function object of a
``call_function``, or the method name of a ``call_method``. A node with no rule is a barrier.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..channels import ChannelForest

BY_ID, POSITIONAL, WEIGHTED, KEEP_ALL = "by-id", "positional", "weighted", "keep-all"


class Barrier(Exception):
    """Raised by a rule's forward when it cannot map this node's channels exactly."""


@dataclass
class RuleContext:
    """What a rule's forward sees: the node, its module, real argument values and input ids."""

    node: fx.Node
    module: torch.nn.Module | None
    args: tuple
    kwargs: dict
    out: Any
    forest: ChannelForest
    ids_of: Callable[[Any], Any]  # fx argument (Node or literal) -> ids (None for non-tensors)
    value_of: Callable[[Any], Any]  # fx argument -> its real value in the example run

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)



@dataclass
class PruneContext:
    """What a rule's prune sees: kept masks shaped like the ids of inputs and output."""

    node: fx.Node
    gm: fx.GraphModule
    module: torch.nn.Module | None
    kept_of: Callable[[Any], Any]  # fx argument -> bool tensor (or tuple) shaped like its ids
    roots_of: Callable[[Any], Any]

    def replace_module(self, new: torch.nn.Module) -> None:
        owner, _, name = self.node.target.rpartition(".")
        setattr(self.gm.get_submodule(owner) if owner else self.gm, name, new)


Layout = list  # [(component, channel), ...] along dim 1, or None for the shared input


@dataclass
class MergeContext:
    """What a rule's merge sees: one *column* of nodes (component k's copy of the op in
    ``column[k]``, their modules in ``modules``) and the builder of the merged graph, whose
    ``arg``/``layout`` give the merged value and layout of any argument of ``column[0]``."""

    column: list[fx.Node]
    modules: list[torch.nn.Module | None]
    builder: Any  # mdafx.passes.align_padding._Builder

    @property
    def node(self) -> fx.Node:
        return self.column[0]

    def arg(self, a: Any) -> Any:
        return self.builder.arg(a)

    def layout(self, a: fx.Node) -> Layout | None:
        return self.builder.layouts[a.name]

    def emit_module(self, module: torch.nn.Module, args: tuple, layout: Layout | None) -> None:
        self.builder.emit_module(self.node, module, args, layout)

    def emit(self, args: tuple, kwargs: dict, layout: Layout | None) -> None:
        """The same function or method as ``column[0]`` on merged arguments."""
        self.builder.emit(self.node, args, kwargs, layout)

    def permute(self, value: fx.Node, layout: Layout, want: Layout) -> fx.Node:
        return self.builder.permute(value, layout, want)

    def standard(self, sizes: list[int]) -> Layout:
        """Component 0's channels, then component 1's, ...: the layout of a merged layer's
        output."""
        return [(k, j) for k, n in enumerate(sizes) for j in range(n)]

    def sizes(self, layout: Layout) -> list[int]:
        """How many channels of each component ``layout`` holds."""
        counts = [0] * len(self.column)
        for k, _ in layout:
            counts[k] += 1
        return counts


def merge_same(m: MergeContext) -> None:
    """Channel-preserving ops (activations, pooling, dropout, reductions over other dims): the
    same op on the merged tensor; the layout of its (first) tensor input passes through."""
    first = next(a for a in m.node.all_input_nodes)
    layout = m.layout(first)
    if m.node.op == "call_module":
        m.emit_module(m.modules[0], m.arg(m.node.args), layout)
    else:
        m.emit(m.arg(m.node.args), m.arg(m.node.kwargs), layout)


@dataclass(frozen=True)
class ChannelRule:
    name: str
    forward: Callable[[RuleContext], Any]
    mask: str = BY_ID
    prune: Callable[[PruneContext], None] | None = None
    merge: Callable[[MergeContext], None] | None = None


@dataclass
class _Registry:
    rules: dict[Any, ChannelRule] = field(default_factory=dict)

    def register(self, keys: tuple, rule: ChannelRule) -> None:
        for key in dict.fromkeys(keys):  # F.relu_ is torch.relu_: aliases may repeat
            if key in self.rules:
                raise ValueError(f"two channel rules for {key!r}: {self.rules[key].name} and {rule.name}")
            self.rules[key] = rule


REGISTRY = _Registry()


def channel_rule(*keys: Any, mask: str = BY_ID, prune: Callable | None = None,
                 merge: Callable | None = None, name: str | None = None):
    """Register ``forward`` as the channel rule of every op in ``keys``."""

    def deco(forward: Callable[[RuleContext], Any]) -> Callable[[RuleContext], Any]:
        REGISTRY.register(keys, ChannelRule(name or forward.__name__, forward, mask, prune,
                                            merge))
        return forward

    return deco


def rule_key(node: fx.Node, gm: fx.GraphModule) -> Any:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        return node.target
    return node.op


def lookup(node: fx.Node, gm: fx.GraphModule) -> ChannelRule | None:
    return REGISTRY.rules.get(rule_key(node, gm))


def describe_target(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


# Importing the rule modules fills REGISTRY.
from . import conv, elementwise, movement, norm, pool  # noqa: E402,F401
