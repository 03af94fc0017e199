"""mdafx/recipes.py and the guard rails (mdafx/evaluation.guard) on a tiny trained model."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mdafx.api import RECIPES, Budget, Thresholds, cut, disassemble, guard, search_thresholds
from mdafx.errors import PreconditionError
from mdafx.search import Recovery
from test_search import SCALES, TASK, setup


def test_every_recipe_makes_a_working_component():
    gm, prof, train, _, calib, _ = setup()
    for name in RECIPES:
        comp = disassemble(gm, prof, TASK, recipe=name, calibration=(train, calib))
        assert comp.metadata["recipe"]["name"] == name
        x = torch.randn(2, 3, 16, 16)
        assert comp(x).shape == (2, len(comp.classes))
        assert comp.metadata["macs"] <= comp.metadata["macs_source"]
    ref = disassemble(gm, prof, TASK, recipe="reference")
    assert ref.classes == [0, 1, 2, 3] and ref.metadata["task"] == TASK   # every logit kept


def test_recipes_needing_images_say_so():
    gm, prof, *_ = setup()
    with pytest.raises(PreconditionError, match="needs calibration images"):
        disassemble(gm, prof, TASK, recipe="default")
    with pytest.raises(PreconditionError, match="unknown recipe"):
        disassemble(gm, prof, TASK, recipe="magic")


def test_reconstruction_recovers_what_mda_loses_on_calibration_images():
    gm, prof, train, _, calib, test = setup()
    plain = disassemble(gm, prof, TASK, recipe="mda", thresholds=Thresholds().scaled(2.0))
    rebuilt = disassemble(gm, prof, TASK, recipe="mda+reconstruct",
                          thresholds=Thresholds().scaled(2.0), calibration=(train, calib))
    g_plain = guard(plain, gm, (test, range(len(test))))
    g_rebuilt = guard(rebuilt, gm, (test, range(len(test))))
    assert g_rebuilt.accuracy > g_plain.accuracy   # held-out images the fit never saw


def test_negatives_make_the_component_follow_the_source_off_its_task():
    """``assemblable`` also fits on the other classes' images: there its logits are closer to
    the source's task logits than mda-channels' (same thresholds, same task images)."""
    from mdafx.evaluation import logits_of
    from mdafx.search import load_images

    gm, prof, train, _, calib, test = setup()
    others = [i for i in range(len(test)) if int(test.labels[i]) not in TASK]
    x = load_images(test, others, 64)
    target = logits_of(gm, x)[:, TASK]
    error = {}
    for name in ("mda-channels", "assemblable"):
        # the given thresholds, one γ: the two differ by the negatives only
        recipe = dataclasses.replace(RECIPES[name], budget=None).with_cost_exponent(0.0)
        comp = disassemble(gm, prof, TASK, recipe=recipe, calibration=(train, calib),
                           thresholds=Thresholds().scaled(2.0))
        error[name] = float((logits_of(comp.module, x) - target).pow(2).mean())
    assert error["assemblable"] < 0.8 * error["mda-channels"]


def test_bisect_finds_what_the_scan_finds_on_a_monotone_trade_off():
    gm, prof, train, _, calib, _ = setup()
    args = (gm, prof, TASK, train, calib, Budget(max_acc_drop=2.0))
    rec = Recovery(reconstruct=True)
    scan = search_thresholds(*args, scales=SCALES, recovery=rec, strategy="scan", score_all=True)
    bisect = search_thresholds(*args, scales=SCALES, recovery=rec, strategy="bisect")
    accs = [c.accuracy for c in sorted((c for c in scan.candidates if c.same_as is None),
                                       key=lambda c: c.macs)]
    if accs == sorted(accs):   # the property bisection assumes
        assert bisect.candidate.scale == scan.candidate.scale
    assert bisect.scored <= scan.scored and bisect.cost_ratio > 0


def test_guard_rails_fire_on_a_degenerate_component():
    gm, prof, train, _, calib, _ = setup()
    comp = cut(gm, prof, TASK)
    with torch.no_grad():  # make it always answer the task's first class
        head = [m for m in comp.module.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([1.0, 0.0]))
    report = guard(comp, gm, (train, calib))
    assert any("never predicts" in w for w in report.warnings)
    assert any("points" in w for w in report.warnings)
    healthy = guard(cut(gm, prof, TASK, thresholds=Thresholds().scaled(0.1)), gm,
                    (train, calib))
    assert healthy.warnings == [] and len(healthy.per_class) == 2


def test_the_recipe_sets_the_cost_exponent_and_the_caller_can_replace_it():
    gm, prof, train, _, calib, _ = setup()
    aware = disassemble(gm, prof, TASK, recipe="cost-aware", calibration=(train, calib))
    assert aware.metadata["recipe"]["cost_exponents"] == [RECIPES["cost-aware"].cost_exponent]
    assert RECIPES["cost-aware"].cost_exponent > 0
    assert aware.metadata["thresholds"]["cost_exponent"] == RECIPES["cost-aware"].cost_exponent
    plain = disassemble(gm, prof, TASK, recipe="mda", thresholds=Thresholds(cost_exponent=1.0))
    assert plain.metadata["recipe"]["cost_exponents"] == [0.0]  # "mda": the method as published
    assert plain.metadata["thresholds"] == dataclasses.asdict(Thresholds())
    ours = disassemble(gm, prof, TASK, recipe="mda", cost_exponent=1.0)
    assert ours.metadata["recipe"]["cost_exponents"] == [1.0]
    with pytest.raises(PreconditionError, match="reference"):
        disassemble(gm, prof, TASK, recipe="reference", cost_exponent=0.5)


def test_both_searches_keep_the_more_accurate():
    """Both searches score on the same calibration images; the winner is the more accurate
    (ties: the lower loss there), and its γ is what the component's thresholds record."""
    gm, prof, train, _, calib, _ = setup()
    both = {name: disassemble(gm, prof, TASK, recipe=name, calibration=(train, calib))
            for name in ("searched+reconstruct", "cost-aware", "mda-channels")}
    seen = {n: c.metadata["calibration"] for n, c in both.items()}
    want = max(("searched+reconstruct", "cost-aware"),
               key=lambda n: (seen[n]["accuracy"], -seen[n]["loss"]))
    assert seen["mda-channels"] == seen[want]
    choice = both["mda-channels"].metadata["cost_exponent_choice"]   # both searches, recorded
    assert [c["cost_exponent"] for c in choice] == list(RECIPES["mda-channels"].cost_exponents)
    assert sum(c["chosen"] for c in choice) == 1
    kept = next(c for c in choice if c["chosen"])
    assert (kept["accuracy"], kept["loss"]) == (seen[want]["accuracy"], seen[want]["loss"])
    assert "cost_exponent_choice" not in both["cost-aware"].metadata
    assert both["mda-channels"].metadata["macs"] == both[want].metadata["macs"]
    assert both["mda-channels"].metadata["thresholds"]["cost_exponent"] == \
        both[want].metadata["thresholds"]["cost_exponent"]
    default = disassemble(gm, prof, TASK, calibration=(train, calib))   # + channel selection
    assert default.metadata["recipe"]["name"] == "default"
    assert default.metadata["recipe"]["recovery"]["select"] is True
    assert isinstance(default.metadata["channels_selected"], int)
    assert [c["cost_exponent"] for c in default.metadata["cost_exponent_choice"]] == \
        list(RECIPES["mda-channels"].cost_exponents)
    assert RECIPES["default"] == dataclasses.replace(
        RECIPES["mda-channels"], name="default", description=RECIPES["default"].description,
        recovery=dataclasses.replace(RECIPES["mda-channels"].recovery, select=True))
    with pytest.raises(PreconditionError, match="calibration images"):
        disassemble(gm, prof, TASK, recipe=dataclasses.replace(
            RECIPES["default"], budget=None, recovery=Recovery()))


def test_most_accurate_of_searches_by_hand():
    """Size budget: the more accurate choice, ties to the lower calibration loss, then more
    MACs; accuracy budget: the smallest that met it, else the most accurate; a fixed γ
    replaces the searched ones."""
    from types import SimpleNamespace as NS

    from mdafx.recipes import _most_accurate

    def res(acc, macs, met=True, drop=None, loss=0.3):
        return NS(candidate=NS(accuracy=acc, macs=macs, loss=loss), met=met,
                  budget=Budget(max_acc_drop=drop, max_macs_frac=0.5))

    a, b = res(0.90, 10), res(0.90, 12)
    assert _most_accurate([a, b]) is b and _most_accurate([res(0.91, 10), b]).candidate.macs == 10
    sure = res(0.90, 10, loss=0.2)
    assert _most_accurate([b, sure]) is sure and _most_accurate([sure, b]) is sure
    assert _most_accurate([res(0.89, 12, loss=0.01), sure]) is sure   # accuracy first
    small, big, unmet = res(0.80, 5, drop=1.0), res(0.95, 9, drop=1.0), res(0.99, 3, False, 1.0)
    assert _most_accurate([big, unmet, small]) is small
    assert _most_accurate([res(0.7, 3, False, 1.0), unmet]) is unmet
    fixed = RECIPES["default"].with_cost_exponent(0.5)
    assert fixed.cost_exponents == (0.5,) and fixed.cost_exponent == 0.5
    assert RECIPES["default"].cost_exponent is None   # searched
    with pytest.raises(PreconditionError, match="at least one"):
        dataclasses.replace(RECIPES["default"], cost_exponents=())
