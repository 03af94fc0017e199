"""mdafx's passes, and the order they run in.

Analyses (``ChannelGroups``, ``Contributions``, ``Locate``) are not listed: a pass names the ones
it needs in ``requires`` and the ``AnalysisManager`` computes them on first use. This module stays
import-light (passes/* import mdafx.* submodules, and ``mdafx/__init__`` is lazy), so pass
classes are imported inside the function that lists them.
"""
from __future__ import annotations

__all__ = ["disassembly_pipeline"]


def disassembly_pipeline(plan) -> list:
    """The transforms that cut a component out of a traced model for ``plan`` (a ChannelPlan
    decided from ``ChannelGroups``, e.g. by ``plan_from_votes`` over Locate's masks)."""
    from passes.prune_channels import PruneChannels

    return [
        # drop the channels the plan rejects and keep only the task's logits; first, because
        # everything after it must see the component's real widths
        PruneChannels(plan),
    ]
