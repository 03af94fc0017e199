"""The rule registry (mdafx/rules/__init__.py): lookup along the class hierarchy, and the
invariant every rule keeps: on frozen inputs (the image, a barrier's output) a rule maps the
channels or raises Barrier, never anything else; on partly prunable inputs it is exact (pruned
== masked, read through a sum of its output, which a dropped channel does not change)."""
from __future__ import annotations

import operator
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mdafx.api import channel_groups, trace
from mdafx.rules import REGISTRY, lookup, module_rule_class
from oracle import assert_exact

# --------------------------------------------------------------------------- lookup


class Plain(nn.Conv2d):
    def extra_repr(self):
        return "plain"


class Overriding(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class OverridingHelper(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * 2, bias)


def test_subclasses_get_the_rule_of_the_base_unless_they_change_forward():
    assert module_rule_class(nn.Conv2d(3, 4, 1)) is nn.Conv2d
    assert module_rule_class(Plain(3, 4, 1)) is nn.Conv2d
    assert module_rule_class(Overriding(3, 4, 1)) is None
    assert module_rule_class(OverridingHelper(3, 4, 1)) is None
    rebound = nn.Conv2d(3, 4, 1)
    rebound.forward = types.MethodType(lambda self, x: x, rebound)
    assert module_rule_class(rebound) is None
    assert module_rule_class(nn.Sequential()) is None


def test_leaf_subclass_that_overrides_forward_is_a_reported_barrier():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), Overriding(4, 4, 1), nn.Flatten(), nn.Linear(64, 2))
    gm = trace(net, torch.randn(1, 3, 4, 4), leaf_modules=[Overriding])
    node = next(n for n in gm.graph.nodes if n.target == "1")
    assert lookup(node, gm) is None
    assert "Overriding (a Conv2d overriding forward)" in channel_groups(gm).barriers[node.name]


# --------------------------------------------------------------------------- the invariant

X4 = (2, 6, 4, 4)   # the op's input: [B, C, H, W]
X3 = (2, 6, 16)     # 1-d ops: [B, C, L]


class P(nn.Module):
    """Parameters and buffers the explicit calls use."""

    def __init__(self):
        super().__init__()
        self.w4 = nn.Parameter(torch.randn(6, 6, 1, 1) * 0.3)
        self.wg = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.3)
        self.w3 = nn.Parameter(torch.randn(6, 6, 1) * 0.3)
        self.wl = nn.Parameter(torch.randn(5, 4) * 0.3)
        self.b6 = nn.Parameter(torch.randn(6) * 0.1)
        self.g6 = nn.Parameter(torch.rand(6) + 0.5)
        self.g4 = nn.Parameter(torch.rand(4) + 0.5)
        self.register_buffer("rm", torch.randn(6) * 0.1)
        self.register_buffer("rv", torch.rand(6) + 0.5)


EXPLICIT = {
    F.conv2d: (X4, lambda x, p: F.conv2d(x, p.w4, p.b6)),
    F.conv1d: (X3, lambda x, p: F.conv1d(x, p.w3, p.b6)),
    F.linear: (X4, lambda x, p: F.linear(x, p.wl)),
    F.batch_norm: (X4, lambda x, p: F.batch_norm(x, p.rm, p.rv, p.g6, p.b6)),
    F.layer_norm: (X4, lambda x, p: F.layer_norm(x, (4,), p.g4, None)),
    F.rms_norm: (X4, lambda x, p: F.rms_norm(x, (4,), p.g4)),
    F.group_norm: (X4, lambda x, p: F.group_norm(x, 3, p.g6, p.b6)),
    torch.prelu: (X4, lambda x, p: torch.prelu(x, p.g6)),
    F.dropout: (X4, lambda x, p: F.dropout(x, 0.5, False)),
    F.dropout1d: (X3, lambda x, p: F.dropout1d(x, 0.5, False)),
    F.dropout2d: (X4, lambda x, p: F.dropout2d(x, 0.5, False)),
    torch.sqrt: (X4, lambda x, p: torch.sqrt(x.abs())),
    torch.rsqrt: (X4, lambda x, p: torch.rsqrt(x.abs() + 1)),
    "sqrt": (X4, lambda x, p: x.abs().sqrt()),
    "rsqrt": (X4, lambda x, p: (x.abs() + 1).rsqrt()),
    "flatten": (X4, lambda x, p: x.flatten(1)),
    torch.flatten: (X4, lambda x, p: torch.flatten(x, 2)),
    torchvision.ops.stochastic_depth: (X4, lambda x, p: torchvision.ops.stochastic_depth(
        x, 0.5, "row", False)),
    torch.bmm: (X3, lambda x, p: torch.bmm(x, x.transpose(1, 2))),
    "bmm": (X3, lambda x, p: x.bmm(x.transpose(1, 2))),
    torch.cat: (X4, lambda x, p: torch.cat([x, x * 2], 1)),
    torch.concat: (X4, lambda x, p: torch.concat([x, x], 2)),
    torch.stack: (X4, lambda x, p: torch.stack([x, x], 2)),
    "expand": (X4, lambda x, p: x[:, :, :1].expand(-1, -1, 4, -1)),
    "repeat": (X4, lambda x, p: x.repeat(1, 2, 1, 1)),
    "tile": (X4, lambda x, p: x.tile(1, 2, 1, 1)),
    torch.tile: (X4, lambda x, p: torch.tile(x, (1, 1, 2, 1))),
    "split": (X4, lambda x, p: x.split(2, dim=1)),
    torch.split: (X4, lambda x, p: torch.split(x, [2, 4], 1)),
    "chunk": (X4, lambda x, p: x.chunk(2, 1)),
    torch.chunk: (X4, lambda x, p: torch.chunk(x, 3, 1)),
    "unbind": (X4, lambda x, p: x.unbind(1)),
    torch.unbind: (X4, lambda x, p: torch.unbind(x, 2)),
    "roll": (X4, lambda x, p: x.roll(1, 1)),
    torch.roll: (X4, lambda x, p: torch.roll(x, (1, 1), (2, 3))),
    operator.getitem: (X4, lambda x, p: x[:, 1:4] + x[:, 0:1] * x[:, 2].unsqueeze(1)),
    "view": (X4, lambda x, p: x.view(x.shape[0], 3, 2, 16)),
    "reshape": (X4, lambda x, p: x.reshape(x.shape[0], 6, 16)),
    torch.reshape: (X4, lambda x, p: torch.reshape(x, (-1, 96))),
    # fx traces ``a += b`` out of place; here it writes into a temporary, as fx assumes
    operator.iadd: (X4, lambda x, p: operator.iadd(x * 1, x)),
    operator.imul: (X4, lambda x, p: operator.imul(x * 1, x)),
    "masked_fill": (X4, lambda x, p: x.masked_fill(x > 0, 0.5)),
    torch.where: (X4, lambda x, p: torch.where(x > 0, x, 0.5)),
    "pow": (X4, lambda x, p: x.pow(2)),
    torch.pow: (X4, lambda x, p: torch.pow(x, 2)),
    operator.pow: (X4, lambda x, p: x ** 2),
    F.avg_pool1d: (X3, lambda x, p: F.avg_pool1d(x, 2)),
    F.max_pool1d: (X3, lambda x, p: F.max_pool1d(x, 2)),
    F.adaptive_avg_pool1d: (X3, lambda x, p: F.adaptive_avg_pool1d(x, 1)),
    F.adaptive_max_pool1d: (X3, lambda x, p: F.adaptive_max_pool1d(x, 1)),
    F.scaled_dot_product_attention: (X4, lambda x, p: F.scaled_dot_product_attention(x, x, x)),
    torch.einsum: (X4, lambda x, p: torch.einsum("bchw,bcwk->bchk", x, x.transpose(2, 3))),
    torch.matmul: (X4, lambda x, p: torch.matmul(x, x.transpose(-2, -1))),
    F.pad: (X4, lambda x, p: F.pad(x, (1, 1, 0, 2))),
    F.interpolate: (X4, lambda x, p: F.interpolate(x, scale_factor=2.0)),
}
MODULES = {
    nn.Conv2d: (X4, lambda: nn.Conv2d(6, 6, 3, padding=1, groups=3)),
    nn.Conv1d: (X3, lambda: nn.Conv1d(6, 6, 3, groups=6)),
    nn.ConvTranspose2d: (X4, lambda: nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)),
    nn.Linear: (X4, lambda: nn.Linear(4, 5)),
    nn.LayerNorm: (X4, lambda: nn.LayerNorm(4)),
    nn.RMSNorm: (X4, lambda: nn.RMSNorm(4)),
    nn.GroupNorm: (X4, lambda: nn.GroupNorm(3, 6)),
    nn.BatchNorm2d: (X4, lambda: nn.BatchNorm2d(6)),
    nn.BatchNorm1d: (X3, lambda: nn.BatchNorm1d(6)),
    nn.PReLU: (X4, lambda: nn.PReLU(6)),
    nn.ConstantPad1d: (X3, lambda: nn.ConstantPad1d(1, 0.5)),
    nn.ConstantPad2d: (X4, lambda: nn.ConstantPad2d(1, 0.5)),
    nn.Upsample: (X4, lambda: nn.Upsample(scale_factor=2.0)),
    nn.LocalResponseNorm: (X4, lambda: nn.LocalResponseNorm(2)),
}
GENERIC = [(), ("x",), (1,), (-1,), (1, 2), ((0, 2, 3, 1),), (2,), (0.5,), ("x", "x")]


def _generic_call(key):
    """The first generic argument list that ``key`` accepts on an X4 (or X3) input."""
    for shape in (X4, X3):
        x = torch.randn(shape)
        for args in GENERIC:
            fill = [x if a == "x" else a for a in args]
            try:
                with torch.no_grad():
                    out = getattr(x, key)(*fill) if isinstance(key, str) else key(x, *fill)
            except Exception:
                continue
            if isinstance(out, (torch.Tensor, tuple, list)):
                def call(x, p, key=key, args=args):
                    fill = [x if a == "x" else a for a in args]
                    return getattr(x, key)(*fill) if isinstance(key, str) else key(x, *fill)
                return shape, call
    return None


def _module_call(cls):
    if cls in MODULES:
        shape, make = MODULES[cls]
        return shape, make()
    for shape in ((X3, X4) if "1d" in cls.__name__ else (X4, X3)):
        for args in [(), (6,), (2,), (1,), ((1, 1),)]:
            try:
                m = cls(*args).eval()
                with torch.no_grad():
                    m(torch.randn(shape))
                return shape, m
            except Exception:
                continue
    return None


def case_of(key):
    if isinstance(key, type):
        found = _module_call(key)
        if found is None:
            return None
        shape, mod = found
        return shape, (lambda x, p: p.mod(x)), mod
    if key in EXPLICIT:
        shape, call = EXPLICIT[key]
        return shape, call, None
    found = _generic_call(key)
    return None if found is None else (*found, None)


class OpNet(nn.Module):
    """``call`` applied to a frozen input (the image itself) or to a partly prunable one (half
    its channels from a conv), read out as per-sample sums."""

    def __init__(self, shape, call, mod, mixed):
        super().__init__()
        self.shape, self.call, self.mixed = shape, call, mixed
        self.p = P()
        if mod is not None:
            self.p.mod = mod
        self.mix = nn.Conv2d(6, 3, 1)
        self.first = self.read_out = False  # decided on an eager run: forward has no branches
        with torch.no_grad():
            out = self.call(torch.randn(shape), self.p)
        self.first = isinstance(out, (tuple, list))
        out = out[0] if self.first else out
        self.read_out = out.dim() >= 1 and out.shape[0] == shape[0]

    def forward(self, x):
        base = torch.cat([x[:, :3], self.mix(x)], 1) if self.mixed else x * 1  # frozen
        if len(self.shape) == 3:
            base = base.flatten(2)
        out = self.call(base, self.p)
        total = base.flatten(1).sum(1, keepdim=True)
        if self.read_out:
            out = out[0] if self.first else out
            total = total + 0.5 * out.float().flatten(1).sum(1, keepdim=True)
        return total


KEYS = list(REGISTRY.rules)


def _id(key):
    name = key if isinstance(key, str) else getattr(key, "__name__", str(key))
    kind = "method" if isinstance(key, str) else "module" if isinstance(key, type) else "fn"
    return f"{kind}:{getattr(key, '__module__', '')}.{name}"


def test_every_rule_has_a_case():
    assert [_id(k) for k in KEYS if case_of(k) is None] == []


@pytest.mark.parametrize("key", KEYS, ids=_id)
def test_rule_maps_or_reports_a_barrier_and_is_exact(key):
    shape, call, mod = case_of(key)
    example = torch.randn(1, 6, 4, 4)
    # frozen input: only Barrier may come out of a rule (ChannelGroups turns it into a
    # reported barrier); any other exception fails here
    gm = trace(OpNet(shape, call, mod, mixed=False).eval(), example)
    channel_groups(gm)
    # partly prunable input: exact at two densities
    net = OpNet(shape, call, mod, mixed=True).eval()
    for density, seed in ((0.5, 0), (0.3, 1)):
        assert_exact(net, example, density, seed=seed, classes=[0])


# --------------------------------------------------------------------------- the report


def test_barrier_report_names_the_share_the_barriers_and_warns():
    from mdafx.passes.channel_groups import barrier_report

    class Mostly(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3)
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(torch.logcumsumexp(self.b(torch.logcumsumexp(self.a(x), 1)), 1).mean((2, 3)))

    gm = trace(Mostly().eval(), torch.randn(1, 3, 8, 8))
    report = barrier_report(gm, channel_groups(gm))
    assert (report.prunable, report.total, report.layers) == (2, 26, 3)  # the logits only
    assert report.barriers == [("logcumsumexp", 2, "no channel rule for logcumsumexp")]
    assert "2/26" in report.lines()[0] and "barrier logcumsumexp ×2" in report.lines()[1]
    assert report.warn and "only 8%" in report.warning() and "logcumsumexp" in report.warning()
