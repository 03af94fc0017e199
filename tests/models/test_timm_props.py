"""A CI subset of tools/zoo_timm.py: one timm model per idiom mdafx must handle, small inputs,
float64 (random attention stacks amplify float32 rounding). For each: traced (and checked
against eager), the expected prunable share, identity, pruned == masked at two densities;
for two of them the whole MDA path (profile -> locate -> component == masked) and ONNX."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.timm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import zoo_timm  # noqa: E402

from mdafx.api import channel_groups, masked_model, plan_random, prune, trace  # noqa: E402
from mdafx.passes.channel_groups import barrier_report  # noqa: E402

# model -> (idiom, least prunable share of conv/linear output channels)
MODELS = {
    "test_resnet": ("BatchNorm modules, residual adds", 0.99),
    "test_efficientnet": ("BatchNormAct2d -> F.batch_norm, SE gates, depthwise", 0.99),
    "lcnet_035": ("a grouped conv right on the image (the frozen-input crash)", 0.99),
    "tf_mobilenetv3_small_minimal_100": ("Conv2dSame: F.pad + F.conv2d, shape-known trace",
                                         0.99),
    "test_convnext": ("LayerNorm2d over the stream, layer scale parameters", 0.55),
    "ghostnet_050": ("cat + channel slices, F.batch_norm", 0.99),
    "test_nfnet": ("weight standardisation: in-channels genuinely kept", 0.1),
    "test_vit3": ("attention heads, class token, position embedding, timm Linear", 0.6),
    "test_vit": ("dynamic image size: shape-specialised trace", 0.6),
    "test_maxvit": ("window/grid attention, relative position tables", 0.6),
}


@pytest.fixture(scope="module")
def built():
    return {}


def _build(name):
    model, example, size = zoo_timm.build(name, [32, 64])
    return model, example


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_is_traced_prunable_and_exact(name):
    model, example = _build(name)
    gm = trace(model, example)
    cg = channel_groups(gm)
    report = barrier_report(gm, cg)
    assert report.share >= MODELS[name][1], report.lines()
    x = torch.randn(2, *example.shape[1:], dtype=example.dtype,
                    generator=torch.Generator().manual_seed(1))
    ident = prune(gm, plan_random(cg, 1.0, classes=list(range(10))), cg=cg, instruments=[])
    with torch.no_grad():
        assert zoo_timm._err(ident(x), model(x)) <= 1e-9
        for density, seed in ((0.5, 1), (0.2, 2)):
            plan = plan_random(cg, density, seed=seed, classes=[3, 1, 7])
            pruned = prune(gm, plan, cg=cg, instruments=[])
            assert zoo_timm._err(pruned(x), masked_model(gm, plan, cg)(x)) <= 1e-9, density
            assert sum(p.numel() for p in pruned.parameters()) < sum(
                p.numel() for p in gm.parameters())


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit3"])
def test_timm_mda_path_and_onnx(name):
    row = zoo_timm.run_one(name, [32], 0.5, per_class=2)
    assert row["status"] == "exact", row
    assert row["MDA err"] <= 1e-9 and row["onnx"] == "ok"
