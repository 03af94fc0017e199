"""ReferencePlan (analysis): the plan the authors' reference code would cut, for comparison.

MDA's reference implementation does not walk the graph. It walks the weighted layers (Conv2d,
Linear) in *module registration order*, as if they formed a chain, from the last to the first::

    M_last = onehot(c)                                   per class c, over the logits
    M'_L   = mask of layer L's input (MDA's α/β rule, passes/locate.layer_input_mask)
    M_{L-1} = M'_L   if layer L-1 has as many outputs as layer L has inputs,
              all ones otherwise (the "reset", e.g. at a flatten into a Linear, or wherever the
              registration order is not the data flow)

and keeps every logit. This analysis reproduces those masks exactly and turns them into a plan:
layer L-1's output channels get the votes ``OR_{c in task} M_{L-1}^c``. On a sequential model
(every layer feeds the next one registered) the result is the reference's component; on other
graphs the votes land on the layers the reference would prune, and mdafx's coupled groups keep
the pruned graph valid (the reference would instead resize layers inconsistently).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from mdafx.passmanager import Analysis, AnalysisManager
from mdafx.passes.channel_groups import ChannelGroups
from mdafx.passes.contributions import Contributions
from mdafx.passes.locate import Thresholds, layer_input_mask
from mdafx.passes.prune_channels import ChannelPlan, plan_from_votes

__all__ = ["ReferencePlan", "reference_masks"]


def _layers_in_registration_order(gm: fx.GraphModule) -> list[tuple[str, str, nn.Module]]:
    """``(module path, node name, module)`` of every called Conv2d/Linear, registration order."""
    called = {n.target: n.name for n in gm.graph.nodes if n.op == "call_module"}
    return [(path, called[path], m) for path, m in gm.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and path in called]


def reference_masks(gm: fx.GraphModule, contributions, thresholds: Thresholds = Thresholds()
                    ) -> dict[str, torch.Tensor]:
    """Per weighted layer node name, the reference's per-class mask ``[K, O]`` of its outputs."""
    layers = _layers_in_registration_order(gm)
    if not layers:
        return {}
    k = next(iter(contributions.values())).shape[0]
    last = layers[-1][2]
    out_mask = torch.eye(k, dtype=torch.bool)[:, :last.weight.shape[0]] if \
        last.weight.shape[0] == k else torch.ones(k, last.weight.shape[0], dtype=torch.bool)
    masks: dict[str, torch.Tensor] = {}
    for i in range(len(layers) - 1, -1, -1):
        path, node, module = layers[i]
        masks[node] = out_mask
        if i == 0:
            break
        alpha, beta = thresholds.for_module(module)
        groups = getattr(module, "groups", 1)
        a = contributions.get(path)
        in_mask = (layer_input_mask(a, out_mask, groups, alpha, beta) if a is not None
                   else torch.ones(k, module.weight.shape[1] * groups, dtype=torch.bool))
        prev = layers[i - 1][2]
        width = prev.weight.shape[0]
        out_mask = in_mask if in_mask.shape[1] == width else torch.ones(k, width,
                                                                        dtype=torch.bool)
    return masks


class ReferencePlan(Analysis):
    """The reference code's plan for ``classes`` (module docstring): every logit kept."""

    name = "reference-plan"

    def __init__(self, classes: Sequence[int], thresholds: Thresholds = Thresholds()) -> None:
        self.classes = tuple(int(c) for c in classes)
        self.thresholds = thresholds

    def key(self) -> tuple:
        return (self.classes, self.thresholds)

    def compute(self, gm: fx.GraphModule, am: AnalysisManager) -> ChannelPlan:
        masks = reference_masks(gm, am.get(Contributions), self.thresholds)
        index = torch.as_tensor(self.classes)
        last = _layers_in_registration_order(gm)[-1][1]
        votes = {node: m[index].any(0) for node, m in masks.items() if node != last}
        return plan_from_votes(am.get(ChannelGroups), votes, None)
