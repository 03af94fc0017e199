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


@dataclass(frozen=True)
class ChannelRule:
    name: str
    forward: Callable[[RuleContext], Any]
    mask: str = BY_ID
    prune: Callable[[PruneContext], None] | None = None


@dataclass
class _Registry:
    rules: dict[Any, ChannelRule] = field(default_factory=dict)

    def register(self, keys: tuple, rule: ChannelRule) -> None:
        for key in dict.fromkeys(keys):  # F.relu_ is torch.relu_: aliases may repeat
            if key in self.rules:
                raise ValueError(f"two channel rules for {key!r}: {self.rules[key].name} and {rule.name}")
            self.rules[key] = rule


REGISTRY = _Registry()


def channel_rule(*keys: Any, mask: str = BY_ID, prune: Callable | None = None, name: str | None = None):
    """Register ``forward`` as the channel rule of every op in ``keys``."""

    def deco(forward: Callable[[RuleContext], Any]) -> Callable[[RuleContext], Any]:
        REGISTRY.register(keys, ChannelRule(name or forward.__name__, forward, mask, prune))
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
