"""How a component is made: thresholds, a budget, recovery steps (the ``disassemble`` command).

``disassemble(gm, profile, task)`` cuts the task's component at MDA's thresholds (or the ones
given). With a ``budget`` (``mdafx.search.Budget``) it searches threshold multipliers on
calibration images and returns the smallest component that meets it; with
``reestimate_norms=True`` every candidate's batch norms are re-estimated on calibration images
first. Calibration images are ``(dataset, indices)``: a split of the training data the profile
did not select from (``mdafx.profiling.calibration_split``), never the test split.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx as fx

from .data import labels_at
from .disassembly import Component, cut, source_analyses
from .errors import PreconditionError
from .ir import count_macs
from .passes.locate import Thresholds
from .profiling import Profile
from .search import Budget, search_thresholds

__all__ = ["disassemble", "first_per_class"]


def first_per_class(dataset, indices: Sequence[int], per_class: int) -> list[int]:
    """The first ``per_class`` of ``indices`` of every class, in their order."""
    labels = labels_at(dataset, indices).tolist()
    taken: dict[int, int] = {}
    out = []
    for i, y in zip(indices, labels):
        if taken.get(y, 0) < per_class:
            taken[y] = taken.get(y, 0) + 1
            out.append(int(i))
    return out


def disassemble(gm: fx.GraphModule, profile: Profile, task: Sequence[Any], *,
                thresholds: Thresholds = Thresholds(), budget: Budget | None = None,
                calibration: tuple[Any, Sequence[int]] | None = None,
                reestimate_norms: bool = False, norm_images: int = 50,
                source: str = "model", am=None, progress: bool = False) -> Component:
    """The component of ``task`` (module docstring). Its metadata records the recipe, params,
    MACs and, when calibration images were used, its and the source's accuracy on them; with a
    search, ``component.search`` is the explored trade-off (``SearchResult``)."""
    am = am or source_analyses(gm, profile)
    calibrating = budget is not None or reestimate_norms
    if calibrating:
        if calibration is None:
            raise PreconditionError("a budget or norm re-estimation needs calibration images "
                                    "(dataset, indices)")
        dataset, indices = calibration
        norm_idx = first_per_class(dataset, indices, norm_images) if reestimate_norms else None
        res = search_thresholds(
            gm, profile, task, dataset, indices, budget or Budget(max_acc_drop=100.0),
            reestimate=reestimate_norms, reestimate_indices=norm_idx,
            scales=None if budget is not None else (1.0,), base=thresholds,
            source=source, progress=progress, am=am)
        comp = res.component
        comp.metadata["calibration"] = {"images": res.calib_images,
                                        "accuracy": res.candidate.accuracy,
                                        "source_accuracy": res.source_accuracy}
        if budget is None:  # one candidate at the given thresholds: not a search
            comp.metadata.pop("search", None)
        else:
            comp.search = res
    else:
        comp = cut(gm, profile, task, thresholds=thresholds, source=source, am=am)
    comp.metadata.update(macs=count_macs(comp.module), macs_source=count_macs(gm),
                         num_classes_source=len(profile.class_names))
    if profile.record.get("input"):
        comp.metadata["input"] = profile.record["input"]
    return comp
