"""ChannelGroups (analysis): the channel ids of every tensor and the coupled groups they form.

It runs the model once on the example input (fx Interpreter) and, node by node, asks the node's
channel rule (``mdafx.rules``) for the ids of its output. The result (``ChannelGraph``) holds the
ids, the rule that mapped each node and the reason of each barrier; the graph is not changed and
nothing is written into ``node.meta``.

Invariants of the result:

* every tensor-valued node has ids with its tensor's rank, each dim of size 1 or the real size;
* a channel whose root is ``FROZEN`` is kept by every plan (model inputs, barriers, norms over
  channels, parameters used as tensors);
* a node without a rule is a barrier: every channel of every tensor it reads or writes is frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from mdafx.channels import FROZEN, ChannelForest, varying_dims
from mdafx.errors import UnsupportedOpError
from mdafx.ir import example_input
from mdafx.passmanager import Analysis, AnalysisManager
from mdafx.rules import Barrier, RuleContext, describe_target, lookup

SHAPE_QUERIES = {"size", "dim", "numel"}
SHAPE_ATTRS = {"shape", "dtype", "device", "ndim"}


@dataclass
class ChannelGraph:
    """The result of ChannelGroups for one GraphModule."""

    forest: ChannelForest
    ids: dict[str, Any]                      # node name -> ids (tensor, tuple of them, or None)
    barriers: dict[str, str] = field(default_factory=dict)   # node name -> reason
    rules: dict[str, str] = field(default_factory=dict)      # node name -> rule that mapped it
    output: str = ""                         # name of the node whose value is the model output
    output_width: int | None = None          # size of the output's last dim (the logits)

    def roots(self, name: str):
        return _map_ids(self.ids[name], self.forest.find)

    def tensor_nodes(self) -> list[str]:
        return [n for n, v in self.ids.items() if isinstance(v, torch.Tensor)]

    def prunable_roots(self) -> torch.Tensor:
        """Sorted distinct roots that are not frozen (the groups a plan can decide on)."""
        all_roots = [self.forest.find(v).reshape(-1) for v in self.ids.values() if isinstance(v, torch.Tensor)]
        if not all_roots:
            return torch.zeros(0, dtype=torch.int64)
        roots = torch.unique(torch.cat(all_roots))
        return roots[roots != FROZEN]

    def channel_dim(self, name: str) -> int | None:
        """The one dim of the node's output along which channels can be dropped, if any."""
        dims = varying_dims(self.roots(name))
        return dims[-1] if dims else None


def _map_ids(ids, fn):
    if ids is None:
        return None
    if isinstance(ids, torch.Tensor):
        return fn(ids)
    return tuple(_map_ids(i, fn) for i in ids)


class _IdInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, strict: bool) -> None:
        super().__init__(gm)
        self.forest = ChannelForest()
        self.strict = strict
        self.ids: dict[str, Any] = {}
        self.barriers: dict[str, str] = {}
        self.rules: dict[str, str] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        try:
            ids = self._ids_for(n, out)
        except Barrier as b:
            ids = self._barrier(n, out, str(b))
        self.ids[n.name] = ids
        return out

    def _ids_for(self, n: fx.Node, out: Any):
        if n.op == "placeholder":
            return self._frozen_like(out)
        if n.op == "get_attr":
            return self._frozen_like(out)
        if n.op == "output":
            self.rules[n.name] = "output"
            return self.ids_of(n.args[0])
        tensor_inputs = [a for a in n.all_input_nodes if isinstance(self.ids.get(a.name), (torch.Tensor, tuple))]
        if n.op == "call_method" and n.target in SHAPE_QUERIES or (
            n.op == "call_function" and getattr(n.target, "__name__", "") == "getattr"
            and len(n.args) > 1 and n.args[1] in SHAPE_ATTRS
        ):
            self.rules[n.name] = "shape_query"
            return None
        if not tensor_inputs and not _has_tensor(out):
            self.rules[n.name] = "scalar"
            return None
        rule = lookup(n, self.module)
        if rule is None:
            target = describe_target(n, self.module)
            if self.strict:
                raise UnsupportedOpError(f"no channel rule for {target}: {n.format_node()}")
            raise Barrier(f"no channel rule for {target}")
        if n.op == "call_module" and len(self.module.get_submodule(n.target)._forward_hooks) > 0:
            raise Barrier("module has forward hooks")
        self.rules[n.name] = rule.name
        args = tuple(self.value_of(a) for a in n.args)
        kwargs = {k: self.value_of(v) for k, v in n.kwargs.items()}
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        ctx = RuleContext(n, module, args, kwargs, out, self.forest, self.ids_of, self.value_of)
        return rule.forward(ctx)

    def _barrier(self, n: fx.Node, out: Any, reason: str):
        self.rules.setdefault(n.name, "barrier")
        self.barriers[n.name] = reason
        for a in n.all_input_nodes:
            _map_ids(self.ids.get(a.name), self.forest.freeze)
        return self._frozen_like(out)

    def _frozen_like(self, value: Any):
        if isinstance(value, torch.Tensor):
            return torch.zeros((1,) * value.dim(), dtype=torch.int64)
        if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            return tuple(self._frozen_like(v) for v in value)
        return None

    def ids_of(self, a: Any):
        return self.ids.get(a.name) if isinstance(a, fx.Node) else None

    def value_of(self, a: Any):
        return fx.node.map_arg(a, lambda n: self.env[n])


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


class ChannelGroups(Analysis):
    """Channel ids and coupled groups of every tensor (see module docstring)."""

    name = "channel-groups"

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict

    def key(self) -> tuple:
        return (self.strict,)

    def compute(self, gm: fx.GraphModule, am: AnalysisManager | None = None) -> ChannelGraph:
        interp = _IdInterpreter(gm, self.strict)
        with torch.no_grad():
            interp.run(example_input(gm))
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        value = out_node.args[0]
        name = value.name if isinstance(value, fx.Node) else ""
        out_shape = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
        width = int(out_shape.shape[-1]) if hasattr(out_shape, "shape") else None
        return ChannelGraph(interp.forest, interp.ids, interp.barriers, interp.rules, name, width)
