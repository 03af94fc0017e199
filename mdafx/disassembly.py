"""Disassembling (MDA §1.3–1.4): from a traced source model and its profile to components.

``cut(gm, profile, task, thresholds)`` runs the disassembly pipeline (``mdafx.passes``) on a copy
of ``gm``: the task's plan (Locate's masks at the thresholds, OR over the task's classes, coupled
groups keep the union) → PruneChannels → [ReestimateNorms]. The result is a :class:`Component`:
a physically smaller GraphModule that outputs the task's logits in the task's order.
``mdafx.recipes.disassemble`` chooses the thresholds (fixed, or searched against a budget) and the
training-free recovery steps around it.

The analyses of one source graph (its channel groups, the profile's contributions, the masks
of every threshold setting tried) live in one ``AnalysisManager`` (:func:`source_analyses`);
pass it as ``am`` to reuse them across tasks.

Classes of a task are given by name, or by index as an ``int`` (Python) or ``"#N"`` (text):
a string is always a class name first, so numeric folder names ("1", "2") are never read as
indices.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .errors import PreconditionError
from .instrument import run_pipeline
from .ir import count_params, input_shape
from .passes import disassembly_pipeline
from .passes.channel_groups import ChannelGraph, ChannelGroups
from .passes.contributions import Contributions
from .passes.locate import ChannelMasks, Locate, Thresholds
from .passes.prune_channels import ChannelPlan, TaskPlan, plan_from_votes
from .passmanager import AnalysisManager
from .profiling import Profile

__all__ = ["Component", "RunnableModel", "channel_groups", "cut", "locate", "prune",
           "resolve_classes", "source_analyses"]


class RunnableModel:
    """What components and assembled models share: call them, count their parameters."""

    module: fx.GraphModule

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @property
    def params(self) -> int:
        return count_params(self.module)


@dataclass
class Component(RunnableModel):
    """A standalone model for a task: logits of ``classes`` (source indices) in that order."""

    module: fx.GraphModule
    classes: list[int]
    class_names: list[str]
    source: str = "model"
    input_shape: tuple[int, ...] = ()
    metadata: dict = field(default_factory=dict)
    search: Any = field(default=None, repr=False, compare=False)  # mdafx.search.SearchResult


def channel_groups(gm: fx.GraphModule, strict: bool = False) -> ChannelGraph:
    """Channel ids, coupled groups and barriers of a traced model (``ChannelGroups``)."""
    return ChannelGroups(strict=strict).compute(gm)


def source_analyses(gm: fx.GraphModule, profile: Profile | dict | None = None,
                    cg: ChannelGraph | None = None) -> AnalysisManager:
    """An analysis manager for ``gm``, seeded with its channel groups (when given) and the
    profile's contributions (checked to belong to ``gm``)."""
    am = AnalysisManager(gm)
    if cg is not None:
        am.provide(ChannelGroups, cg)
    if isinstance(profile, Profile):
        profile.check_matches(gm)
        am.provide(Contributions, profile.contributions)
    elif profile is not None:
        am.provide(Contributions, profile)
    return am


def resolve_classes(task: Sequence[Any], class_names: Sequence[str] | None,
                    num_classes: int) -> list[int]:
    """Class indices of ``task``, checked, in the given order (module docstring: names, ints,
    or ``"#N"``)."""
    names = list(class_names or [])
    out = []
    for t in task:
        if isinstance(t, str) and t in names:
            out.append(names.index(t))
            continue
        if isinstance(t, str) and t.startswith("#") and t[1:].isdigit():
            t = int(t[1:])
        if isinstance(t, bool) or not isinstance(t, int):
            known = ", ".join(names) or "none (pass class names)"
            hint = (f"; to give a class index write #{t}" if isinstance(t, str) and t.isdigit()
                    else "")
            raise PreconditionError(f"unknown class {t!r}; known classes: {known}{hint}")
        if not 0 <= t < num_classes:
            raise PreconditionError(f"class index {t} out of range 0..{num_classes - 1}")
        out.append(t)
    if not out:
        raise PreconditionError("the task has no classes")
    if len(set(out)) != len(out):
        raise PreconditionError(f"the task repeats a class: {list(task)}")
    return out


def locate(gm: fx.GraphModule, profile: Profile | dict, thresholds: Thresholds = Thresholds(),
           cg: ChannelGraph | None = None, *, am: AnalysisManager | None = None
           ) -> ChannelMasks:
    """Per-class channel masks of every tensor (MDA §1.3, the ``Locate`` analysis)."""
    am = am or source_analyses(gm, profile, cg)
    return am.get(Locate(thresholds))


def prune(gm: fx.GraphModule, plan: ChannelPlan | None = None, *, keep: dict | None = None,
          classes=None, cg: ChannelGraph | None = None, instruments=None,
          name: str = "model", norm_batches=None) -> fx.GraphModule:
    """A physically smaller copy of ``gm`` (``gm`` is left untouched) through the disassembly
    pipeline.

    Give either a ``plan`` or ``keep``: per node name, a bool mask over that node's output
    channels (a coupled group stays if any of its channels is marked; unmarked groups stay).
    ``classes`` selects and orders the output logits.
    """
    cg = cg or channel_groups(gm)
    if plan is None:
        plan = plan_from_votes(cg, keep or {}, classes)
    pruned = copy.deepcopy(gm)
    am = AnalysisManager(pruned)
    am.provide(ChannelGroups, cg)  # node names survive deepcopy
    run_pipeline(disassembly_pipeline(plan, norm_batches=norm_batches), pruned, am,
                 instruments=instruments, name=name)
    return pruned


def _kept_share(cg: ChannelGraph, plan: ChannelPlan) -> tuple[int, int]:
    roots = cg.prunable_roots()
    return int(plan.keep[roots].sum()), int(roots.numel())


def cut(gm: fx.GraphModule, profile: Profile | dict, task: Sequence[Any], *,
        thresholds: Thresholds = Thresholds(), class_names: Sequence[str] | None = None,
        source: str = "model", am: AnalysisManager | None = None, norm_batches=None,
        instruments=None, plan: ChannelPlan | None = None) -> Component:
    """Cut the task-aware component of ``task`` (MDA §1.4) out of ``gm``: keep every channel
    some class of the task relies on at ``thresholds`` (coupled groups keep the union), and
    only the task's logits. ``profile`` is a Profile of ``gm`` (or its contributions);
    ``norm_batches`` re-estimates the component's batch norms on those images. ``plan``
    replaces the task's plan (e.g. the reference code's, which keeps every logit)."""
    am = am or source_analyses(gm, profile)
    if class_names is None and isinstance(profile, Profile):
        class_names = profile.class_names
    contributions = am.get(Contributions)
    num_classes = next(iter(contributions.values())).shape[0]
    classes = resolve_classes(task, class_names, num_classes)
    cg = am.get(ChannelGroups)
    plan = plan if plan is not None else am.get(TaskPlan(classes, thresholds))
    module = prune(gm, plan, cg=cg, instruments=instruments, name=source,
                   norm_batches=norm_batches)
    task = classes
    if plan.classes is None:  # every logit kept
        classes = list(range(num_classes))
    names = [class_names[c] if class_names else str(c) for c in classes]
    kept, total = _kept_share(cg, plan)
    meta = {"source": source, "classes": classes, "class_names": names, "task": task,
            "thresholds": vars(thresholds), "channels_kept": kept, "channels_total": total,
            "params_source": count_params(gm), "params": count_params(module)}
    return Component(module, classes, names, source, input_shape(gm), meta)
