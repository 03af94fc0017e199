"""Tests for passes/contributions.py: the cheap form of MDA §1.2 against independent references.

The ground truth ``literal_contributions`` runs one single-channel convolution per (o, i) pair
with the layer's own configuration (padding mode included) and sums its output, so it shares no
code with the box-sum form or with the unfold-based naive form.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from mdafx.errors import InternalError, PreconditionError
from mdafx.passes.contributions import (
    FactoredContribution,
    class_contributions,
    densify,
    naive_contributions,
    naive_sample_contributions,
    sample_contributions,
    weighted_layers,
)
from mdafx.profiling import build_profile

NUM_CLASSES = 4
RTOL64 = 1e-10  # float64 end to end: only summation order differs
RTOL32 = 1e-5   # float32 cheap form vs float32 naive form (the brief's bound)


def literal_contributions(mod: nn.Module, x: Tensor) -> Tensor:
    """Pre-ReLU ``c[b, o, j]`` by definition: the part of output map o from input channel j."""
    if isinstance(mod, nn.Linear):
        tokens = x.reshape(x.shape[0], -1, x.shape[-1]).sum(1)  # [B, I]
        return mod.weight[None] * tokens[:, None, :]
    out_ch, in_per_group = mod.weight.shape[:2]
    out_per_group = out_ch // mod.groups
    single = nn.Conv2d(1, 1, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                       dilation=mod.dilation, bias=False, padding_mode=mod.padding_mode)
    single = single.to(x.dtype)
    result = torch.empty(x.shape[0], out_ch, in_per_group, dtype=x.dtype)
    with torch.no_grad():
        for o in range(out_ch):
            for j in range(in_per_group):
                channel = (o // out_per_group) * in_per_group + j
                single.weight.copy_(mod.weight[o, j][None, None])
                result[:, o, j] = single(x[:, channel:channel + 1]).sum((1, 2, 3))
    return result


def per_class_sum(c: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``A[k] = Σ_{b: label b = k} ReLU(c[b])`` by a plain loop over samples."""
    acc = torch.zeros((num_classes,) + c.shape[1:], dtype=torch.float64)
    for b in range(c.shape[0]):
        acc[int(labels[b])] += c[b].double().clamp_min(0)
    return acc


def traced(layer: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(nn.Sequential(layer))


def make_batches(x: Tensor, y: Tensor, batch: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, x.shape[0], batch)]


def max_rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CONV_CASES = {
    "plain": (dict(in_channels=4, out_channels=6, kernel_size=3), (9, 9)),
    "groups2": (dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1), (9, 9)),
    "depthwise": (dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1),
                  (8, 8)),
    "depthwise_x2": (dict(in_channels=4, out_channels=8, kernel_size=3, groups=4), (8, 8)),
    "stride2": (dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1), (9, 8)),
    "dilation2": (dict(in_channels=3, out_channels=5, kernel_size=3, dilation=2, padding=2),
                  (10, 10)),
    "pad0": (dict(in_channels=3, out_channels=5, kernel_size=3, padding=0), (7, 7)),
    "pad2": (dict(in_channels=3, out_channels=5, kernel_size=3, padding=2), (7, 7)),
    "asym_3x1": (dict(in_channels=3, out_channels=5, kernel_size=(3, 1), padding=(1, 0)),
                 (8, 6)),
    "non_square": (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, stride=(2, 1)),
                   (13, 6)),
    "same_dilated": (dict(in_channels=3, out_channels=4, kernel_size=(3, 2), padding="same",
                          dilation=2), (9, 7)),
    "pointwise": (dict(in_channels=6, out_channels=3, kernel_size=1), (5, 5)),
    "pointwise_grouped_strided": (dict(in_channels=6, out_channels=4, kernel_size=1, groups=2,
                                       stride=2, padding=1), (5, 6)),
    "kernel_exceeds_input_pad": (dict(in_channels=2, out_channels=3, kernel_size=5, padding=3,
                                      stride=3), (4, 4)),
    "reflect": (dict(in_channels=3, out_channels=4, kernel_size=3, padding=2,
                     padding_mode="reflect"), (7, 6)),
    "replicate": (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, stride=2,
                       padding_mode="replicate"), (7, 6)),
    "circular": (dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2,
                      padding_mode="circular"), (6, 7)),
}


def conv_case(name: str, dtype: torch.dtype, batch: int = 7) -> tuple[nn.Conv2d, Tensor, Tensor]:
    torch.manual_seed(sorted(CONV_CASES).index(name))
    kwargs, (height, width) = CONV_CASES[name]
    mod = nn.Conv2d(**kwargs).to(dtype)
    x = torch.randn(batch, kwargs["in_channels"], height, width, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES - 1, (batch,))  # the last class gets no sample
    return mod, x, y


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv_cheap_equals_literal_float64(name: str) -> None:
    mod, x, y = conv_case(name, torch.float64)
    expected = per_class_sum(literal_contributions(mod, x), y, NUM_CLASSES)
    got = class_contributions(traced(mod), make_batches(x, y, 3), NUM_CLASSES, progress=False,
                        dtype=torch.float64)
    assert list(got) == ["0"]
    a = densify(got["0"])
    assert a.shape == (NUM_CLASSES, mod.out_channels, mod.in_channels // mod.groups)
    assert expected.abs().max() > 0 and (a > 0).any()
    assert max_rel(a, expected) < RTOL64
    assert torch.all(a[NUM_CLASSES - 1] == 0)


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv_cheap_equals_naive_float32(name: str) -> None:
    mod, x, y = conv_case(name, torch.float32)
    batches = make_batches(x, y, 4)
    cheap = densify(class_contributions(traced(mod), batches, NUM_CLASSES, progress=False)["0"])
    naive = naive_contributions(traced(mod), batches, NUM_CLASSES, progress=False)["0"]
    assert cheap.dtype == naive.dtype == torch.float32
    assert max_rel(cheap, naive) < RTOL32


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_per_sample_forms_sum_to_layer_output(name: str) -> None:
    """Σ_j c[o,j] is the spatial sum of the bias-free layer output (independent of unfold)."""
    mod, x, _ = conv_case(name, torch.float64)
    with torch.no_grad():
        out = (mod(x) - mod.bias[:, None, None]).sum((2, 3))
    for form in (sample_contributions(mod, x, torch.float64), naive_sample_contributions(mod, x)):
        assert torch.allclose(form.sum(-1), out, rtol=0, atol=1e-12 * out.abs().max().item())


def test_conv_hand_computed() -> None:
    """All-ones 3×3 kernel, pad 1, all-ones 4×4 input: 4 corners·4 + 8 edges·6 + 4 inner·9."""
    mod = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        mod.weight.fill_(1.0)
    x = torch.ones(2, 1, 4, 4)
    x[1] *= -1  # negative sample: ReLU per sample drops it
    a = class_contributions(traced(mod), [(x, torch.tensor([0, 0]))], 1, progress=False)["0"]
    assert a.item() == 100.0


def test_linear_2d_and_tokens() -> None:
    torch.manual_seed(0)
    mod = nn.Linear(5, 3).double()
    for shape in [(6, 5), (6, 4, 5), (6, 2, 3, 5)]:
        x = torch.randn(shape, dtype=torch.float64)
        y = torch.tensor([0, 2, 1, 2, 0, 2])
        expected = per_class_sum(literal_contributions(mod, x), y, NUM_CLASSES)
        got = densify(class_contributions(traced(mod), make_batches(x, y, 4), NUM_CLASSES,
                                    progress=False, dtype=torch.float64)["0"])
        naive = naive_contributions(traced(mod), make_batches(x, y, 4), NUM_CLASSES,
                                    progress=False, dtype=torch.float64)["0"]
        assert got.shape == (NUM_CLASSES, 3, 5)
        assert max_rel(got, expected) < RTOL64
        assert max_rel(naive, expected) < RTOL64


def test_linear_relu_after_token_sum_and_per_sample() -> None:
    mod = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        mod.weight.fill_(1.0)
    gm = traced(mod)
    # two samples of class 0: +2 and -3 -> ReLU per sample -> 2 (not relu(-1) = 0)
    a = densify(class_contributions(gm, [(torch.tensor([[2.0], [-3.0]]), torch.tensor([0, 0]))], 1,
                              progress=False)["0"])
    assert a.item() == 2.0
    # one sample with tokens +2 and -3: summed before the ReLU -> 0
    a = densify(class_contributions(gm, [(torch.tensor([[[2.0], [-3.0]]]), torch.tensor([0]))], 1,
                              progress=False)["0"])
    assert a.item() == 0.0


def test_mixed_labels_in_one_batch() -> None:
    mod, x, _ = conv_case("groups2", torch.float64, batch=6)
    y = torch.tensor([2, 0, 2, 1, 0, 2])
    c = literal_contributions(mod, x).clamp_min(0)
    got = class_contributions(traced(mod), [(x, y)], NUM_CLASSES, progress=False,
                        dtype=torch.float64)["0"]
    for label, rows in [(0, [1, 4]), (1, [3]), (2, [0, 2, 5])]:
        assert max_rel(got[label], c[rows].sum(0)) < RTOL64
    assert torch.all(got[3] == 0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_independent_of_batch_size_and_chunking(dtype: torch.dtype, rtol: float) -> None:
    mod, x, y = conv_case("groups2", dtype, batch=11)
    gm = traced(mod)
    reference = class_contributions(gm, [(x, y)], NUM_CLASSES, progress=False, dtype=dtype)["0"]
    per_sample = mod.out_channels * (mod.in_channels // mod.groups) * x.element_size()
    for batch in (1, 3, 11):
        # chunk budgets: whole batch, one sample per chunk, and below one sample (o-chunks)
        for chunk in (2**30, per_sample, per_sample // 3):
            got = class_contributions(gm, make_batches(x, y, batch), NUM_CLASSES, progress=False,
                                dtype=dtype, chunk_bytes=chunk)["0"]
            assert max_rel(got, reference) <= rtol, (batch, chunk)


class SmallNet(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(width * 4, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x)).relu()
        x = self.pool(self.conv2(x) + x)
        return self.fc(x.flatten(1))


def test_weighted_layers_graph_order_and_eval_mode() -> None:
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(SmallNet())
    assert weighted_layers(gm) == ["conv1", "conv2", "fc"]
    gm.train()
    before = gm.bn1.running_mean.clone()
    x, y = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 2, 3, 0])
    got = class_contributions(gm, [(x, y)], NUM_CLASSES, progress=False, dtype=torch.float64)
    assert gm.training and gm.bn1.training  # restored
    assert torch.equal(gm.bn1.running_mean, before)  # ran in eval mode
    # the inner layers see eval-mode activations: recompute conv2's input by hand
    gm.eval()
    with torch.no_grad():
        h = gm.bn1(gm.conv1(x)).relu()
    expected = per_class_sum(literal_contributions(gm.conv2.double(), h.double()), y, NUM_CLASSES)
    assert max_rel(got["conv2"], expected) < 1e-6  # model ran in float32


def test_unsupported_layers_and_labels_raise() -> None:
    mod = nn.Conv2d(2, 2, 3, padding=1)
    gm = traced(mod)
    gm.get_submodule("0").padding_mode = "mirror"
    with pytest.raises(PreconditionError, match="'0'.*padding_mode='mirror'"):
        weighted_layers(gm)

    with pytest.raises(PreconditionError, match=r"labels must lie in \[0, 2\)"):
        class_contributions(traced(nn.Conv2d(2, 2, 1)), [(torch.randn(1, 2, 3, 3), torch.tensor([2]))],
                      2, progress=False)


# ---------------------------------------------------------------------------------------------
# sample selection


# ---------------------------------------------------------------------------------------------
# factored single-tap layers (Linear, 1×1 conv): A = W⁺ ⊙ Σ S⁺ + W⁻ ⊙ Σ S⁻, never [C, O, I]


POINTWISE_CASES = {
    "linear_2d": (lambda: nn.Linear(6, 5), (6,)),
    "linear_3d_tokens": (lambda: nn.Linear(6, 5), (4, 6)),
    "linear_4d_tokens": (lambda: nn.Linear(6, 5, bias=False), (2, 3, 6)),
    "conv1x1": (lambda: nn.Conv2d(6, 5, 1), (6, 4, 5)),
    "conv1x1_groups2": (lambda: nn.Conv2d(6, 4, 1, groups=2), (6, 5, 4)),
    "conv1x1_depthwise": (lambda: nn.Conv2d(6, 6, 1, groups=6), (6, 4, 4)),
    "conv1x1_depthwise_x2": (lambda: nn.Conv2d(3, 6, 1, groups=3, stride=2, padding=1),
                             (3, 5, 4)),
}


def pointwise_case(name: str, batch: int = 9) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(sorted(POINTWISE_CASES).index(name) + 100)
    make, shape = POINTWISE_CASES[name]
    mod = make().double()
    x = torch.randn(batch, *shape, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES - 1, (batch,))  # the last class gets no sample
    return mod, x, y


@pytest.mark.parametrize("name", sorted(POINTWISE_CASES))
def test_factored_equals_dense_and_literal_float64(name: str) -> None:
    mod, x, y = pointwise_case(name)
    gm = traced(mod)
    batches = make_batches(x, y, 4)
    fac = class_contributions(gm, batches, NUM_CLASSES, progress=False, dtype=torch.float64)["0"]
    dense = class_contributions(gm, batches, NUM_CLASSES, progress=False, dtype=torch.float64,
                          dense=True)["0"]
    expected = per_class_sum(literal_contributions(mod, x), y, NUM_CLASSES)
    groups = getattr(mod, "groups", 1)
    assert isinstance(fac, FactoredContribution) and isinstance(dense, Tensor)
    assert fac.shape == dense.shape == expected.shape == (NUM_CLASSES, mod.weight.shape[0],
                                                          mod.weight.shape[1])
    assert fac.groups == groups and fac.dtype == torch.float64
    assert fac.pos.shape == fac.neg.shape == (NUM_CLASSES, mod.weight.shape[1] * groups)
    assert expected.abs().max() > 0
    assert max_rel(fac.dense(), expected) <= RTOL64
    assert torch.equal(fac.dense(), dense)  # dense=True is the same numbers, materialised
    for c in range(NUM_CLASSES):
        assert torch.equal(fac.for_class(c), dense[c])
        odd = torch.arange(1, dense.shape[1], 2)
        assert torch.equal(fac.rows(c, odd), dense[c, odd])
        assert torch.equal(fac.rows(c, slice(1, 3)), dense[c, 1:3])
    assert torch.equal(fac.chunk([2, 0]), dense[[2, 0]])
    assert torch.equal(fac.chunk(slice(1, 3)), dense[1:3])
    assert torch.all(fac.for_class(NUM_CLASSES - 1) == 0)
    naive = naive_contributions(gm, batches, NUM_CLASSES, progress=False,
                                dtype=torch.float64)["0"]
    assert max_rel(fac.dense(), naive) <= RTOL64


def test_factored_float32_is_bitwise_the_dense_form() -> None:
    mod, x, y = pointwise_case("conv1x1_groups2")
    gm = traced(mod.float())
    batches = make_batches(x.float(), y, 4)
    fac = class_contributions(gm, batches, NUM_CLASSES, progress=False)["0"]
    dense = class_contributions(gm, batches, NUM_CLASSES, progress=False, dense=True)["0"]
    assert fac.dtype == dense.dtype == torch.float32
    assert torch.equal(fac.dense(), dense)
    naive = naive_contributions(gm, batches, NUM_CLASSES, progress=False)["0"]
    assert max_rel(fac.dense(), naive) < RTOL32


def test_factored_memory_is_per_input_not_per_pair() -> None:
    """The head of a wide Linear: the object holds two [C, I] sums and shares the weight."""
    mod = nn.Linear(4096, 1024)
    x, y = torch.randn(8, 4096), torch.arange(8) % NUM_CLASSES
    fac = class_contributions(traced(mod), [(x, y)], NUM_CLASSES, progress=False)["0"]
    assert fac.nbytes == 2 * NUM_CLASSES * 4096 * 8
    assert fac.dense_nbytes() == NUM_CLASSES * 1024 * 4096 * 4
    assert fac.weight.untyped_storage().data_ptr() == mod.weight.untyped_storage().data_ptr()


def test_factored_refuses_a_weight_changed_in_place() -> None:
    mod, x, y = pointwise_case("conv1x1")
    gm = traced(mod)
    fac = class_contributions(gm, [(x, y)], NUM_CLASSES, progress=False, dtype=torch.float64)["0"]
    fac.for_class(0)
    with torch.no_grad():
        gm.get_submodule("0").weight.mul_(2.0)
    with pytest.raises(PreconditionError, match="modified in place"):
        fac.for_class(0)


def test_factored_rejects_bad_shapes() -> None:
    with pytest.raises(InternalError, match="1×1 kernel"):
        FactoredContribution(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4, 3, 3, 3))
    with pytest.raises(InternalError, match=r"pos/neg must both be \[C, 6\]"):
        FactoredContribution(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4, 3), groups=2)
    with pytest.raises(InternalError, match="groups=3"):
        FactoredContribution(torch.zeros(2, 9), torch.zeros(2, 9), torch.zeros(4, 3), groups=3)


class PointwiseNet(nn.Module):
    """Every kind of layer: 3×3 conv (dense A), 1×1 convs of groups 1/2/depthwise and two
    Linears (factored A)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 6, 1)
        self.gpw = nn.Conv2d(6, 6, 1, groups=2)
        self.dw = nn.Conv2d(6, 12, 1, groups=6)
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.gpw(self.pw(self.stem(x).relu()).relu()).relu()
        x = self.dw(x).relu().mean((2, 3))
        return self.fc2(self.fc1(x).relu())


def test_forward_batch_slices_give_the_same_contributions() -> None:
    torch.manual_seed(4)
    gm = torch.fx.symbolic_trace(PointwiseNet().double())
    x = torch.randn(11, 3, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 0, 2, 3, 0, 1, 2, 2])
    batches = make_batches(x, y, 6)
    ref = build_profile(gm, batches, NUM_CLASSES, progress=False, dtype=torch.float64)
    for fb in (1, 4, 6, 50):
        got = build_profile(gm, batches, NUM_CLASSES, progress=False, dtype=torch.float64,
                            forward_batch=fb)
        assert got.samples_per_class == ref.samples_per_class == [3, 3, 3, 2]
        for name, a in ref.contributions.items():
            assert max_rel(densify(got.contributions[name]), densify(a)) < 1e-12, (fb, name)
    with pytest.raises(PreconditionError, match="forward_batch must be >= 1"):
        class_contributions(gm, batches, NUM_CLASSES, progress=False, forward_batch=0)
    with pytest.raises(PreconditionError, match="one input row per label"):
        class_contributions(gm, [(x[:3], y[:4])], NUM_CLASSES, progress=False, forward_batch=2)


# ---------------------------------------------------------------------------------------------
# functional layers and shared modules


class Modules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dw(torch.relu(self.conv(x))).mean((2, 3)))


class Functional(nn.Module):
    """The same computation on parameters: F.conv2d / F.linear nodes."""

    def __init__(self, m: Modules) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(m.conv.weight.detach()), nn.Parameter(m.conv.bias.detach())
        self.w2, self.b2 = nn.Parameter(m.dw.weight.detach()), nn.Parameter(m.dw.bias.detach())
        self.w3, self.b3 = nn.Parameter(m.fc.weight.detach()), nn.Parameter(m.fc.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(F.conv2d(x, self.w1, self.b1, 1, 1))
        x = F.conv2d(x, self.w2, self.b2, 1, 1, 1, 4)
        return F.linear(x.mean((2, 3)), self.w3, self.b3)


def test_functional_layers_get_the_contributions_of_their_modules() -> None:
    torch.manual_seed(0)
    m = Modules().eval()
    x, y = torch.randn(6, 3, 6, 6), torch.tensor([0, 1, 2, 3, 0, 1])
    from mdafx.ir import trace

    gm_m, gm_f = trace(m, x[:1]), trace(Functional(m).eval(), x[:1])
    assert weighted_layers(gm_m) == ["conv", "dw", "fc"]
    assert weighted_layers(gm_f) == ["conv2d", "conv2d_1", "linear"]
    a_m = class_contributions(gm_m, [(x, y)], NUM_CLASSES, progress=False, dense=True)
    a_f = class_contributions(gm_f, [(x, y)], NUM_CLASSES, progress=False, dense=True)
    for km, kf in zip(a_m, a_f):
        assert torch.equal(a_m[km], a_f[kf]), (km, kf)
    prof = build_profile(gm_f, [(x, y)], NUM_CLASSES, progress=False)
    assert prof.layers == ["conv2d", "conv2d_1", "linear"] and prof.groups["conv2d_1"] == 4
    prof.check_matches(gm_f)
    with torch.no_grad():
        gm_f.w2.mul_(2)
    from mdafx.errors import ProfileMismatchError

    with pytest.raises(ProfileMismatchError, match="conv2d_1"):
        prof.check_matches(gm_f)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.relu(self.conv(x)))


def test_a_shared_module_sums_its_contributions_over_its_calls() -> None:
    torch.manual_seed(1)
    gm = torch.fx.symbolic_trace(Shared().double())
    x, y = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    got = class_contributions(gm, [(x, y)], 2, progress=False, dense=True,
                              dtype=torch.float64)["conv"]
    with torch.no_grad():
        h = torch.relu(gm.conv(x))
    want = (per_class_sum(literal_contributions(gm.conv, x), y, 2)
            + per_class_sum(literal_contributions(gm.conv, h), y, 2))
    assert max_rel(got, want) < RTOL64
