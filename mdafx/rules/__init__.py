"""Channel rules: what each op does to channels, as data in a registry keyed on the op.

A rule answers three questions about one node, without keeping any state of its own:

* ``forward(ctx) -> ids``: the channel ids of the node's output, given its inputs' ids
  (``mdafx.channels``); it may couple (``forest.union``) or freeze channels, and raises
  ``Barrier(reason)`` when it cannot map the channels exactly.
* ``mask``: how a per-channel mask on the output maps back onto the inputs during locating:
  ``BY_ID`` (the input position that holds the same channel id), ``POSITIONAL`` (broadcasting
  operands of an element-wise op; ``back`` first reduces the output mask per operand, e.g. over
  the columns a matmul row feeds), ``WEIGHTED`` (a conv/linear: MDA's α/β rule, in
  passes/locate.py).
* ``prune(pctx)``: rewrite the node's module or constant arguments so the pruned graph computes
  exactly the kept channels. ``None`` when the op is shape-agnostic.
* ``merge(mctx)``: how the merged layout of alignment padding (MDA.md §2.2,
  ``mdafx.passes.align_padding``) builds this op from its copies in k isomorphic components:
  which merged node it emits and in which *layout* its output channels lie (a list of
  ``(component, channel)`` pairs, ``None`` for the shared input). ``None``: the op cannot be
  merged, and the merged layout refuses the graph naming the node.

Rules are registered with ``@channel_rule(key, ...)``; the key is the module class, the function
object of a ``call_function``, or the method name of a ``call_method``. A node with no rule is a
barrier. A module's rule is found along its class hierarchy (:func:`module_rule_class`): a
subclass of a registered class that does not override ``forward`` (nor a method the base's
forward calls, ``_conv_forward``) computes what the base computes, so it gets the base's rule; a
subclass that does override it, or an instance whose ``forward`` was rebound, gets none (fx
traces through such a module unless it is made a leaf, and then it is a barrier), never a guess.

Parameters: a rule reads a parameter's channels through ``ctx.param_dim(p, d)``, the ids of the
entries of ``p`` along dim ``d`` (the same ids wherever that tensor is used, so a shared weight
couples all its uses). ``p`` is a ``get_attr`` node (functional layers) or the tensor itself
(a module's parameter). ``passes/prune_channels.py`` slices every parameter along the dims whose
channels a plan drops (:func:`slice_parameter`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..channels import ChannelForest, couple_except

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
    # (get_attr node | parameter tensor, dim, like=None) -> 1-D ids of its entries along dim,
    # or None when the argument is not a parameter or buffer read by get_attr; ``like``: the ids
    # the caller will couple them with (adopted on first use instead of fresh ones)
    param_dim: Callable[..., torch.Tensor | None] = lambda p, d, like=None: None
    # records why the rule froze channels without being a barrier (shown by the report)
    note: Callable[[str], None] = lambda reason: None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def node_arg(self, i: int, name: str, default: Any = None) -> Any:
        """The fx argument (a Node or a literal) at position ``i`` or keyword ``name``."""
        if i < len(self.node.args):
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def resolve(self, ids: torch.Tensor, keep: int | tuple[int, ...] = ()) -> torch.Tensor:
        """``ids`` with every dim but ``keep`` made one unit (coupled): the channels left vary
        only along ``keep``. Coupling is always exact; it only makes plans coarser."""
        return couple_except(self.forest, ids, keep)



@dataclass
class PruneContext:
    """What a rule's prune sees: kept masks shaped like the ids of inputs and output."""

    node: fx.Node
    gm: fx.GraphModule
    module: torch.nn.Module | None
    kept_of: Callable[[Any], Any]  # fx argument -> bool tensor (or tuple) shaped like its ids
    roots_of: Callable[[Any], Any]
    base: type | None = None  # call_module: the registered class whose rule this is

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
class WeightedLayer:
    """A weighted channel-mixing layer as contributions and locating see it (MDA §1.2): a
    conv (``kernel_size`` set) or a linear, wherever it comes from (an ``nn.Conv2d`` module, an
    ``F.conv2d`` call on a parameter, ...). ``key`` names it in profiles: the module's path for
    a module, the node's name for a function."""

    key: str
    kind: str                      # "conv" | "linear"
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    module: nn.Module | None = None
    type_name: str = ""            # what the fingerprint records: class or function name


@dataclass(frozen=True)
class ChannelRule:
    name: str
    forward: Callable[[RuleContext], Any]
    mask: str = BY_ID
    prune: Callable[[PruneContext], None] | None = None
    merge: Callable[[MergeContext], None] | None = None
    out_axis: int | None = None    # weighted rules: the dim of their output channels
    # weighted rules: the layer a node computes, or None when it cannot be profiled (a
    # weight computed in the graph)
    layer: Callable[[fx.Node, fx.GraphModule], WeightedLayer | None] | None = None
    # POSITIONAL rules: (node, output mask [K, *ids]) -> [(argument, mask to broadcast onto it)]
    back: Callable[[fx.Node, torch.Tensor], list] | None = None


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
                 merge: Callable | None = None, name: str | None = None,
                 out_axis: int | None = None, layer: Callable | None = None,
                 back: Callable | None = None):
    """Register ``forward`` as the channel rule of every op in ``keys``."""

    def deco(forward: Callable[[RuleContext], Any]) -> Callable[[RuleContext], Any]:
        REGISTRY.register(keys, ChannelRule(name or forward.__name__, forward, mask, prune,
                                            merge, out_axis, layer, back))
        return forward

    return deco


# What a registered module class's forward calls on itself: a subclass defining one of these
# computes something else than the base.
_FORWARD_METHODS = frozenset({"forward", "_conv_forward", "__call__", "_call_impl"})


def module_rule_class(module: nn.Module) -> type | None:
    """The registered class whose rule describes ``module``: its own class or the nearest base
    along the MRO, provided no class on the way (nor the instance) redefines ``forward``."""
    if any(name in vars(module) for name in _FORWARD_METHODS):
        return None
    for cls in type(module).__mro__:
        if cls in REGISTRY.rules:
            return cls
        if any(name in vars(cls) for name in _FORWARD_METHODS):
            return None
    return None


def rule_key(node: fx.Node, gm: fx.GraphModule) -> Any:
    if node.op == "call_module":
        return module_rule_class(gm.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        return node.target
    return node.op


def lookup(node: fx.Node, gm: fx.GraphModule) -> ChannelRule | None:
    key = rule_key(node, gm)
    return REGISTRY.rules.get(key) if key is not None else None


def weighted_layer(node: fx.Node, gm: fx.GraphModule) -> WeightedLayer | None:
    """The weighted layer ``node`` computes (its rule's ``layer``), or None. A layer whose
    input does not depend on the model's input (Swin V2's position-bias MLP on a fixed table of
    coordinates) is None too: it sees no sample, so it has no class evidence to profile."""
    if node.op not in ("call_module", "call_function"):
        return None
    rule = lookup(node, gm)
    if rule is None or rule.layer is None or not reads_the_input(node):
        return None
    return rule.layer(node, gm)


def reads_the_input(node: fx.Node) -> bool:
    """Whether ``node`` reads the values of the model's input (a placeholder among its
    ancestors). Sizes read off a tensor (``x.shape``, ``x.size(2)``) carry no values: a tensor
    built from them alone (XCiT's Fourier position encoding of an ``H × W`` grid) does not."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        if n not in seen and not _reads_sizes_only(n):
            seen.add(n)
            stack.extend(a for a in n.all_input_nodes if a not in seen)
    return False


_SIZE_METHODS = frozenset({"size", "dim", "numel"})
_SIZE_ATTRS = frozenset({"shape", "dtype", "device", "ndim"})


def _reads_sizes_only(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _SIZE_METHODS
    return (n.op == "call_function" and n.target is getattr and len(n.args) > 1
            and n.args[1] in _SIZE_ATTRS)


def fetch(gm: fx.GraphModule, a: Any) -> Any:
    """The value a ``get_attr`` node reads (else ``a`` itself when it is no Node, else None)."""
    if not isinstance(a, fx.Node):
        return a
    if a.op != "get_attr":
        return None
    owner, _, attr = str(a.target).rpartition(".")
    try:
        return getattr(gm.get_submodule(owner) if owner else gm, attr)
    except AttributeError:
        return None


def describe_target(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        name = type(module).__name__
        if any(n in vars(module) for n in _FORWARD_METHODS):
            return f"{name} (forward rebound on the instance)"
        bases = [c for c in type(module).__mro__[1:] if c in REGISTRY.rules]
        return f"{name} (a {bases[0].__name__} overriding forward)" if bases else name
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def slice_parameter(t: torch.Tensor, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """``t`` restricted to ``kept[d]`` (bool over its entries) along each dim ``d``; a
    Parameter stays a Parameter (same ``requires_grad``)."""
    out = t.detach()
    for d, keep in sorted(kept.items()):
        if not bool(keep.all()):
            out = out.index_select(d, keep.nonzero().reshape(-1).to(out.device))
    if isinstance(t, nn.Parameter):
        return nn.Parameter(out.clone(), requires_grad=t.requires_grad)
    return out.clone()


# Importing the rule modules fills REGISTRY.
from . import attention, conv, elementwise, movement, norm, pad, pool  # noqa: E402,F401
