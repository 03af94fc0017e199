"""mdafx/disassembly.py: cutting components (MDA.md §1.3-1.4) out of torchvision models with
random weights.

Per model: contributions from 2 random inputs per class (passes.contributions), locate with the
default thresholds, then cut the component of a 2-class task given in non-sorted order. The
component must equal the masked-model oracle of the same plan (rebuilt independently from the
votes) on the task's logits, in the task's order, and be smaller than the source.
"""
from __future__ import annotations

import pytest
import torch

from mdafx.api import (channel_groups, cut, locate, masked_model, plan_from_votes,
                       resolve_classes, source_analyses, trace)
from mdafx.errors import PreconditionError
from mdafx.ir import count_params
from models.zoo import build
from oracle import max_rel_error
from mdafx.passes.contributions import class_contributions

NUM_CLASSES = 10
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TASK = [7, 2]                     # deliberately not sorted: logits must come out in this order
MODELS = ["resnet18", "mobilenet_v3_small", "densenet121"]
TOL = 1e-4                        # max |component - masked| / max |masked|


class Located:
    def __init__(self, name: str):
        model, example = build(name, num_classes=NUM_CLASSES)
        self.gm = trace(model, example)
        self.cg = channel_groups(self.gm)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2 * NUM_CLASSES, *example.shape[1:], generator=g)
        y = torch.arange(NUM_CLASSES).repeat(2)
        self.A = class_contributions(self.gm, [(x, y)], NUM_CLASSES, progress=False)
        self.am = source_analyses(self.gm, self.A, self.cg)
        self.masks = locate(self.gm, self.A, am=self.am)
        self.x = torch.randn(3, *example.shape[1:], generator=g)


_CACHE: dict[str, Located] = {}


def located(name: str) -> Located:
    """Built once per test session (the three together hold about 20M parameters)."""
    if name not in _CACHE:
        _CACHE[name] = Located(name)
    return _CACHE[name]


@pytest.mark.parametrize("name", MODELS)
def test_component_equals_masked_model(name):
    m = located(name)
    with torch.no_grad():
        before = m.gm(m.x)
    comp = cut(m.gm, m.A, TASK, am=m.am)
    plan = plan_from_votes(m.cg, m.masks.votes(TASK), TASK)
    oracle = masked_model(m.gm, plan, m.cg)
    with torch.no_grad():
        got, want, after = comp(m.x), oracle(m.x), m.gm(m.x)
    assert got.shape == (m.x.shape[0], len(TASK))
    assert comp.classes == TASK
    err = max_rel_error(got, want)
    assert err <= TOL, f"{name}: component differs from the masked model by {err:.3g}"
    # the two logits are not interchangeable: swapping them would not pass
    assert max_rel_error(got.flip(1), want) > 10 * TOL
    # it really pruned: fewer parameters than the source, and some channels dropped
    assert comp.params < count_params(m.gm)
    assert comp.metadata["channels_kept"] < comp.metadata["channels_total"]
    assert comp.metadata["params"] == comp.params
    # the source is left untouched
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", MODELS)
def test_task_by_class_names(name):
    m = located(name)
    by_index = cut(m.gm, m.A, TASK, am=m.am)
    by_name = cut(m.gm, m.A, [NAMES[c] for c in TASK], class_names=NAMES, am=m.am)
    assert by_name.classes == TASK
    assert by_name.class_names == ["horse", "bird"]
    assert by_index.class_names == ["7", "2"]
    # the same component: same graph, same weights
    assert by_name.module.code == by_index.module.code
    a, b = by_name.module.state_dict(), by_index.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_tasks_name_the_bad_class():
    m = located("mobilenet_v3_small")
    with pytest.raises(PreconditionError, match="zebra"):
        cut(m.gm, m.A, ["horse", "zebra"], class_names=NAMES, am=m.am)
    with pytest.raises(PreconditionError, match="zebra"):        # names without class_names
        cut(m.gm, m.A, ["zebra"], am=m.am)
    with pytest.raises(PreconditionError, match="repeats.*bird"):
        cut(m.gm, m.A, ["bird", "horse", "bird"], class_names=NAMES, am=m.am)
    with pytest.raises(PreconditionError, match="repeats"):
        cut(m.gm, m.A, [7, 2, 7], am=m.am)
    with pytest.raises(PreconditionError, match="10"):
        cut(m.gm, m.A, [2, 10], am=m.am)
    with pytest.raises(PreconditionError):
        cut(m.gm, m.A, [], am=m.am)
    assert resolve_classes(["ship", 0, "#3"], NAMES, NUM_CLASSES) == [8, 0, 3]
    with pytest.raises(PreconditionError, match="write #3"):   # a digit string is a name
        resolve_classes(["3"], NAMES, NUM_CLASSES)


def test_numeric_class_names_are_names():
    """Folders named 1, 2, 3: '1' is the class named 1 (index 0), '#1' is index 1."""
    names = ["1", "2", "3"]
    assert resolve_classes(["1", "3"], names, 3) == [0, 2]
    assert resolve_classes(["#1", 2], names, 3) == [1, 2]
    with pytest.raises(PreconditionError, match="'4'"):
        resolve_classes(["4"], names, 3)


def test_more_classes_never_keep_fewer_channels():
    """The kept set is the OR of per-class masks, so growing the task only adds channels.
    Compared on the prunable groups that are not logits (those follow the task by design)."""
    m = located("mobilenet_v3_small")
    logit_roots = m.cg.forest.find(m.cg.ids[m.cg.output]).reshape(-1)
    body = m.cg.prunable_roots()
    body = body[~torch.isin(body, logit_roots)]
    tasks = [[7], [7, 2], [7, 2, 5, 0], list(range(NUM_CLASSES))]
    prev_keep, prev_params, kept = None, None, []
    for task in tasks:
        plan = plan_from_votes(m.cg, m.masks.votes(task), task)
        keep = plan.keep[body]
        params = cut(m.gm, m.A, task, am=m.am).params
        if prev_keep is not None:
            lost = int((prev_keep & ~keep).sum())
            assert lost == 0, f"task {task} drops {lost} channels that a smaller task keeps"
            assert params >= prev_params
        kept.append(int(keep.sum()))
        prev_keep, prev_params = keep, params
    assert kept[0] < kept[-1], kept        # the tasks really differ
