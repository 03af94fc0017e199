"""The Python API; the CLI (``mdafx.cli``) mirrors it one subcommand per function."""
from __future__ import annotations

import torch
import torch.fx as fx

from .ir import trace
from passes.channel_groups import ChannelGraph, ChannelGroups
from passes.prune_channels import (ChannelPlan, masked_model, plan_from_votes, plan_random,
                                   prune as _prune)

__all__ = ["trace", "channel_groups", "ChannelPlan", "plan_from_votes", "plan_random", "prune",
           "masked_model"]


def channel_groups(gm: fx.GraphModule, strict: bool = False) -> ChannelGraph:
    """Channel ids, coupled groups and barriers of a traced model (see passes/channel_groups.py)."""
    return ChannelGroups(strict=strict).compute(gm)


def prune(gm: fx.GraphModule, plan: ChannelPlan | None = None, *, keep: dict | None = None,
          classes=None, cg: ChannelGraph | None = None, instruments=None) -> fx.GraphModule:
    """A physically smaller copy of ``gm``.

    Give either a ``plan`` or ``keep``: per node name, a bool mask over that node's output
    channels (a coupled group stays if any of its channels is marked; unmarked groups stay).
    ``classes`` selects and orders the output logits.
    """
    cg = cg or channel_groups(gm)
    if plan is None:
        plan = plan_from_votes(cg, keep or {}, classes)
    return _prune(gm, plan, cg, instruments)
