"""Where a component's accuracy goes: its plan applied one weighted layer at a time.

For each weighted layer ``L`` (graph order) of the source, the masked model (MDA.md §1.4's
oracle, equal to the pruned component) is scored on calibration images of the task twice:

* *alone*: only the channels the plan drops at ``L``'s input are zeroed (every other channel
  kept): what pruning that one layer's inputs costs;
* *cumulative*: the channels dropped at the inputs of ``L`` and of every layer before it.

The last cumulative row is the whole component. Dropping at a layer's input zeroes those
channels wherever they live (a coupled group is one decision), so layers that share a residual
stream show the same groups. Both scores predict over the task's logits only, as the component
does. Nothing is pruned or trained: the rows say where remedies should aim.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from .data import batches, labels_at
from .evaluation import predict
from .passes.channel_groups import ChannelGraph
from .passes.prune_channels import ChannelPlan, masked_model
from .passes.reconstruct import weighted_nodes

__all__ = ["LayerRow", "accuracy_by_layer"]


@dataclass
class LayerRow:
    layer: str
    kept: int              # input channels of the layer the plan keeps
    total: int
    alone: float           # calibration accuracy with only this layer's inputs pruned
    cumulative: float      # ... with this and every earlier layer's inputs pruned


def _input_roots(cg: ChannelGraph, node: fx.Node) -> torch.Tensor:
    return torch.unique(cg.roots(node.args[0].name).reshape(-1))


def accuracy_by_layer(gm: fx.GraphModule, plan: ChannelPlan, cg: ChannelGraph, dataset,
                      indices: Sequence[int], classes: Sequence[int], *,
                      batch_size: int = 250) -> list[LayerRow]:
    """The rows of the module docstring, for the task ``classes`` of ``plan``."""
    classes = list(classes)
    labels = labels_at(dataset, indices).tolist()
    keep = [i for i, y in zip(indices, labels) if y in classes]
    targets = torch.as_tensor([classes.index(y) for y in labels if y in classes])

    def score(keep_mask: torch.Tensor) -> float:
        logits, _ = predict(masked_model(gm, ChannelPlan(keep_mask, None), cg),
                            batches(dataset, keep, batch_size), what="the masked model")
        return float((logits[:, classes].argmax(1) == targets).float().mean())

    rows, cumulative = [], torch.ones_like(plan.keep)
    for node in weighted_nodes(gm):
        roots = _input_roots(cg, node)
        dropped = roots[~plan.keep[roots]]
        alone = torch.ones_like(plan.keep)
        alone[dropped] = False
        cumulative[dropped] = False
        rows.append(LayerRow(node.name, int(plan.keep[roots].sum()), int(roots.numel()),
                             score(alone), score(cumulative.clone())))
    return rows
