"""Models for whole-model property tests: torchvision classifiers with random weights that make
every channel matter (torchvision's own init zeroes some heads, which would hide errors)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torchvision

from mdafx import api
from mdafx.passes.contributions import class_contributions

# name -> (constructor kwargs, input size)
CI_ZOO = {
    "resnet18": ({}, 32),
    "vgg11_bn": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "densenet121": ({}, 32),
    "googlenet": ({"aux_logits": False, "init_weights": False}, 32),
    "shufflenet_v2_x0_5": ({}, 32),
    "convnext_tiny": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "squeezenet1_1": ({}, 32),
    "regnet_x_400mf": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with fan-in scaling, non-trivial norm statistics and scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / max(fan_in, 1)))
            elif name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def calibrate_norms_(model: nn.Module, example: torch.Tensor, seed: int = 0) -> nn.Module:
    """Set BatchNorm running statistics to the batch statistics of random inputs, as training
    would: without it, deep random nets have activations that grow layer after layer until
    float32 rounding alone makes two equal computations disagree."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn((4, *example.shape[1:]), generator=g))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def build(name: str, seed: int = 0, num_classes: int = 10) -> tuple[nn.Module, torch.Tensor]:
    kwargs, size = CI_ZOO.get(name, ({}, 64))
    model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    randomize_(model, seed)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return calibrate_norms_(model, example, seed), example


ZOO_CLASS_NAMES = [f"c{i}" for i in range(10)]


def random_component(name: str, task, seed: int = 0, size: int | None = None, fmt=None):
    """A component of a random-weight zoo model for ``task``, located on 20 random images
    (2 per class): enough to exercise assembly, not a trained model. ``size`` changes the input
    size, ``fmt`` (an InputFormat) is recorded as the component's input format."""
    model, example = build(name, seed=seed)
    if size is not None:
        example = torch.randn(1, 3, size, size)
    gm = api.trace(model, example)
    x = torch.randn(20, *example.shape[1:], generator=torch.Generator().manual_seed(seed))
    contributions = class_contributions(gm, [(x, torch.arange(20) % 10)], 10, progress=False)
    comp = api.cut(gm, contributions, task, source=f"{name}#{seed}", class_names=ZOO_CLASS_NAMES)
    if fmt is not None:
        comp.metadata["input"] = fmt.to_dict()
    return comp
