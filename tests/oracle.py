"""The exactness oracle shared by rule, pass and zoo tests (MDA.md §1.4)."""
from __future__ import annotations

import torch

from mdafx.api import channel_groups, masked_model, plan_random, prune, trace
from mdafx.ir import count_params


def prune_and_mask(model, example, density, seed=0, classes=None, strict=False):
    gm = trace(model, example)
    cg = channel_groups(gm, strict=strict)
    plan = plan_random(cg, density, seed=seed, classes=classes)
    return gm, cg, plan, prune(gm, plan, cg=cg), masked_model(gm, plan, cg)


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    assert scale > 0, "oracle output is all zero: the test could not fail"
    return (a - b).abs().max().item() / scale


def assert_exact(model, example, density, seed=0, classes=None, tol=1e-4, batch=2):
    gm, cg, plan, pruned, masked = prune_and_mask(model, example, density, seed, classes)
    x = torch.randn((batch, *example.shape[1:]), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        got, want = pruned(x), masked(x)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = max_rel_error(got, want)
    assert err <= tol, f"pruned differs from masked model by {err:.3g} (relative)"
    assert count_params(pruned) <= count_params(gm)
    return gm, cg, plan, pruned, err


def seeded(model_or_cls, seed=0):
    """A module (or a class built with no arguments) in eval mode, with random norm statistics
    and affine parameters, so that no channel is left at an identity that could hide an error."""
    import torch.nn as nn

    torch.manual_seed(seed)
    m = model_or_cls() if isinstance(model_or_cls, type) else model_or_cls
    m.eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
            if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(mod, "weight", None) is not None:
                    mod.weight.uniform_(0.5, 1.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.normal_(0, 0.2)
    return m


def cbr(i, o, **kw):
    """Conv 3×3 (padding 1) -> BatchNorm -> ReLU."""
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, **kw), nn.BatchNorm2d(o), nn.ReLU())


DENSITIES = (1.0, 0.6, 0.25)


def traced_groups(model_or_cls, example):
    """``(gm, channel groups)`` of the seeded model (:func:`seeded`) traced on ``example``."""
    gm = trace(seeded(model_or_cls), example)
    return gm, channel_groups(gm)


def pruned_equals_masked_test(modules, example, classes=(4, 0, 2)):
    """The per-family exactness table: a test, parametrised over ``modules`` (classes),
    :data:`DENSITIES` and two seeds, that the pruned model equals the masked one
    (:func:`assert_exact`). A rule test file binds it as ``test_pruned_equals_masked``."""
    import pytest

    @pytest.mark.parametrize("cls", modules, ids=lambda c: c.__name__)
    @pytest.mark.parametrize("density", DENSITIES)
    @pytest.mark.parametrize("seed", [0, 1])
    def test(cls, density, seed):
        assert_exact(seeded(cls, seed), example, density, seed=seed, classes=list(classes))

    return test
