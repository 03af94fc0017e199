"""Conv and linear rules (mdafx/rules/conv.py): modules and functional forms, grouped convs on
frozen inputs, subclasses, shared weights. Each case: pruned == masked at several densities."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdafx.api import channel_groups, trace
from oracle import assert_exact, cbr, pruned_equals_masked_test, seeded, traced_groups

X = torch.randn(1, 3, 8, 8)


class GroupedAndDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, groups=16)
        self.dw_mult = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.bn(self.dw_mult(F.relu(self.dw(self.grouped(self.a(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FrozenInputGrouped(nn.Module):
    """The issue's smallest crash: a grouped conv straight on the image."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(6, 5))

    def forward(self, x):
        return self.net(x)


class FlattenIntoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 6)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(self.a(x))
        x = x.view(x.size(0), 6 * 4 * 4)
        return self.fc2(F.relu(self.bn1(self.fc1(x))))


class FunctionalConvs(nn.Module):
    """F.conv2d / F.linear on parameters (get_attr nodes), a grouped functional conv."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 2, 3, 3) * 0.3)   # groups=4
        self.w3 = nn.Parameter(torch.randn(6, 8, 1, 1) * 0.3)
        self.wl = nn.Parameter(torch.randn(5, 6) * 0.3)
        self.bl = nn.Parameter(torch.randn(5) * 0.1)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.relu(F.conv2d(x, self.w2, None, 1, 1, 1, 4))
        x = F.conv2d(x, self.w3)
        return F.linear(x.mean((2, 3)), self.wl, self.bl)


class SameConv(nn.Conv2d):
    """timm's Conv2dSame idiom: a Conv2d subclass whose forward pads, then F.conv2d."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


class PlainSubclass(nn.Conv2d):
    """Overrides nothing the forward uses: it is a Conv2d."""

    def extra_repr(self):
        return "plain"


class Subclasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.same = SameConv(3, 8, 3, stride=2)
        self.plain = PlainSubclass(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.plain(F.relu(self.same(x)))).mean((2, 3)))


class SharedConv(nn.Module):
    """One conv applied twice: its input and output channels are coupled across the uses."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(F.relu(self.conv(F.relu(self.conv(x)))).mean((2, 3)))


class SharedWeight(nn.Module):
    """One parameter read by two F.conv2d calls on different tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 6), cbr(3, 6)
        self.w = nn.Parameter(torch.randn(8, 6, 1, 1) * 0.3)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = F.conv2d(self.a(x), self.w)
        z = F.conv2d(self.b(x), self.w)
        return self.fc(torch.cat([y, z], 1).mean((2, 3)))


class StdConv(nn.Conv2d):
    """timm's StdConv2d: the weight is standardised per output channel in the graph."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0., eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = StdConv(3, 8, 3, padding=1)
        self.b = StdConv(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


class ChannelsLast(nn.Module):
    """ConvNeXt-style block: permute to NHWC, Linear over channels, permute back, SE gate."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.se = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.a(x)
        y = self.down(F.gelu(self.up(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        y = y * torch.sigmoid(self.se(F.adaptive_avg_pool2d(y, 1)))
        return self.fc((x + y).mean((2, 3)))


class Transposed(nn.Module):
    """A transposed conv (decoder-style upsampling): rows are inputs, columns outputs."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(F.relu(self.up(self.a(x))).mean((2, 3)))


MODULES = [Transposed, GroupedAndDepthwise, FrozenInputGrouped, FlattenIntoLinear, FunctionalConvs,
           Subclasses, SharedConv, SharedWeight, StdConvNet, ChannelsLast]


test_pruned_equals_masked = pruned_equals_masked_test(MODULES, X)


def _groups(model):
    return traced_groups(model, X)


def test_depthwise_couples_in_and_out_grouped_keeps_whole_groups():
    gm, cg = _groups(GroupedAndDepthwise)
    grouped, dw = cg.roots("grouped").reshape(-1), cg.roots("dw").reshape(-1)
    assert torch.equal(grouped, dw)
    a = cg.roots("a_2").reshape(-1)
    # groups=4: 2 input and 4 output channels per group share one root
    assert torch.equal(a.reshape(4, 2)[:, 0], grouped.reshape(4, 4)[:, 0])
    assert len(set(grouped.tolist())) == 4


def test_grouped_conv_on_the_image_is_frozen_not_a_crash():
    gm, cg = _groups(FrozenInputGrouped)
    assert not cg.barriers
    assert bool((cg.roots("net_0") == 0).all())   # coupled with the frozen image
    assert not bool((cg.roots("net_3") == 0).any())  # the logits stay prunable


def test_flatten_maps_features_to_channels():
    gm, cg = _groups(FlattenIntoLinear)
    view = cg.roots("view").reshape(-1)
    channel = cg.roots("pool").reshape(-1)
    assert torch.equal(view, channel.repeat_interleave(16))


def test_functional_layers_prune_their_parameters_and_groups():
    gm, cg, plan, pruned, _ = assert_exact(seeded(FunctionalConvs), X, 0.5, classes=[1, 3])
    assert not cg.barriers
    assert pruned.w1.shape[0] < 8 and pruned.w1.shape[0] == pruned.b1.shape[0]
    assert pruned.w3.shape[1] == pruned.w2.shape[0]           # w3's columns follow w2's rows
    groups = next(n for n in pruned.graph.nodes if n.name == "conv2d_1").args[6]
    assert groups == pruned.w2.shape[0] // 2 < 4               # whole groups dropped
    assert pruned.wl.shape == (2, pruned.w3.shape[0])


def test_conv_subclass_is_a_conv_unless_it_overrides_forward():
    gm, cg = _groups(Subclasses)
    assert cg.rules["plain"] == "conv_rule"
    assert "same" not in cg.rules or cg.rules.get("same") != "conv_rule"  # traced through
    assert cg.rules["conv2d"] == "conv_function_rule" and cg.rules["pad"] == "pad_rule"
    assert not cg.barriers and not bool((cg.roots("conv2d") == 0).all())
    _, _, _, pruned, _ = assert_exact(seeded(Subclasses), X, 0.5, classes=[0, 1])
    assert type(pruned.plain) is nn.Conv2d  # rebuilt as the registered class: storable


def test_subclass_overriding_forward_as_a_leaf_is_a_barrier():
    gm = trace(seeded(Subclasses), X, leaf_modules=[SameConv])
    cg = channel_groups(gm)
    assert "SameConv (a Conv2d overriding forward)" in cg.barriers["same"]


def test_shared_conv_couples_its_uses_and_is_pruned_once():
    gm, cg = _groups(SharedConv)
    assert torch.equal(cg.roots("conv"), cg.roots("conv_1"))
    assert torch.equal(cg.roots("stem_2"), cg.roots("conv"))   # conv(conv(x)): in ~ out
    _, _, _, pruned, _ = assert_exact(seeded(SharedConv), X, 0.5, classes=[0, 1])
    assert pruned.conv.in_channels == pruned.conv.out_channels < 8


def test_shared_parameter_couples_both_calls():
    gm, cg = _groups(SharedWeight)
    assert torch.equal(cg.roots("conv2d"), cg.roots("conv2d_1"))
    assert torch.equal(cg.roots("a_2"), cg.roots("b_2"))


def test_standardised_weight_keeps_inputs_prunes_rows():
    gm, cg = _groups(StdConvNet)
    assert not cg.barriers
    # b's standardised weight cannot lose columns (its statistics span them): its inputs, the
    # rows of a, are kept; its own rows stay prunable, and the reason is reported
    assert bool((cg.roots("relu") == 0).all())
    assert not bool((cg.roots("conv2d_1") == 0).any())
    assert "computed" in cg.notes["conv2d_1"]
