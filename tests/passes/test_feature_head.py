"""passes/feature_head.py: the closed-form (LDA) head and InsertFeatureHead on assembled graphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from mdafx import api
from mdafx.assembly import Calibration, assemble, fit_calibration
from mdafx.data import ArrayDataset, InputFormat
from mdafx.errors import DataError, PreconditionError
from mdafx.ir import trace
from mdafx.passes.feature_head import HEAD, features_module, fit_head, head_input
from zoo import ZOO_CLASS_NAMES as NAMES, random_component as component


def gaussian_classes(n_per_class=40, dims=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(classes, dims, generator=g)
    mix = torch.randn(dims, dims, generator=g)
    x = torch.cat([means[c] + torch.randn(n_per_class, dims, generator=g) @ mix
                   for c in range(classes)])
    scale = torch.linspace(0.1, 10.0, dims)  # features on different scales: standardised first
    return x * scale, torch.arange(classes).repeat_interleave(n_per_class)


@pytest.mark.parametrize("shrinkage", [0.05, 0.1, 1.0])
def test_head_logits_are_the_gaussian_posterior(shrinkage):
    """softmax(W f + b) equals the posterior of Gaussian classes with the shrunk pooled
    covariance and equal priors, computed independently (numpy, log densities)."""
    f, y = gaussian_classes()
    weight, bias = fit_head(f, y, 3, shrinkage)
    logits = f @ weight.T + bias
    z = (f.double().numpy() - f.double().numpy().mean(0)) / f.double().numpy().std(0)
    means = np.stack([z[y.numpy() == c].mean(0) for c in range(3)])
    resid = z - means[y.numpy()]
    cov = resid.T @ resid / len(z)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    dist = [torch.distributions.MultivariateNormal(torch.as_tensor(m), torch.as_tensor(cov))
            for m in means]
    log_density = torch.stack([d.log_prob(torch.as_tensor(z)) for d in dist], 1)
    torch.testing.assert_close(torch.softmax(logits.double(), 1),
                               torch.softmax(log_density, 1), atol=1e-4, rtol=1e-4)
    assert (logits.argmax(1) == y).float().mean() > 0.9  # the fitted head separates them


def test_constant_features_get_no_weight_and_degenerate_data_is_refused():
    f, y = gaussian_classes()
    f[:, 2] = 7.0
    weight, bias = fit_head(f, y, 3)
    assert torch.equal(weight[:, 2], torch.zeros(3)) and bool(torch.isfinite(bias).all())
    with pytest.raises(DataError, match="every class"):
        fit_head(f[y < 2], y[y < 2], 3)
    with pytest.raises(DataError, match="constant"):
        fit_head(torch.ones(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    with pytest.raises(PreconditionError, match="shrinkage"):
        fit_head(f, y, 3, shrinkage=0.0)


def random_head(comps, classes):
    width = sum(features_module(c.module)(torch.zeros(1, *c.input_shape[1:])).shape[1]
                for c in comps)
    g = torch.Generator().manual_seed(1)
    return torch.randn(classes, width, generator=g) / width, torch.randn(classes, generator=g)


@pytest.mark.parametrize("layout", ["parallel", "merged"])
def test_assembled_head_is_one_linear_over_every_branchs_features(layout):
    """Oracle: the assembled logits are ``W · cat(features_k(x)) + b`` with ``features_k`` the
    input of component k's head; a reordered task (classes 9, 1, 0) and a duplicate name (c3)
    included, which the head turns into one logit each."""
    comps = [component("resnet18", [3, 5]), component("resnet18", [9, 3, 0], seed=1)]
    weight, bias = random_head(comps, 4)
    asm = assemble(comps, Calibration("head", head=(weight, bias)), layout=layout)
    assert asm.class_names == ["c3", "c5", "c9", "c0"]
    x = torch.randn(3, *comps[0].input_shape[1:])
    with torch.no_grad():
        feats = torch.cat([features_module(c.module)(x) for c in comps], 1)
        want = feats @ weight.T + bias
        got = asm(x)
    assert got.shape == (3, 4)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    heads = [n for n in asm.module.graph.nodes if n.op == "call_module" and n.target == HEAD]
    assert len(heads) == 1 and "scales" not in asm.metadata
    if layout == "merged":
        assert all(n.target.startswith("merged.") or n.target == HEAD
                   for n in asm.module.graph.nodes if n.op == "call_module")


def test_head_over_branches_of_different_input_formats():
    """Each branch's features are computed on its own input format (the adapters stay in
    front of the branch bodies), as fit_calibration reads them."""
    fmt_a = InputFormat((32, 32), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    fmt_b = InputFormat((48, 48), 3, (0.4, 0.45, 0.5), (0.2, 0.2, 0.2))
    a = component("resnet18", [2, 4], fmt=fmt_a)
    b = component("mobilenet_v3_small", [6, 7], seed=1, size=48, fmt=fmt_b)
    weight, bias = random_head([a, b], 4)
    asm = assemble([a, b], Calibration("head", head=(weight, bias)))
    pixels = torch.rand(2, 3, 32, 32)
    norm = lambda p, f: (p - torch.tensor(f.mean).view(1, 3, 1, 1)) / torch.tensor(f.std).view(1, 3, 1, 1)
    x_b = torch.nn.functional.interpolate(pixels, size=(48, 48), mode="bilinear",
                                          align_corners=False)
    with torch.no_grad():
        feats = torch.cat([features_module(a.module)(norm(pixels, fmt_a)),
                           features_module(b.module)(norm(x_b, fmt_b))], 1)
        got = asm(norm(pixels, fmt_a))
    want = feats @ weight.T + bias
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_a_head_needs_logits_from_a_linear():
    """SqueezeNet's logits come from a conv and a pooling: no feature head, and the error names
    the node (the logit calibrations still work there)."""
    comps = [component("squeezenet1_1", [3, 5]), component("squeezenet1_1", [9, 1], seed=1)]
    with pytest.raises(PreconditionError, match="not one .*joint"):
        head_input(comps[0].module)
    with pytest.raises(PreconditionError, match="feature head of 3 classes"):
        assemble([component("resnet18", [3, 5]), component("resnet18", [9, 1], seed=1)],
                 Calibration("head", head=(torch.zeros(3, 8), torch.zeros(3))))
    assemble(comps, Calibration.scaling([torch.ones(2), torch.ones(2)]))


def test_fit_calibration_head_orders_rows_by_class_name_and_needs_every_class():
    comps = [component("resnet18", [3, 5]), component("resnet18", [9, 3], seed=1)]
    g = torch.Generator().manual_seed(0)
    labels = np.array([3, 5, 9, 1] * 6)
    pixels = torch.randint(0, 256, (len(labels), 32, 32, 3), generator=g, dtype=torch.uint8)
    data = ArrayDataset(pixels.numpy(), labels, class_names=NAMES)
    cal = fit_calibration(comps, data, method="head")
    assert cal.method == "head" and cal.head[0].shape[0] == 3  # c3, c5, c9
    assert cal.record["images"] == 18  # the images of class 1 are not the assembly's
    assert fit_calibration(comps, data, range(8), method="head").record["images"] == 6
    asm = assemble(comps, cal)
    with torch.no_grad():
        x = data[0][0][None]
        feats = torch.cat([features_module(c.module)(x) for c in comps], 1)
        torch.testing.assert_close(asm(x), feats @ cal.head[0].T + cal.head[1])
    missing = ArrayDataset(pixels.numpy()[labels != 9], labels[labels != 9], class_names=NAMES)
    with pytest.raises(DataError, match="no image of class.*c9"):
        fit_calibration(comps, missing, method="head")


def test_features_module_keeps_the_graph_up_to_the_head():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    gm = trace(net, torch.zeros(1, 4))
    feats = features_module(gm)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(feats(x), net[1](net[0](x)))
        torch.testing.assert_close(gm(x), net(x))  # the original is untouched
