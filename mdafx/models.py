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

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNetCifar", "TinyCNN", "VGGCifar", "resnet_cifar", "tiny_cnn",
           "vgg_cifar", "MODELS"]


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
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
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
