"""ChannelGroups (analysis): the channel ids of every tensor and the coupled groups they form.

It runs the model once on the example input (fx Interpreter) and, node by node, asks the node's
channel rule (``mdafx.rules``) for the ids of its output. The result (``ChannelGraph``) holds the
ids, the rule that mapped each node and the reason of each barrier; the graph is not changed and
nothing is written into ``node.meta``.

Parameters and buffers carry channels too (``ParamIds``), so a rule that reads one can couple it
with the tensors it mixes, and pruning can slice it:

* a rule that reads a tensor's *entries along a dim* (``ctx.param_dim``: a conv/linear weight's
  rows and columns, a norm's per-channel vectors) gets one id per entry, the same wherever that
  tensor is used, so one module or weight used at several call sites couples all its uses;
* a parameter read *as data* (``x * gamma``, ``x + pos_embed``, ``table[index]``) gets one id per
  position (a rank-1 float tensor: its entries' ids). The element-wise and movement rules then
  couple those positions like any tensor's. Buffers of rank >= 2 and integer tensors (attention
  masks, index tables) and single numbers are constants: frozen;
* a tensor used both ways, or by a module without a rule, is frozen whole.

Rules may leave a tensor's channels varying along several dims (a reshape of a channel axis into
``3 × heads × head_dim`` waits for the matmul that decides which of them stays); once every node
ran, each tensor's channels are made to vary along one dim at most (the last, coupling the others)
so that a pruned tensor is a sub-grid of the original.

Invariants of the result:

* every tensor-valued node has ids with its tensor's rank, each dim of size 1 or the real size,
  and their roots vary along one dim at most;
* a channel whose root is ``FROZEN`` is kept by every plan (model inputs, barriers, norms over
  channels, constants);
* a node without a rule is a barrier: every channel of every tensor it reads or writes is frozen.

``barrier_report`` turns the result into what a user reads: the share of conv/linear output
channels that a plan may drop and the barriers that freeze the rest, with their reasons.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from mdafx.channels import FROZEN, ChannelForest, along, one_channel_dim, varying_dims
from mdafx.errors import UnsupportedOpError
from mdafx.ir import example_input
from mdafx.passmanager import Analysis, AnalysisManager
from mdafx.rules import Barrier, RuleContext, describe_target, lookup, rule_key

SHAPE_QUERIES = {"size", "dim", "numel"}
SHAPE_ATTRS = {"shape", "dtype", "device", "ndim"}


@dataclass
class ParamIds:
    """The channels of one parameter or buffer: ``dims[d]`` (1-D ids of its entries along dim
    ``d``, for the rules that asked) and, when read as data, the ids of its ``get_attr`` nodes.
    ``names`` are the ``get_attr`` targets that read it."""

    shape: tuple[int, ...]
    is_parameter: bool
    floating: bool
    names: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)   # get_attr nodes reading it
    dims: dict[int, torch.Tensor] = field(default_factory=dict)
    data: torch.Tensor | None = None
    opaque: bool = False     # read by something that cannot map it (a barrier, a module rule)

    def kept_dims(self, keep: torch.Tensor, forest: ChannelForest) -> dict[int, torch.Tensor]:
        """Per dim, the entries a plan keeps (``keep`` is indexed by root)."""
        out = {d: keep[forest.find(ids)] for d, ids in self.dims.items()}
        if self.data is not None:
            roots = forest.find(self.data)
            for d in varying_dims(roots):
                out[d] = keep[along(roots, d, self.shape[d])]
        return out


@dataclass
class ChannelGraph:
    """The result of ChannelGroups for one GraphModule."""

    forest: ChannelForest
    ids: dict[str, Any]                      # node name -> ids (tensor, tuple of them, or None)
    barriers: dict[str, str] = field(default_factory=dict)   # node name -> reason
    rules: dict[str, str] = field(default_factory=dict)      # node name -> rule that mapped it
    output: str = ""                         # name of the node whose value is the model output
    output_width: int | None = None          # size of the output's last dim (the logits)
    params: dict[str, ParamIds] = field(default_factory=dict)  # get_attr target -> its ids
    notes: dict[str, str] = field(default_factory=dict)  # node -> why it froze channels (no barrier)

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
        self.params: dict[int, tuple[torch.Tensor, ParamIds]] = {}   # id(tensor) -> record
        self.getattr_params: dict[str, ParamIds] = {}                # get_attr node -> record
        self.notes: dict[str, str] = {}

    # -- parameters --------------------------------------------------------------------------

    def _record(self, t: torch.Tensor) -> ParamIds:
        entry = self.params.get(id(t))
        if entry is None:
            rec = ParamIds(tuple(t.shape), isinstance(t, nn.Parameter), t.is_floating_point())
            entry = self.params[id(t)] = (t, rec)  # the tensor is held: its id stays unique
        return entry[1]

    def param_dim(self, p: Any, d: int, like: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
        """1-D ids of the entries of parameter ``p`` (get_attr node or tensor) along ``d``.

        ``like`` (1-D ids of the same size) are the ids the caller couples them with: on first
        use they are adopted instead of fresh ids (same groups, and the ids of a model without
        shared weights are numbered as they always were); the caller still unions them."""
        if isinstance(p, fx.Node):
            rec = self.getattr_params.get(p.name)
        elif isinstance(p, torch.Tensor):
            rec = self._record(p)
        else:
            return None
        if rec is None or len(rec.shape) == 0:
            return None
        d %= len(rec.shape)
        if d not in rec.dims:
            if like is not None and like.shape == (rec.shape[d],):
                rec.dims[d] = like
            else:
                rec.dims[d] = self.forest.fresh((rec.shape[d],))
            if len(rec.shape) == 1 and rec.data is not None:  # rank 1: one view
                self.forest.union(rec.dims[d], rec.data)
        return rec.dims[d]

    def _data_view(self, name: str) -> torch.Tensor:
        rec = self.getattr_params[name]
        if rec.data is None:
            shape = rec.shape
            numel = 1
            for s in shape:
                numel *= s
            constant = (not rec.floating or numel <= 1
                        or (len(shape) >= 2 and not rec.is_parameter))
            if constant:
                rec.data = torch.zeros((1,) * len(shape), dtype=torch.int64)
            elif len(shape) == 1:
                rec.data = rec.dims[0] if 0 in rec.dims else rec.dims.setdefault(
                    0, self.forest.fresh(shape))
            else:
                rec.data = self.forest.fresh(shape)
            for node in rec.nodes:
                self.ids[node] = rec.data
        return rec.data

    def _touch_module_params(self, module: nn.Module) -> None:
        """A module rule that did not read one of its module's tensors through ``param_dim``
        cannot say what happens to its channels: that tensor is opaque (frozen at the end)."""
        for t in list(module.parameters()) + list(module.buffers()):
            rec = self._record(t)
            if not rec.dims:
                rec.opaque = True

    # -- nodes -------------------------------------------------------------------------------

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
            if isinstance(out, torch.Tensor):
                rec = self._record(out)
                rec.names.append(str(n.target))
                rec.nodes.append(n.name)
                self.getattr_params[n.name] = rec
                return rec.data if rec.data is not None else self._frozen_like(out)
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
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if module is not None and (module._forward_hooks or module._forward_pre_hooks):
            raise Barrier("module has forward hooks")
        self.rules[n.name] = rule.name
        args = tuple(self.value_of(a) for a in n.args)
        kwargs = {k: self.value_of(v) for k, v in n.kwargs.items()}
        ctx = RuleContext(n, module, args, kwargs, out, self.forest, self.ids_of, self.value_of,
                          self.param_dim, lambda reason: self.notes.setdefault(n.name, reason))
        result = rule.forward(ctx)
        if module is not None:
            self._touch_module_params(module)
        return result

    def _barrier(self, n: fx.Node, out: Any, reason: str):
        self.rules.setdefault(n.name, "barrier")
        self.barriers[n.name] = reason
        for a in n.all_input_nodes:
            _map_ids(self.ids_of(a), self.forest.freeze)
            if a.name in self.getattr_params:
                self.getattr_params[a.name].opaque = True
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            for t in list(module.parameters()) + list(module.buffers()):
                self._record(t).opaque = True
        return self._frozen_like(out)

    def _frozen_like(self, value: Any):
        if isinstance(value, torch.Tensor):
            return torch.zeros((1,) * value.dim(), dtype=torch.int64)
        if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            return tuple(self._frozen_like(v) for v in value)
        return None

    def ids_of(self, a: Any):
        if not isinstance(a, fx.Node):
            return None
        if a.name in self.getattr_params:
            return self._data_view(a.name)
        return self.ids.get(a.name)

    def value_of(self, a: Any):
        return fx.node.map_arg(a, lambda n: self.env[n])

    # -- after the run -----------------------------------------------------------------------

    def finish(self) -> None:
        """Freeze tensors whose uses disagree, then give every tensor one channel dim."""
        for _, rec in self.params.values():
            conflict = rec.data is not None and len(rec.shape) >= 2 and rec.dims
            if rec.opaque or conflict:
                for ids in rec.dims.values():
                    self.forest.freeze(ids)
                if rec.data is not None:
                    self.forest.freeze(rec.data)
        views = [v for v in self.ids.values() if v is not None]
        changed = True
        while changed:  # coupling one tensor can make another vary along several dims
            changed = False
            for value in views:
                for ids in _flat(value):
                    changed |= one_channel_dim(self.forest, ids)


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    return []


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
        interp.finish()
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        value = out_node.args[0]
        name = value.name if isinstance(value, fx.Node) else ""
        out_shape = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
        width = int(out_shape.shape[-1]) if hasattr(out_shape, "shape") else None
        params = {name: rec for _, rec in interp.params.values() for name in rec.names}
        return ChannelGraph(interp.forest, interp.ids, interp.barriers, interp.rules, name, width,
                            params, interp.notes)


# ------------------------------------------------------------------------------ the report


WARN_SHARE = 0.1
"""Below this prunable share of conv/linear output channels, the report warns."""


@dataclass
class BarrierReport:
    """What limits pruning in one model: the prunable share of the output channels of its
    weighted layers (conv, linear; module or functional), and the barriers by reason."""

    prunable: int                     # conv/linear output channels a plan may drop
    total: int                        # all conv/linear output channels
    barriers: list[tuple[str, int, str]]   # (op, count, reason), most frequent first
    layers: int = 0                   # weighted layers counted
    freezes: list[tuple[str, int, str]] = field(default_factory=list)  # exact ops that freeze

    @property
    def share(self) -> float:
        return self.prunable / self.total if self.total else 0.0

    @property
    def warn(self) -> bool:
        return self.total > 0 and self.share < WARN_SHARE

    def lines(self, top: int = 5) -> list[str]:
        """One summary line, then one line per top barrier (op, count, reason)."""
        out = [f"prunable: {self.prunable:,}/{self.total:,} conv/linear output channels "
               f"({self.share:.0%}) in {self.layers} weighted layers; "
               f"{sum(c for _, c, _ in self.barriers)} barrier node(s)"]
        for op, count, reason in self.barriers[:top]:
            out.append(f"  barrier {op} ×{count}: {reason}")
        if len(self.barriers) > top:
            out.append(f"  ... and {len(self.barriers) - top} more kinds of barrier")
        for op, count, reason in self.freezes[:top]:
            out.append(f"  kept by {op} ×{count}: {reason}")
        return out

    def warning(self) -> str | None:
        if not self.warn:
            return None
        worst = (self.barriers or self.freezes or [None])[0]
        because = f"; mostly {worst[0]} ({worst[2]})" if worst else ""
        return (f"warning: only {self.share:.0%} of the conv/linear channels can be pruned"
                f"{because}: components will be barely smaller than the source")


def barrier_report(gm: fx.GraphModule, cg: ChannelGraph) -> BarrierReport:
    """The prunable share and the barriers of ``cg`` (module docstring)."""
    prunable = total = layers = 0
    for node in gm.graph.nodes:
        rule = lookup(node, gm) if node.op in ("call_module", "call_function") else None
        ids = cg.ids.get(node.name)
        if rule is None or rule.out_axis is None or not isinstance(ids, torch.Tensor):
            continue
        shape = node.meta.get("tensor_meta")
        if not hasattr(shape, "shape") or len(shape.shape) < 2:
            continue
        axis = rule.out_axis
        width = int(shape.shape[axis])
        roots = along(cg.forest.find(ids), axis, width)
        if len(torch.unique(roots)) > 1:  # one unit alone is never dropped (a tensor keeps one)
            prunable += int((roots != FROZEN).sum())
        total += width
        layers += 1
    nodes = {n.name: n for n in gm.graph.nodes}

    def grouped(reasons: dict[str, str]) -> list[tuple[str, int, str]]:
        counts: Counter = Counter()
        for name, reason in reasons.items():
            op = describe_target(nodes[name], gm) if name in nodes else name
            counts[(op.split(" (")[0], reason)] += 1
        return [(op, c, reason) for (op, reason), c in counts.most_common()]

    return BarrierReport(prunable, total, grouped(cg.barriers), layers, grouped(cg.notes))


__all__ = ["ChannelGraph", "ChannelGroups", "ParamIds", "BarrierReport", "barrier_report",
           "rule_key"]
