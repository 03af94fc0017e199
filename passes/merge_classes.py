"""MergeDuplicateClasses (transform): one logit per class name in an assembled model.

When several components carry a class of the same name (two sources that both know "cat"), the
assembled model outputs that class once, as the maximum of those components' (calibrated)
logits: ``y'[:, g] = max_{p in groups[g]} y[:, p]`` ("merge by max"). ``groups`` lists, per output
class, the positions of the concatenated logits it takes, in output order; a group of one is a
plain copy. A graph whose groups are all singletons in order is left unchanged.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx as fx

from mdafx.errors import PreconditionError
from mdafx.passmanager import AnalysisManager, Pass
from mdafx.passes.logit_scaling import output_value

__all__ = ["MergeDuplicateClasses"]


class MergeDuplicateClasses(Pass):
    """``y'[:, g] = max over groups[g]`` of the output logits (module docstring)."""

    name = "merge-duplicate-classes"

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        self.groups = [[int(p) for p in g] for g in groups]
        flat = [p for g in self.groups for p in g]
        if any(not g for g in self.groups) or sorted(flat) != list(range(len(flat))):
            raise PreconditionError(f"class groups {self.groups} must partition the logits")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        if all(len(g) == 1 for g in self.groups) and \
                [g[0] for g in self.groups] == list(range(len(self.groups))):
            return False
        value = output_value(gm)
        graph = gm.graph
        columns = []
        anchor = value
        for k, group in enumerate(self.groups):
            with graph.inserting_after(anchor):
                if len(group) == 1:
                    col = graph.call_function(
                        operator.getitem, (value, (slice(None), slice(group[0], group[0] + 1))))
                    col.name = f"mdafx_class_{k}"
                    anchor = col
                else:
                    picked = graph.call_function(operator.getitem,
                                                 (value, (slice(None), list(group))))
                    picked.name = f"mdafx_class_{k}_sources"
                    with graph.inserting_after(picked):
                        col = graph.call_method("amax", (picked, 1), {"keepdim": True})
                        col.name = f"mdafx_class_{k}"
                    anchor = col
            columns.append(col)
        with graph.inserting_after(anchor):
            merged = graph.call_function(torch.cat, (columns, 1))
            merged.name = "mdafx_classes"
        value.replace_all_uses_with(
            merged, delete_user_cb=lambda user: not user.name.startswith("mdafx_class_"))
        return True
