"""passes/reference_plan.py reproduces the authors' reference algorithm on a sequential model:
layers walked backwards as a chain, MDA's α/β rule at each, the mask reset to all ones where the
widths disagree (the flatten into the Linear), every logit kept."""
from __future__ import annotations

import torch
import torch.nn as nn

from mdafx.api import cut, source_analyses, trace
from mdafx.passes.contributions import class_contributions
from mdafx.passes.locate import Thresholds, layer_input_mask
from mdafx.passes.reference_plan import ReferencePlan, reference_masks


def _seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 10), nn.ReLU(),
                         nn.Linear(10, 5)).eval()


def _authors(model, A, classes, th):
    """The reference algorithm written out on the module list, independently of mdafx."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    k = 5
    out = torch.eye(k, dtype=torch.bool)
    masks = {}
    for i in range(len(layers) - 1, -1, -1):
        name, m = layers[i]
        masks[name] = out
        if i:
            a, b = th.for_module(m)
            inp = layer_input_mask(A[name], out, 1, a, b)
            width = layers[i - 1][1].weight.shape[0]
            out = inp if inp.shape[1] == width else torch.ones(k, width, dtype=torch.bool)
    return {n: m[classes].any(0) for n, m in masks.items()}


def test_masks_and_component_follow_the_reference_algorithm():
    model = _seq()
    gm = trace(model, torch.zeros(1, 3, 6, 6))
    x, y = torch.randn(40, 3, 6, 6), torch.arange(40) % 5
    A = class_contributions(gm, [(x, y)], 5, progress=False)
    th = Thresholds()
    want = _authors(model, A, [3, 1], th)
    got = {n: m[[3, 1]].any(0) for n, m in reference_masks(gm, A, th).items()}
    names = {"0": "_0", "2": "_2", "4": "_4", "8": "_8", "10": "_10"}
    assert {names[k]: v.tolist() for k, v in want.items()} == {k: v.tolist()
                                                              for k, v in got.items()}
    assert bool(got["_4"].all())           # the reset at the flatten: the last conv keeps all
    am = source_analyses(gm, A)
    comp = cut(gm, A, [3, 1], am=am, plan=am.get(ReferencePlan([3, 1], th)))
    assert comp.classes == [0, 1, 2, 3, 4] and comp.metadata["task"] == [3, 1]  # every logit
    widths = [m.weight.shape[0] for m in comp.module.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert widths == [int(want[k].sum()) for k in ("0", "2", "4", "8")] + [5]
