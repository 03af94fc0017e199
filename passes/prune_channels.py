"""PruneChannels (transform): physically remove the channels a ChannelPlan drops.

A ``ChannelPlan`` decides per coupled group (union-find root of ``ChannelGroups``) whether its
channels stay, and which output logits (``classes``) the pruned model returns, in that order.
Frozen groups always stay.

For every node whose rule has a ``prune`` step (conv, linear, batch norm, reshape/split/getitem
constants, ``groups`` of a functional conv) the rule rewrites the module or arguments, and every
parameter or buffer read by a ``get_attr`` node is sliced along the dims whose channels the plan
drops (``ChannelGraph.params``), so that, for every tensor ``t`` of the graph,

    pruned(x).t == original(x).t[..., kept(t), ...]      (kept positions along t's channel dim)

whenever the dropped channels are zero where they are produced, which is exactly the masked model
of ``masked_model`` (MDA.md §1.4's oracle). The output keeps the logits of ``classes``, reordered
by a final ``getitem`` when the kept order differs from the requested one.
A module called at several nodes is rebuilt once (its channels are coupled across the calls),
and a tensor is sliced once however many nodes read it; a tensor owned by a rebuilt module is
left to the module's rule. Invalidates everything (shapes and ids change).
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from mdafx.channels import FROZEN, along
from mdafx.errors import PreconditionError
from mdafx.errors import InternalError
from mdafx.ir import META_KEPT
from mdafx.passmanager import Analysis, AnalysisManager, Pass
from mdafx.rules import PruneContext, lookup, rule_key, slice_parameter
from mdafx.passes.channel_groups import ChannelGraph, ChannelGroups, _map_ids
from mdafx.passes.locate import Locate, Thresholds


@dataclass
class ChannelPlan:
    """Which coupled groups stay (``keep[root]``) and which logits the result returns."""

    keep: torch.Tensor              # bool, indexed by channel id root
    classes: list[int] | None = None

    def kept(self, cg: ChannelGraph, name: str):
        return _map_ids(cg.ids[name], lambda ids: self.keep[cg.forest.find(ids)])


def plan_from_votes(cg: ChannelGraph, votes: dict[str, torch.Tensor], classes=None) -> ChannelPlan:
    """A group stays if any vote on any of its channels says so; groups nobody voted on stay.

    ``votes[name]`` is a bool tensor over the node's output channels: shaped like its ids, or 1-D
    along its channel dim.
    """
    n = cg.forest.size
    voted = torch.zeros(n, dtype=torch.bool)
    yes = torch.zeros(n, dtype=torch.bool)
    for name, vote in votes.items():
        if name not in cg.ids or not isinstance(cg.ids[name], torch.Tensor):
            raise PreconditionError(f"no tensor node named {name!r} to vote on")
        roots = cg.forest.find(cg.ids[name])
        vote = torch.as_tensor(vote, dtype=torch.bool)
        if vote.dim() == 1 and roots.dim() != 1:
            dim = cg.channel_dim(name)
            axis = dim if dim is not None else _first_sized(roots, vote.numel())
            roots = along(roots, axis)
        roots, vote = torch.broadcast_tensors(roots, vote) if vote.shape != roots.shape else (roots, vote)
        voted[roots.reshape(-1)] = True
        yes.scatter_reduce_(0, roots.reshape(-1), vote.reshape(-1), reduce="amax")
    return finalize_plan(cg, torch.where(voted, yes, torch.ones_like(yes)), classes)


def _first_sized(roots: torch.Tensor, size: int) -> int:
    for d, s in enumerate(roots.shape):
        if s == size:
            return d
    raise PreconditionError(f"vote of {size} channels does not match ids of shape {tuple(roots.shape)}")


def plan_random(cg: ChannelGraph, density: float, seed: int = 0, classes=None) -> ChannelPlan:
    """Keep each prunable group with probability ``density`` (for tests and benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(cg.forest.size, generator=g) < density
    return finalize_plan(cg, keep, classes)


def finalize_plan(cg: ChannelGraph, keep: torch.Tensor, classes=None) -> ChannelPlan:
    """Apply the rules every plan obeys: frozen groups stay, the output keeps exactly ``classes``
    (where its logits are prunable), and every tensor keeps at least one channel."""
    keep = keep.clone().bool()
    keep[FROZEN] = True
    if classes is not None:
        classes = [int(c) for c in classes]
        out_roots = _logit_roots(cg)
        if len(set(classes)) != len(classes):
            raise PreconditionError(f"classes {classes} repeat a class")
        bad = [c for c in classes if not 0 <= c < out_roots.numel()]
        if bad:
            raise PreconditionError(f"classes {bad} out of range: the model has {out_roots.numel()} logits")
        wanted = torch.zeros(out_roots.numel(), dtype=torch.bool)
        wanted[classes] = True
        keep[out_roots[~wanted]] = False
        keep[out_roots[wanted]] = True
        keep[FROZEN] = True
    # A tensor with no channel left would break the graph; keep its first channel.
    for name in cg.tensor_nodes():
        roots = cg.forest.find(cg.ids[name]).reshape(-1)
        if roots.numel() and not bool(keep[roots].any()):
            keep[roots[0]] = True
    return ChannelPlan(keep, classes)


def _logit_roots(cg: ChannelGraph) -> torch.Tensor:
    """The group root of each logit (a frozen output has its one root repeated)."""
    ids = cg.ids.get(cg.output)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or cg.output_width is None:
        raise PreconditionError("class selection needs a model whose output is one [batch, classes] tensor")
    return along(cg.forest.find(ids), 1, cg.output_width).clone()


class TaskPlan(Analysis):
    """The plan of a task's component (MDA §1.4): a coupled group stays iff some class of
    ``classes`` relies on one of its channels under ``thresholds`` (Locate's masks, OR over the
    task), and the output keeps exactly the task's logits, in the task's order."""

    name = "task-plan"

    def __init__(self, classes: Sequence[int], thresholds: Thresholds = Thresholds()) -> None:
        self.classes = tuple(int(c) for c in classes)
        self.thresholds = thresholds

    def key(self) -> tuple:
        return (self.classes, self.thresholds)

    def compute(self, gm: fx.GraphModule, am: AnalysisManager) -> ChannelPlan:
        masks = am.get(Locate(self.thresholds))
        return plan_from_votes(am.get(ChannelGroups), masks.votes(self.classes),
                               list(self.classes))


class PruneChannels(Pass):
    """Rewrite modules and shape constants so dropped channels physically disappear."""

    name = "prune-channels"
    requires = (ChannelGroups,)

    def __init__(self, plan: ChannelPlan) -> None:
        self.plan = plan

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        cg: ChannelGraph = am.get(ChannelGroups)
        plan = self.plan
        roots_of = lambda a: cg.roots(a.name) if isinstance(a, fx.Node) else None  # noqa: E731
        kept_of = lambda a: plan.kept(cg, a.name) if isinstance(a, fx.Node) else None  # noqa: E731
        modified = False
        rebuilt: set[str] = set()   # modules already pruned (a module called twice: once)
        for node in list(gm.graph.nodes):
            ids = cg.ids.get(node.name)
            if isinstance(ids, torch.Tensor):
                kept = plan.kept(cg, node.name)
                dim = cg.channel_dim(node.name)
                total = ids.shape[dim] if dim is not None else None
                node.meta[META_KEPT] = (int(along(kept, dim).sum()), total) if dim is not None else None
            rule = lookup(node, gm)
            if rule is None or rule.prune is None or node.name in cg.barriers:
                continue
            if node.op == "call_module" and node.target in rebuilt:
                continue
            before = (node.op, node.target, node.args, node.kwargs)
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            base = rule_key(node, gm) if module is not None else None
            try:
                rule.prune(PruneContext(node, gm, module, kept_of, roots_of, base))
            except Exception as e:
                raise InternalError(f"{rule.name} could not prune {node.format_node()}: "
                                    f"{type(e).__name__}: {e}") from e
            after_module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if module is not None:
                rebuilt.add(node.target)
            modified |= before != (node.op, node.target, node.args, node.kwargs) or after_module is not module
        modified |= _slice_parameters(gm, cg, plan, rebuilt)
        modified |= _select_output(gm, cg, plan)
        return modified


def _slice_parameters(gm: fx.GraphModule, cg: ChannelGraph, plan: ChannelPlan,
                      rebuilt: set[str]) -> bool:
    """Slice every tensor read by a get_attr node along the dims whose channels the plan drops
    (once per target; those of modules a rule rebuilt are the rule's)."""
    modified = False
    for target, rec in cg.params.items():
        owner_path, _, attr = target.rpartition(".")
        if any(owner_path == m or owner_path.startswith(m + ".") for m in rebuilt):
            continue
        kept = {d: k for d, k in rec.kept_dims(plan.keep, cg.forest).items() if not bool(k.all())}
        if not kept:
            continue
        owner = gm.get_submodule(owner_path) if owner_path else gm
        old = getattr(owner, attr)
        if tuple(old.shape) != rec.shape:
            raise InternalError(f"{target} has shape {tuple(old.shape)}, expected {rec.shape}")
        new = slice_parameter(old, kept)
        if isinstance(new, torch.nn.Parameter) or attr in owner._parameters:
            owner._parameters[attr] = new if isinstance(new, torch.nn.Parameter) else \
                torch.nn.Parameter(new, requires_grad=False)
        elif attr in owner._buffers:
            owner._buffers[attr] = new
        else:
            setattr(owner, attr, new)
        modified = True
    return modified


def _select_output(gm: fx.GraphModule, cg: ChannelGraph, plan: ChannelPlan) -> bool:
    if plan.classes is None:
        return False
    roots = _logit_roots(cg)
    kept_positions = plan.keep[roots].nonzero().reshape(-1).tolist()
    index = [kept_positions.index(c) if c in kept_positions else None for c in plan.classes]
    if index == list(range(len(kept_positions))):
        return False
    return _append_getitem(gm, index, "mdafx_select")


def _append_getitem(gm: fx.GraphModule, index: list[int], name: str) -> bool:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    with gm.graph.inserting_before(out):
        sel = gm.graph.call_function(operator.getitem, (value, (slice(None), list(index))))
        sel.name = name
    out.args = (sel,)
    return True


def masked_model(gm: fx.GraphModule, plan: ChannelPlan, cg: ChannelGraph) -> fx.GraphModule:
    """MDA.md §1.4's oracle: ``gm`` with every dropped channel set to zero wherever it appears
    (same shapes), returning the logits of ``plan.classes`` in that order."""
    masked = copy.deepcopy(gm)
    graph = masked.graph
    count = 0
    for node in list(graph.nodes):
        ids = cg.ids.get(node.name)
        if node.op == "output" or not isinstance(ids, torch.Tensor):
            continue
        kept = plan.kept(cg, node.name)
        if bool(kept.all()):
            continue
        buffer_name = f"mdafx_mask_{count}"
        masked.register_buffer(buffer_name, kept.clone())
        count += 1
        with graph.inserting_after(node):
            mask = graph.get_attr(buffer_name)
        with graph.inserting_after(mask):
            # where, not a product: a dropped channel is 0 even where the full model has inf
            # (rsqrt of a zeroed variance), as in the pruned model, which has no such entry
            zero = False if node.meta.get("tensor_meta") is not None and getattr(
                node.meta["tensor_meta"], "dtype", None) == torch.bool else 0
            mul = graph.call_function(torch.where, (mask, node, zero))
        node.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
    if plan.classes is not None:
        _append_getitem(masked, list(plan.classes), "mdafx_select")
    graph.lint()
    masked.recompile()
    return masked
