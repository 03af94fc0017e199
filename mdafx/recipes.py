"""How a component is made (the ``disassemble`` command): named recipes of thresholds, a budget
and training-free recovery steps.

A :class:`Recipe` says how channels are located (MDA's graph walk, or the authors' reference
code's chain walk), whether the thresholds are searched against a :class:`~mdafx.search.Budget`
and which recovery runs on the component (:class:`~mdafx.search.Recovery`: norm re-estimation,
closed-form layer reconstruction). ``RECIPES`` names the ones mdafx measures (README, "Components
that keep their accuracy"); ``"mda"`` is the method exactly as published, ``"reference"`` the
authors' code's masks, ``"default"`` the best measured recipe for a component on its own and for
assembly: the searched thresholds at γ 0 and at ``COST_EXPONENT`` (the one more accurate on
calibration images kept), the thresholds saying how many channels of each group stay and block
OBS which, where only one layer reads the group (passes/select_channels.py), then closed-form
reconstruction. ``"mda-channels"`` is the same without the selection (MDA's own channels, the
default before it); ``"assemblable"`` (mda-channels refitted on the other classes' images too) was
better for assembly with γ 0 only and is kept as the measured alternative (README).

Recipes with a budget or recovery need calibration images ``(dataset, indices)``: a split of the
training data the profile did not select from (``mdafx.profiling.calibration_split``), never the
test split. As on the CLI, ``disassemble`` defaults to ``"default"`` and, given no calibration
images, reads the split ``analyse`` held out of the profiled folder.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from .data import labels_at
from .disassembly import Component, cut, resolve_classes, source_analyses
from .errors import PreconditionError
from .ir import count_macs
from .passes.locate import Thresholds
from .passes.reference_plan import ReferencePlan
from .profiling import Profile, calibration_split
from .search import Budget, Recovery, search_thresholds

__all__ = ["RECIPES", "Recipe", "disassemble", "first_per_class"]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    locate: str = "mda"                 # "mda" (graph walk) | "reference" (the authors' chain)
    budget: Budget | None = None        # None: the given thresholds
    recovery: Recovery = Recovery()
    # γ of Thresholds (conv thresholds grow with what a channel costs): one value is fixed,
    # several are each searched and the more accurate on calibration images kept (disassemble)
    cost_exponents: tuple[float, ...] = (0.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cost_exponents", tuple(float(g) for g in self.cost_exponents))
        if not self.cost_exponents:
            raise PreconditionError(f"recipe {self.name}: give at least one cost exponent")
        if any(self.cost_exponents) and self.locate == "reference":
            raise PreconditionError("the reference recipe reproduces the authors' masks: it "
                                    "takes no cost exponent")
        if len(self.cost_exponents) > 1 and not self.needs_calibration:
            raise PreconditionError(f"recipe {self.name}: choosing among cost exponents needs "
                                    "calibration images (a budget or a recovery step)")

    @property
    def cost_exponent(self) -> float | None:
        """The fixed γ, or None when several are searched."""
        return self.cost_exponents[0] if len(self.cost_exponents) == 1 else None

    def with_cost_exponent(self, exponent: float) -> "Recipe":
        """This recipe at one fixed γ (no γ searched)."""
        return dataclasses.replace(self, cost_exponents=(float(exponent),))

    @property
    def needs_calibration(self) -> bool:
        return self.budget is not None or self.recovery != Recovery()


GOAL = Budget(max_macs_frac=0.5)
"""The default budget: the best component within half the source's MACs (the largest candidate
unless a smaller one scores significantly higher, ``mdafx.search``; the target is to be within
1 point of the source there; ``--max-drop`` asks for the smallest instead)."""

COST_EXPONENT = 0.5
"""γ of the ``cost-aware`` recipe (:class:`~mdafx.passes.locate.Thresholds`). Measured against
``searched+reconstruct`` (γ 0, otherwise the same), seed 0, test delta vs the source (README):
ResNet-20 {cat, dog} -3.85 -> -1.75, {airplane, ship} -2.55 -> -1.00, {automobile, truck}
-0.90 -> -0.80; but VGG {cat, dog} -0.95 -> -3.10 and {airplane, ship} -0.35 -> -0.70. No
single γ is best on both sources, so the ``default`` recipe runs both searches and keeps the
more accurate on calibration images; γ = 1 on ResNet-20 {cat, dog}: -2.60 (at 45.6% MACs)."""

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("mda", "MDA as published: the thresholds given (default α/β), no recovery"),
    Recipe("reference", "the authors' code's masks: layers walked as a chain in registration "
           "order, reset to all channels at a width change, every logit kept",
           locate="reference"),
    Recipe("mda+norms", "MDA's thresholds, batch norms re-estimated",
           recovery=Recovery(norms=True)),
    Recipe("mda+reconstruct", "MDA's thresholds, every layer refitted in closed form",
           recovery=Recovery(reconstruct=True)),
    Recipe("searched+norms", "the best thresholds within 50% of the source's MACs, "
           "norms re-estimated", budget=GOAL, recovery=Recovery(norms=True)),
    Recipe("searched+reconstruct", "the best thresholds within 50% of the source's MACs, every "
           "candidate refitted in closed form", budget=GOAL,
           recovery=Recovery(reconstruct=True)),
    Recipe("cost-aware", "searched+reconstruct with conv thresholds growing with what a channel "
           "costs (cost exponent 0.5): high-resolution layers give up channels first",
           budget=GOAL, recovery=Recovery(reconstruct=True), cost_exponents=(COST_EXPONENT,)),
    Recipe("mda-channels", "the searched+reconstruct and cost-aware searches both, on the same "
           "calibration images: the more accurate choice wins (ties: the lower loss there); "
           "the channels MDA's thresholds keep (the default before channel selection)",
           budget=GOAL, recovery=Recovery(reconstruct=True),
           cost_exponents=(0.0, COST_EXPONENT)),
    Recipe("default", "mda-channels, with the channels of every group only one layer reads "
           "chosen by what that layer loses (block OBS over calibration images; MDA's "
           "thresholds still say how many)",
           budget=GOAL, recovery=Recovery(reconstruct=True, select=True),
           cost_exponents=(0.0, COST_EXPONENT)),
    Recipe("assemblable", "mda-channels, refitted also on as many images of the other classes: "
           "its logits follow the source's off the task too",
           budget=GOAL, recovery=Recovery(reconstruct=True, negatives=1.0),
           cost_exponents=(0.0, COST_EXPONENT)),
)}


def _held_out_split(profile: Profile, recipe: Recipe) -> tuple[Any, list[int]]:
    """The calibration split ``analyse`` held out of the profiled folder, or an error that says
    how to give images instead."""
    if not profile.record.get("calibration") or not profile.record.get("data"):
        raise PreconditionError(
            f"recipe {recipe.name!r} needs calibration images (dataset, indices): the profile "
            "holds no held-out split of a folder (analysed from an in-memory dataset or with "
            "holdout 0); pass calibration=(dataset, indices) disjoint from the profiled samples, "
            "or recipe='mda' for the published method without images")
    dataset, indices, _ = calibration_split(profile)
    return dataset, indices


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


def _most_accurate(results: list) -> Any:
    """Of searches run on the same task, calibration split and seed (so scored on the same
    images), the one whose choice is more accurate there; ties: the lower mean cross-entropy of
    the task logits there (the more confident on the same share of right answers), then more
    MACs, then the first. With an accuracy budget, the smaller of those that met it, else the
    more accurate."""
    if len(results) == 1:
        return results[0]
    if results[0].budget.max_acc_drop is not None:
        return min(results, key=lambda r: (0, r.candidate.macs) if r.met
                   else (1, -r.candidate.accuracy))
    return max(results, key=lambda r: (r.candidate.accuracy, -r.candidate.loss,
                                       r.candidate.macs))


def disassemble(gm: fx.GraphModule, profile: Profile, task: Sequence[Any], *,
                recipe: str | Recipe = "default", thresholds: Thresholds = Thresholds(),
                budget: Budget | None = None, cost_exponent: float | None = None,
                calibration: tuple[Any, Sequence[int]] | None = None,
                norm_images: int = 50, source: str = "model", am=None,
                progress: bool = False) -> Component:
    """The component of ``task`` made by ``recipe`` (a name in :data:`RECIPES` or a Recipe);
    ``thresholds`` are the base of its thresholds (searched recipes multiply them), ``budget``
    replaces the recipe's, and so does ``cost_exponent`` (γ of :class:`Thresholds`: the recipe
    sets it, whatever ``thresholds`` holds). Its metadata records the recipe, params, MACs and,
    when calibration images were used, its and the source's accuracy on them; with a search,
    ``component.search`` is the explored trade-off (``SearchResult``). ``calibration=None``
    with a recipe that needs images: the split ``analyse`` held out
    (``calibration_split(profile)``), as ``mdafx disassemble`` does without ``--calibrate``."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise PreconditionError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]
    if budget is not None:
        recipe = dataclasses.replace(recipe, budget=budget)
    if cost_exponent is not None:
        recipe = recipe.with_cost_exponent(cost_exponent)
    thresholds = dataclasses.replace(thresholds, cost_exponent=recipe.cost_exponents[0])
    am = am or source_analyses(gm, profile)
    if recipe.locate == "reference":
        if recipe.needs_calibration:
            raise PreconditionError("the reference recipe reproduces the authors' masks only")
        classes = resolve_classes(task, profile.class_names, len(profile.class_names))
        comp = cut(gm, profile, task, thresholds=thresholds, source=source, am=am,
                   plan=am.get(ReferencePlan(classes, thresholds)))
    elif recipe.needs_calibration:
        dataset, indices = calibration or _held_out_split(profile, recipe)
        norm_idx = first_per_class(dataset, indices, norm_images) if recipe.recovery.norms \
            else None
        exponents = recipe.cost_exponents
        results = [search_thresholds(
            gm, profile, task, dataset, indices, recipe.budget or Budget(max_acc_drop=100.0),
            recovery=recipe.recovery, norm_indices=norm_idx,
            scales=None if recipe.budget is not None else (1.0,),
            base=dataclasses.replace(thresholds, cost_exponent=float(g)),
            source=source, progress=progress, am=am) for g in exponents]
        res = _most_accurate(results)
        comp = res.component
        if len(results) > 1:  # what each γ gave, so a user can see why this one was kept
            comp.metadata["cost_exponent_choice"] = [
                {"cost_exponent": float(g), "accuracy": r.candidate.accuracy,
                 "loss": r.candidate.loss, "macs_frac": r.candidate.macs_frac,
                 "chosen": r is res} for g, r in zip(exponents, results)]
        comp.metadata["calibration"] = {"images": res.calib_images,
                                        "accuracy": res.candidate.accuracy,
                                        "loss": res.candidate.loss,
                                        "source_accuracy": res.source_accuracy}
        if recipe.budget is None:  # one candidate at the given thresholds: not a search
            comp.metadata.pop("search", None)
        else:
            comp.search = res
        comp.metadata["thresholds"] = vars(res.candidate.thresholds)
    else:
        comp = cut(gm, profile, task, thresholds=thresholds, source=source, am=am)
    comp.metadata.update(recipe={"name": recipe.name, "locate": recipe.locate,
                                 "cost_exponents": list(recipe.cost_exponents),
                                 "budget": None if recipe.budget is None else
                                 vars(recipe.budget).copy(),
                                 "recovery": vars(recipe.recovery).copy()},
                         macs=count_macs(comp.module), macs_source=count_macs(gm),
                         num_classes_source=len(profile.class_names))
    if profile.record.get("input"):
        comp.metadata["input"] = profile.record["input"]
    return comp
