"""mdafx's passes, and the order they run in.

Analyses (``Shapes``, ``ChannelGroups``, ``Contributions``, ``Locate``, ``TaskPlan``) are not
listed: a pass names the ones it needs in ``requires`` and the ``AnalysisManager`` computes them
on first use (contributions are seeded from a profile). ``mdafx.instrument.run_pipeline`` runs
a pipeline with the instruments the environment asks for (``MDAFX_DUMP``, ``MDAFX_VERIFY``),
refreshing ``Shapes`` after every transform.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mdafx.passmanager import Pass
from mdafx.passes.align_padding import AlignPadding
from mdafx.passes.channel_groups import ChannelGroups
from mdafx.passes.contributions import Contributions
from mdafx.passes.feature_head import InsertFeatureHead
from mdafx.passes.locate import Locate, Thresholds
from mdafx.passes.logit_scaling import FoldLogitScale, InsertLogitScale
from mdafx.passes.merge_classes import MergeDuplicateClasses
from mdafx.passes.prune_channels import ChannelPlan, PruneChannels, TaskPlan
from mdafx.passes.reestimate_norms import ReestimateNorms
from mdafx.passes.shapes import Shapes

__all__ = ["disassembly_pipeline", "assembly_pipeline", "ChannelGroups", "Contributions",
           "Locate", "Shapes", "TaskPlan", "Thresholds"]


def disassembly_pipeline(plan: ChannelPlan, *, norm_batches: Iterable[Any] | None = None
                         ) -> list[Pass]:
    """The transforms that cut a component out of a traced model for ``plan`` (e.g.
    ``am.get(TaskPlan(classes, thresholds))``: Locate's masks of the task, OR over its classes;
    or that plan refined by ``ChannelSelection.refine`` (passes/select_channels.py): the same
    number of channels per group, chosen by what the layer reading them loses)."""
    pipeline: list[Pass] = [
        # drop the channels the plan rejects and keep only the task's logits; first, because
        # everything after it must see the component's real widths
        PruneChannels(plan),
    ]
    if norm_batches is not None:
        # the kept channels' batch-norm statistics changed with their inputs: measure them
        # again on calibration images (forward passes only)
        pipeline.append(ReestimateNorms(norm_batches))
    return pipeline


def assembly_pipeline(groups: Sequence[Sequence[int]], *, merged: bool,
                      factors: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                      head: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Pass]:
    """The transforms that turn the parallel graph of k components (``mdafx.assembly``) into
    the assembled classifier: ``head`` (weight, bias) replaces the branches' logits by one head
    over their features, else ``factors`` (and ``offsets``) calibrate the concatenated logits
    and ``groups`` lists per output class the logits it merges."""
    if head is not None:
        pipeline: list[Pass] = [
            # one closed-form classifier over every branch's features, one logit per class;
            # first, so that AlignPadding merges the branch bodies up to those features
            InsertFeatureHead(*head),
        ]
        if merged:
            # MDA §2.2: one layer-wise wider network instead of k branches
            pipeline.append(AlignPadding())
        return pipeline
    if factors is None:
        factors = torch.ones(sum(len(g) for g in groups))
    pipeline = [
        # MDA §2.1: put the components' logits on one scale before anything compares them
        InsertLogitScale(factors, offsets),
    ]
    if merged:
        # MDA §2.2: one layer-wise wider network instead of k branches; before folding, so the
        # factors land in the merged head
        pipeline.append(AlignPadding())
    pipeline += [
        # the factors become part of the heads' weights where a Linear produces the logits
        FoldLogitScale(),
        # last: one logit per class name, the max over the components that know it
        MergeDuplicateClasses(groups),
    ]
    return pipeline
