"""Small classifiers for 32x32 inputs, used as MDA source models in tests and benchmarks.

All are plain ``nn.Module``s built from Conv2d / BatchNorm2d / ReLU / pooling / Linear and
``torch.flatten`` / ``+``, so ``torch.fx.symbolic_trace`` traces them without leaf overrides,
and every op they use is one MDA's channel locating can map exactly (MDA.md section 1.3).

Example:

>>> import torch, torch.fx
>>> gm = torch.fx.symbolic_trace(resnet_cifar(depth=8).eval())
>>> tuple(gm(torch.zeros(2, 3, 32, 32)).shape)
(2, 10)
>>> sum(p.numel() for p in vgg_cifar().parameters())
847850
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MdafxError
from .ir import shape_of, trace


class ModelError(MdafxError):
    """A model spec, factory or weights file cannot give the model asked for."""


_MDAFX_FACTORIES = ("tiny_cnn", "vgg_cifar", "resnet_cifar")


def _brief(e: BaseException) -> str:
    """``Type: first line of the message`` (torch's load errors run to a page)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"

__all__ = ["BasicBlock", "ResNetCifar", "TinyCNN", "VGGCifar", "resnet_cifar", "tiny_cnn",
           "vgg_cifar", "MODELS", "PRETRAINED", "build_model", "build_source", "load_weights",
           "pretrained", "pretrained_card", "save_pretrained"]


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VGGCifar(nn.Module):
    """VGG-style net: conv-BN-ReLU stages with max-pooling, then flatten -> Linear layers.

    With ``w = width``, channels ``c(k) = round(k * w)``::

        32x32: conv3x3 3->c32, conv3x3 c32->c32, maxpool2
        16x16: conv3x3 ->c64,  conv3x3 c64->c64, maxpool2
          8x8: conv3x3 ->c128, conv3x3 c128->c128, maxpool2
          4x4: conv3x3 ->c256, maxpool2
          2x2: flatten (c256 x 2 x 2 features) -> Linear -> c256 -> ReLU -> Linear -> classes

    Every conv is bias-free and followed by BatchNorm2d + ReLU. The flatten feeds a C x H x W
    tensor with H*W = 4 into the first Linear, which exercises MDA's feature -> channel mapping
    (feature f belongs to channel f // 4). About 0.85M parameters and 43M MACs at width 1.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = [max(1, round(k * width)) for k in (32, 64, 128, 256)]
        self.features = nn.Sequential(
            *_conv_bn_relu(3, c[0]), *_conv_bn_relu(c[0], c[0]), nn.MaxPool2d(2),
            *_conv_bn_relu(c[0], c[1]), *_conv_bn_relu(c[1], c[1]), nn.MaxPool2d(2),
            *_conv_bn_relu(c[1], c[2]), *_conv_bn_relu(c[2], c[2]), nn.MaxPool2d(2),
            *_conv_bn_relu(c[2], c[3]), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(c[3] * 2 * 2, c[3]), nn.ReLU(inplace=True), nn.Linear(c[3], num_classes)
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, or a 1x1-conv+BN one when the block
    changes stride or width; ReLU after the residual add."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """The CIFAR ResNet of He et al. (2016, section 4.2) with BasicBlocks.

    ``depth = 6n + 2``: a 3x3 stem conv 3->w (BN, ReLU), three stages of ``n`` BasicBlocks with
    widths w, 2w, 4w at 32x32, 16x16, 8x8 (the first block of stages 2 and 3 has stride 2 and a
    1x1-conv+BN shortcut, i.e. option B), global average pooling, flatten, Linear 4w -> classes.
    ResNet-20 at w=16: about 0.27M parameters and 41M MACs.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = width
        for i, stride in enumerate((1, 2, 2)):
            cout = width * 2**i
            blocks = [BasicBlock(cin, cout, stride)]
            blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class TinyCNN(nn.Module):
    """A ~15k-parameter CNN for quick end-to-end runs::

        32x32: conv3x3 3->16, BN, ReLU, maxpool2
        16x16: conv3x3 16->32, BN, ReLU, maxpool2
          8x8: conv3x3 32->32, BN, ReLU, maxpool2
          4x4: global average pool, flatten, Linear 32 -> classes

    Reaches roughly 60% CIFAR-10 test accuracy after a few epochs (about a minute on one core).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 16), nn.MaxPool2d(2),
            *_conv_bn_relu(16, 32), nn.MaxPool2d(2),
            *_conv_bn_relu(32, 32), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


def vgg_cifar(num_classes: int = 10, width: float = 1.0) -> VGGCifar:
    """VGG-style CIFAR net (see :class:`VGGCifar`), ~0.85M parameters at width 1."""
    return VGGCifar(num_classes, width)


def resnet_cifar(depth: int = 20, num_classes: int = 10, width: int = 16) -> ResNetCifar:
    """CIFAR ResNet-``depth`` with BasicBlocks (see :class:`ResNetCifar`)."""
    return ResNetCifar(depth, num_classes, width)


def tiny_cnn(num_classes: int = 10) -> TinyCNN:
    """A ~15k-parameter conv-BN-ReLU net (see :class:`TinyCNN`)."""
    return TinyCNN(num_classes)


# Architectures by the names tools use (``--models vgg,resnet20``).
MODELS = {
    "vgg": vgg_cifar,
    "resnet20": lambda num_classes=10: resnet_cifar(20, num_classes),
    "tiny": tiny_cnn,
}


# Building models from a spec (the CLI's --model/--model-arg/--weights).

def _resolve_factory(spec: str) -> Callable[..., Any]:
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ModelError(f"--model {spec}: expected package.module:callable")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            obj = importlib.import_module(module_name)
        except SystemExit as e:
            raise ModelError(f"--model {spec}: importing {module_name!r} called "
                             f"sys.exit({e.code!r})") from e
        except Exception as e:  # ImportError, or whatever the module raises on import
            raise ModelError(f"--model {spec}: cannot import {module_name!r}: {_brief(e)}") from e
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ModelError(f"--model {spec}: {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise ModelError(f"--model {spec}: {attr!r} is not callable")
        return obj
    if spec in _MDAFX_FACTORIES:
        return globals()[spec]
    if spec in MODELS:
        return MODELS[spec]
    import torchvision

    if spec in torchvision.models.list_models(module=torchvision.models):
        return functools.partial(torchvision.models.get_model, spec, weights=None)
    known = ", ".join(sorted({*_MDAFX_FACTORIES, *MODELS}))
    raise ModelError(f"--model {spec}: unknown model; use an embedded trained model "
                     f"({', '.join(PRETRAINED)}), a torchvision classifier name (e.g. resnet18), "
                     f"an mdafx model ({known}) or package.module:callable")


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(spec: str, num_classes: int | None = None, model_args=(),
                weights: str | None = None):
    """An ``nn.Module`` in eval mode from ``--model``, ``--model-arg``, ``--num-classes`` and
    ``--weights`` (module docstring). An embedded model (:data:`PRETRAINED`) comes with its
    trained weights; ``weights`` then replaces them (same architecture)."""
    if spec in PRETRAINED:
        return _build_pretrained(spec, num_classes, model_args, weights)
    factory = _resolve_factory(spec)
    kwargs = dict(model_args)
    if num_classes is not None and "num_classes" not in kwargs and _accepts(factory, "num_classes"):
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except SystemExit as e:  # a factory must not end mdafx (and never with exit 0)
        raise ModelError(f"--model {spec}: the factory called sys.exit({e.code!r})") from e
    except Exception as e:
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelError(f"--model {spec}: calling it with ({call}) failed: {_brief(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"--model {spec}: returned a {type(model).__name__}, not a torch nn.Module")
    if weights is not None:
        load_weights(model, weights, spec)
    return model.eval()


def _build_pretrained(spec: str, num_classes: int | None, model_args, weights: str | None):
    if model_args:
        raise ModelError(f"--model {spec} is an embedded trained model: its architecture is "
                         "fixed, so it takes no --model-arg")
    classes = pretrained_card(spec)["classes"]
    if num_classes is not None and num_classes != len(classes):
        raise ModelError(f"--model {spec} classifies the {len(classes)} CIFAR-10 classes "
                         f"({', '.join(classes)}), not {num_classes}; its data needs one folder "
                         "per class, named like them")
    model = pretrained(spec)
    if weights is not None:
        load_weights(model, weights, spec)
    return model


def build_source(spec: str, num_classes: int | None, model_args, weights: str | None,
                 input_format) -> torch.fx.GraphModule:
    """The source model of ``spec`` (:func:`build_model`) traced for ``input_format`` (an
    ``mdafx.data.InputFormat``), checked to output ``[batch, num_classes]`` logits (any width
    when ``num_classes`` is None). User code that fails or calls ``sys.exit`` while it is traced
    and run on the example input is a :class:`ModelError`."""
    model = build_model(spec, num_classes, model_args, weights)
    example = input_format.example()
    try:
        gm = trace(model, example)
    except SystemExit as e:
        raise ModelError(f"--model {spec}: its forward called sys.exit({e.code!r})") from e
    except MdafxError:
        raise
    except Exception as e:  # the traced graph failed on the example input
        raise ModelError(f"--model {spec}: running it on a {tuple(example.shape)} input "
                         f"failed: {_brief(e)}") from e
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    shape = shape_of(out) if hasattr(out, "meta") else None
    if shape is None or len(shape) != 2:
        raise ModelError(f"--model {spec}: the output is {shape or 'not a tensor'}, not "
                         f"[batch, classes] logits")
    if num_classes is not None and shape[1] != num_classes:
        raise ModelError(f"--model {spec} outputs {shape[1]} logits but there are {num_classes} "
                         f"classes; pass --num-classes (or --model-arg) to match")
    return gm


def load_weights(model, path: str | os.PathLike, spec: str = "the model") -> None:
    """Load a ``state_dict`` file (``torch.save``, read with ``weights_only=True``, or a
    ``.safetensors`` file) into ``model``, naming the first key that does not fit."""
    path = Path(path)
    _fit_state(model, _read_state(path), path, spec)


def _read_state(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found" if not path.exists()
                       else f"{path}: weights path is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path}: cannot read the weights (corrupt, truncated, or not a "
                       f"torch.save file of tensors): {_brief(e)}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state_dict (a dict of tensors); got "
                       f"{type(state).__name__}")
    return state


def _fit_state(model, state: dict, path: Path, spec: str) -> None:
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    hint = "check --model, --model-arg and --num-classes"
    for key, want in expected.items():
        if key not in state:
            raise ModelError(f"{path}: weights do not fit --model {spec}: key {key!r} "
                           f"(shape {list(want.shape)}) is missing from the file; {hint}")
        if tuple(state[key].shape) != tuple(want.shape):
            raise ModelError(f"{path}: weights do not fit --model {spec}: {key!r} has shape "
                           f"{list(state[key].shape)} in the file but {list(want.shape)} in the "
                           f"model; {hint}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ModelError(f"{path}: tensor {bad[0]!r} holds NaN or infinite values")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ModelError(f"{path}: weights do not fit --model {spec}: the file has key "
                       f"{extra[0]!r} that the model lacks; {hint}")
    # float16 storage (the embedded sources) is widened to the model's float32 here
    model.load_state_dict({k: v.to(expected[k].dtype) if v.is_floating_point() else v
                           for k, v in state.items()}, strict=True)


# ============================================================================ embedded sources
#
# Two CIFAR-10 classifiers ship inside the package (mdafx/sources/, package data), so that a new
# user has a trained source model without training one: ``--model cifar10-vgg`` on the command
# line, ``pretrained("cifar10-vgg")`` in Python. Each is a safetensors file of float16 weights
# (half the size; widened to float32 on load) beside a JSON card: architecture, class names,
# input format, training recipe and the test accuracy measured *after* that round trip.

SOURCES_DIR = Path(__file__).resolve().parent / "sources"
PRETRAINED = ("cifar10-vgg", "cifar10-resnet20")
CARD_FORMAT = "mdafx-pretrained/1"
_ARCHITECTURES = {"mdafx.models.vgg_cifar": vgg_cifar, "mdafx.models.resnet_cifar": resnet_cifar,
                  "mdafx.models.tiny_cnn": tiny_cnn}


def _card_path(name: str) -> Path:
    if name not in PRETRAINED:
        raise ModelError(f"{name!r} is not an embedded model; there are: {', '.join(PRETRAINED)}")
    return SOURCES_DIR / f"{name.replace('-', '_')}.json"


def pretrained_card(name: str) -> dict[str, Any]:
    """The card of embedded model ``name`` (one of :data:`PRETRAINED`): ``architecture``
    (``factory``, ``kwargs``), ``classes``, ``input`` (an ``InputFormat.to_dict()``),
    ``recipe``, ``weights`` (file, storage dtype, sha256) and ``test_accuracy``.

    >>> card = pretrained_card("cifar10-vgg")
    >>> card["classes"][:3], card["input"]["size"], card["weights"]["dtype"]
    (['airplane', 'automobile', 'bird'], [32, 32], 'float16')
    """
    import json

    path = _card_path(name)
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: the card of embedded model {name} cannot be read (is the "
                         f"package installed with its data?): {_brief(e)}") from e
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ModelError(f"{path}: not an {CARD_FORMAT} card")
    return card


def pretrained_input(spec: str | None) -> dict | None:
    """The input format (``InputFormat.to_dict()``) an embedded model's card records, None for
    any other ``--model``: the CLI's default for ``--input-size/--mean/--std``."""
    return pretrained_card(spec)["input"] if spec in PRETRAINED else None


def pretrained(name: str) -> nn.Module:
    """Embedded CIFAR-10 source ``name`` (``cifar10-vgg``, ``cifar10-resnet20``) with its
    trained weights, in eval mode; its card (:func:`pretrained_card`) says how it was trained,
    what it takes and how well it does. The weights file is checked against the card's sha256.
    """
    import hashlib

    card = pretrained_card(name)
    arch, weights = card["architecture"], card["weights"]
    factory = _ARCHITECTURES.get(arch.get("factory"))
    if factory is None:
        raise ModelError(f"{_card_path(name)}: unknown architecture {arch.get('factory')!r}")
    path = SOURCES_DIR / weights["file"]
    if not path.is_file():
        raise ModelError(f"{path}: the weights of embedded model {name} are missing (is the "
                         "package installed with its data?)")
    if hashlib.sha256(path.read_bytes()).hexdigest() != weights["sha256"]:
        raise ModelError(f"{path}: the weights of embedded model {name} do not match the "
                         "sha256 on its card (a damaged install: reinstall mdafx)")
    model = factory(**arch["kwargs"])
    _fit_state(model, _read_state(path), path, name)
    return model.eval()


def save_pretrained(model: nn.Module, name: str, card: dict[str, Any],
                    directory: str | os.PathLike = SOURCES_DIR,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model``'s weights as ``<directory>/<name>.safetensors`` (floating tensors stored
    as ``dtype``) and ``card`` (plus ``format`` and ``weights``) as ``<name>.json`` beside it,
    both atomically; returns the card's path. How the embedded sources were made."""
    import hashlib
    import json

    from safetensors.torch import save_file

    from .fileio import atomic_output

    stem = name.replace("-", "_")
    directory = Path(directory)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    weights = directory / f"{stem}.safetensors"
    with atomic_output(weights, overwrite=True) as tmp:
        save_file(state, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    card = {"format": CARD_FORMAT, "name": name, **card,
            "weights": {"file": weights.name, "dtype": str(dtype).removeprefix("torch."),
                        "sha256": digest}}
    card_path = directory / f"{stem}.json"
    with atomic_output(card_path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return card_path
