"""Locate (MDA.md §1.3) on hand-set contributions: every expected mask below is computed by hand.

The contributions ``A[c, o, i]`` are written directly (no data, no profile), mostly as 0/1 rows so
that ``R = minmax(A[c, o, ·])`` is 0 or ~1 and the masks can be read off: a wanted output ``o``
selects the inputs where its row is positive. Rows of outputs a class does *not* want are set to
a "decoy" (a one-hot on an input the correct answer does not contain), so a mask that leaked from
an unwanted output would show up as an extra channel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdafx.api import channel_groups, locate, trace
from mdafx.errors import PreconditionError
from mdafx.passes.contributions import FactoredContribution, class_contributions, densify, weighted_layers
from mdafx.passes.locate import EPS, Thresholds, layer_input_mask, minmax, weighted_input_mask
from mdafx.passes.locate import locate_masks as locate_pass


# ----------------------------------------------------------------------------- helpers

def contrib(K: int, O: int, I: int, rows: dict, decoy: dict | None = None) -> torch.Tensor:
    """``A`` of shape [K, O, I]: ``rows[(c, o)]`` is the row of output o for class c; every other
    row is a one-hot (value 9) on input ``decoy[c]`` (or all zeros without a decoy)."""
    A = torch.zeros(K, O, I)
    for c in range(K):
        if decoy and c in decoy:
            A[c, :, decoy[c]] = 9.0
    for (c, o), row in rows.items():
        A[c, o] = torch.tensor(row, dtype=torch.float32)
    return A


def channel_mask(masks, name: str) -> torch.Tensor:
    """[K, C] mask of a node whose ids vary along one dim only (channels or features)."""
    m = masks.masks[name]
    return m.reshape(m.shape[0], -1)


def sets(mask: torch.Tensor) -> list[set[int]]:
    """Per class, the set of marked channels (readable assertion failures)."""
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def run_locate(model: nn.Module, example: torch.Tensor, A: dict, thresholds=Thresholds()):
    gm = trace(model, example)
    assert set(A) == set(weighted_layers(gm)), "the test must set A for every weighted layer"
    cg = channel_groups(gm)
    return gm, cg, locate(gm, A, thresholds, cg=cg)


# ----------------------------------------------------------------------------- minmax

def test_minmax_by_hand():
    v = torch.tensor([2.0, 4.0, 6.0])
    # (v - 2) / (4 + ε): the top value stays just below 1 because of ε
    want = torch.tensor([0.0, 2.0 / (4.0 + EPS), 4.0 / (4.0 + EPS)])
    assert torch.allclose(minmax(v), want, rtol=0, atol=1e-7)
    assert minmax(v)[2].item() < 1.0
    assert EPS == 1e-5
    # at a spread of ε itself the top value is 1/2, not 1
    assert minmax(torch.tensor([0.0, 1e-5]))[1].item() == pytest.approx(0.5, rel=1e-5)


def test_minmax_rows_are_independent():
    v = torch.tensor([[1.0, 3.0], [10.0, 0.0]])
    want = torch.tensor([[0.0, 2.0 / (2.0 + EPS)], [10.0 / (10.0 + EPS), 0.0]])
    assert torch.allclose(minmax(v, dim=1), want, rtol=0, atol=1e-7)
    # along dim 0 the columns are normalised instead
    want0 = torch.tensor([[0.0, 3.0 / (3.0 + EPS)], [9.0 / (9.0 + EPS), 0.0]])
    assert torch.allclose(minmax(v, dim=0), want0, rtol=0, atol=1e-7)


@pytest.mark.parametrize("v, want", [
    ([3.0, 3.0, 3.0], [1.0, 1.0, 1.0]),     # constant positive: all 1 (formula would give 0)
    ([0.0, 0.0], [0.0, 0.0]),               # constant zero: nothing
    ([-2.0, -2.0], [0.0, 0.0]),             # constant negative: nothing
    ([7.0], [1.0]),                         # one input (depthwise conv row)
    ([0.0], [0.0]),
])
def test_minmax_constant_vector_rule(v, want):
    assert minmax(torch.tensor(v)).tolist() == want


def test_minmax_constant_rule_is_per_row():
    v = torch.tensor([[5.0, 5.0], [0.0, 0.0], [1.0, 3.0]])
    out = minmax(v, dim=1)
    assert out[0].tolist() == [1.0, 1.0]
    assert out[1].tolist() == [0.0, 0.0]
    assert out[2, 0].item() == 0.0 and out[2, 1].item() == pytest.approx(2.0 / (2.0 + EPS))


# ----------------------------------------------------------------------------- weighted_input_mask

def test_weighted_input_mask_alpha_then_beta_by_hand():
    # one class, O=3 outputs, I=4 inputs
    A = torch.tensor([[[4.0, 2.0, 1.0, 0.0],     # R ≈ [1, .5, .25, 0]
                       [0.0, 0.0, 8.0, 8.0],     # R ≈ [0, 0, 1, 1]
                       [9.0, 0.0, 0.0, 0.0]]])   # R ≈ [1, 0, 0, 0]
    M = torch.tensor([[True, False, True]])      # output 1 not wanted
    # α=0.3: B0 = [1,1,0,0], B2 = [1,0,0,0] -> N = [2,1,0,0] -> minmax ≈ [1, .5, 0, 0]
    assert weighted_input_mask(A, M, 1, 0.3, 0.2).tolist() == [[True, True, False, False]]
    # β = 0.5 is not passed by 1/(2+ε) < 0.5 (strict '>' and ε)
    assert weighted_input_mask(A, M, 1, 0.3, 0.5).tolist() == [[True, False, False, False]]
    # α=0.2: B0 = [1,1,1,0] -> N = [2,1,1,0]
    assert weighted_input_mask(A, M, 1, 0.2, 0.2).tolist() == [[True, True, True, False]]
    # α=0.5: R0[1] = 2/(4+ε) < 0.5 -> B0 = [1,0,0,0] -> N = [2,0,0,0]
    assert weighted_input_mask(A, M, 1, 0.5, 0.2).tolist() == [[True, False, False, False]]
    # ε matters at small scales: spread 1.1e-4 -> R[1] = .6e-4/(1.1e-4 + ε) = .5 (.545 without ε)
    tiny = torch.tensor([[[1.1e-4, 0.6e-4, 0.0]]])
    one = torch.ones(1, 1, dtype=torch.bool)
    assert weighted_input_mask(tiny, one, 1, 0.52, 0.2).tolist() == [[True, False, False]]
    assert weighted_input_mask(tiny, one, 1, 0.48, 0.2).tolist() == [[True, True, False]]
    # α=0: strict, so the zero entries (R = 0) never count
    assert weighted_input_mask(A, M, 1, 0.0, 0.0).tolist() == [[True, True, True, False]]
    # output 1 counts once it is wanted: N = [2,1,1,1] -> minmax ≈ [1,0,0,0]: wanting *more*
    # outputs drops inputs 1 and 2 here (min-max is relative; a layer's mask is not monotone)
    all_out = torch.ones(1, 3, dtype=torch.bool)
    assert weighted_input_mask(A, all_out, 1, 0.3, 0.2).tolist() == [[True, False, False, False]]


def test_weighted_input_mask_no_wanted_output_keeps_nothing():
    A = torch.rand(2, 3, 4) + 0.1
    M = torch.tensor([[False] * 3, [True, False, False]])
    out = weighted_input_mask(A, M, 1, 0.3, 0.2)
    assert not out[0].any()          # N = 0 everywhere -> minmax 0 -> nothing passes β
    assert out[1].any()


def test_weighted_input_mask_per_class():
    # class 0 wants output 0 (reads input 0), class 1 wants output 1 (reads input 2)
    A = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]],
                      [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    M = torch.tensor([[True, False], [False, True]])
    assert weighted_input_mask(A, M, 1, 0.3, 0.2).tolist() == [[True, False, False],
                                                             [False, False, True]]


def test_weighted_input_mask_grouped_sums_within_groups():
    # groups=2, O=4 (2 per group), I=4 (I/g = 2): outputs 0,1 read inputs 0,1; outputs 2,3 read 2,3
    A = torch.tensor([[[3.0, 0.0],     # B = [1, 0]
                       [6.0, 1.0],     # B = [1, 0]  (R[1] = 1/(5+ε) < .3)
                       [0.0, 2.0],     # B = [0, 1]
                       [4.0, 4.0]]])   # constant row -> B = [1, 1]
    M = torch.ones(1, 4, dtype=torch.bool)
    # N = [1+1, 0, 0+1, 1+1] = [2, 0, 1, 2] -> minmax ≈ [1, 0, .5, 1]
    assert weighted_input_mask(A, M, 2, 0.3, 0.2).tolist() == [[True, False, True, True]]
    assert weighted_input_mask(A, M, 2, 0.3, 0.5).tolist() == [[True, False, False, True]]
    # only group 1 wanted: N = [0, 0, 1, 2] -> ≈ [0, 0, .5, 1]
    M1 = torch.tensor([[False, False, True, True]])
    assert weighted_input_mask(A, M1, 2, 0.3, 0.2).tolist() == [[False, False, True, True]]


def test_weighted_input_mask_depthwise_degenerate_rows():
    # depthwise: O = I = groups = 3, each output sees one input; every row is constant
    A = torch.tensor([[[2.0], [0.0], [5.0]]])
    # wanted outputs 0 and 1: B = [1, 0, 1] (zero row -> 0) -> N = [1, 0, 0]
    assert weighted_input_mask(A, torch.tensor([[True, True, False]]), 3, 0.3, 0.2).tolist() == \
        [[True, False, False]]
    # all wanted and all positive: N = [1, 1, 1] is constant -> min-max 1 -> every input kept
    A_pos = torch.tensor([[[2.0], [1.0], [5.0]]])
    assert weighted_input_mask(A_pos, torch.ones(1, 3, dtype=torch.bool), 3, 0.3, 0.2).tolist() \
        == [[True, True, True]]


# ----------------------------------------------------------------------------- residual net

class ResidualNet(nn.Module):
    """stem (conv-bn-relu) -> [conv-bn-relu -> conv-bn] + skip -> relu -> pool -> linear."""

    def __init__(self, c: int = 4, classes: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(c)
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.b2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        skip = F.relu(self.stem_bn(self.stem(x)))
        y = self.b2(self.c2(F.relu(self.b1(self.c1(skip)))))
        z = F.relu(y + skip)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def residual_contributions() -> dict:
    K, C = 2, 4
    return {
        "stem": torch.ones(K, C, 3),  # its input is the image: never pruned
        # class 0 wants logit 0 <- channel 0; class 1 wants logit 1 <- channel 3
        "fc": contrib(K, 2, C, {(0, 0): [5, 0, 0, 0], (1, 1): [0, 0, 0, 5]}, decoy={0: 1, 1: 2}),
        # add mask c0 {0}, c1 {3}: c2 output 0 reads input 2 (c0), output 3 reads input 1 (c1)
        "c2": contrib(K, C, C, {(0, 0): [0, 0, 3, 0], (1, 3): [0, 2, 0, 0]}, decoy={0: 0, 1: 0}),
        # c2-input mask c0 {2}, c1 {1}: c1 output 2 reads 1 (c0), output 1 reads 3 (c1)
        "c1": contrib(K, C, C, {(0, 2): [0, 1, 0, 0], (1, 1): [0, 0, 0, 1]}, decoy={0: 2, 1: 0}),
    }


def test_residual_fork_or_and_add_operands():
    gm, cg, masks = run_locate(ResidualNet(), torch.randn(1, 3, 8, 8), residual_contributions())
    names = {n.name: n for n in gm.graph.nodes}
    add = next(n.name for n in gm.graph.nodes if n.op == "call_function" and "add" in n.name)
    add_node = names[add]
    bn2_name, skip_name = add_node.args[0].name, add_node.args[1].name
    assert (bn2_name, skip_name) == ("b2", "relu")

    # the logits: onehot(c)
    assert torch.equal(masks.masks[cg.output], torch.eye(2, dtype=torch.bool).reshape(2, 1, 2))

    want_add = [{0}, {3}]
    for name in [add, "relu_2", "adaptive_avg_pool2d", "flatten"]:
        assert sets(channel_mask(masks, name)) == want_add, name
    # each add operand gets the add's output mask (b2 only feeds the add)
    assert sets(channel_mask(masks, "b2")) == want_add
    assert sets(channel_mask(masks, "c2")) == want_add          # BN passes it unchanged
    # inside the block: what c2 asks of its input
    for name in ["relu_1", "b1", "c1"]:
        assert sets(channel_mask(masks, name)) == [{2}, {1}], name
    # the skip tensor: OR of the add's mask ({0} / {3}) and what c1 asks ({1} / {3})
    skip = channel_mask(masks, skip_name)
    assert sets(skip) == [{0, 1}, {3}]
    assert sets(channel_mask(masks, "stem_bn")) == [{0, 1}, {3}]
    assert sets(channel_mask(masks, "stem")) == [{0, 1}, {3}]
    # the task {0, 1} votes the OR of both classes
    votes = masks.votes([1, 0])
    assert sets(votes[skip_name].reshape(1, -1)) == [{0, 1, 3}]
    assert sets(votes["c1"].reshape(1, -1)) == [{1, 2}]
    # results live in the analysis result, never in the graph
    assert all(not any(k.startswith("mdafx.") for k in n.meta) for n in names.values())


def test_residual_skip_is_exactly_the_or_of_its_consumers():
    # same net; the c1 row changes so that the block asks for the add's channel too: OR, not sum
    A = residual_contributions()
    A["c1"][0, 2] = torch.tensor([1.0, 0.0, 0.0, 0.0])   # c0: c1 now asks channel 0 (= add's)
    _, _, masks = run_locate(ResidualNet(), torch.randn(1, 3, 8, 8), A)
    assert sets(channel_mask(masks, "relu")) == [{0}, {3}]


# ----------------------------------------------------------------------------- inception

class InceptionNet(nn.Module):
    """stem -> three conv branches of widths 2, 3, 4 -> cat (9) -> pool -> linear."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.c = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(9, classes)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.a(s)), F.relu(self.b(s)), F.relu(self.c(s))], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_inception_cat_splits_by_offsets():
    K = 2
    onehot = lambda idx, n: [4.0 if i in idx else 0.0 for i in range(n)]  # noqa: E731
    A = {
        "stem": torch.ones(K, 3, 3),
        # cat mask: c0 {1, 2, 6}, c1 {0, 4, 8}
        "fc": contrib(K, 2, 9, {(0, 0): onehot({1, 2, 6}, 9), (1, 1): onehot({0, 4, 8}, 9)},
                      decoy={0: 3, 1: 5}),
        # branch a (cat 0..1): c0 wants a1 (reads stem 0), c1 wants a0 (reads stem 2)
        "a": contrib(K, 2, 3, {(0, 1): [1, 0, 0], (1, 0): [0, 0, 2]}, decoy={0: 2, 1: 0}),
        # branch b (cat 2..4): c0 wants b0 (reads stem 1), c1 wants b2 (reads stem 2)
        "b": contrib(K, 3, 3, {(0, 0): [0, 1, 0], (1, 2): [0, 0, 1]}, decoy={0: 2, 1: 0}),
        # branch c (cat 5..8): c0 wants c1 (reads stem 0), c1 wants c3 (reads stem 2)
        "c": contrib(K, 4, 3, {(0, 1): [3, 0, 0], (1, 3): [0, 0, 3]}, decoy={0: 2, 1: 0}),
    }
    gm, cg, masks = run_locate(InceptionNet(), torch.randn(1, 3, 6, 6), A)
    cat = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.cat)
    cat_mask = channel_mask(masks, cat.name)
    assert sets(cat_mask) == [{1, 2, 6}, {0, 4, 8}]
    branch_outputs = [a.name for a in cat.args[0]]
    for name, lo, hi in zip(branch_outputs, (0, 2, 5), (2, 5, 9)):
        assert torch.equal(channel_mask(masks, name), cat_mask[:, lo:hi]), name
    assert sets(channel_mask(masks, "a")) == [{1}, {0}]
    assert sets(channel_mask(masks, "b")) == [{0}, {2}]
    assert sets(channel_mask(masks, "c")) == [{1}, {3}]
    # the stem feeds three branches: OR of what each asks
    assert sets(channel_mask(masks, "relu")) == [{0, 1}, {2}]


# ----------------------------------------------------------------------------- flatten -> linear

class FlattenNet(nn.Module):
    """conv (C=3) at 2x2 -> bn -> relu -> flatten (12 features, f = 4·channel + pos) -> linear."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


def test_flatten_feature_maps_to_channel_f_div_4():
    K = 3
    feat = lambda idx: [2.0 if f in idx else 0.0 for f in range(12)]  # noqa: E731
    A = {
        "conv": torch.ones(K, 3, 3),
        # features: c0 {5} -> ch 1;  c1 {6, 9} -> ch {1, 2};  c2 {3} -> ch 0
        # (an HWC layout, f % 3, would give ch 2, {0}, {0} instead)
        "fc": contrib(K, K, 12, {(0, 0): feat({5}), (1, 1): feat({6, 9}), (2, 2): feat({3})},
                      decoy={0: 11, 1: 0, 2: 11}),
    }
    gm, cg, masks = run_locate(FlattenNet(), torch.randn(1, 3, 2, 2), A)
    flat = channel_mask(masks, "flatten")
    assert flat.shape == (K, 12)
    assert sets(flat) == [{5}, {6, 9}, {3}]
    want = [{1}, {1, 2}, {0}]
    for name in ["relu", "bn", "conv"]:
        assert sets(channel_mask(masks, name)) == want, name
    # the general rule: channel ch matters iff one of its 4 features does
    chan = channel_mask(masks, "relu")
    assert torch.equal(chan, flat.reshape(K, 3, 4).any(2))


def test_flatten_all_features_of_one_channel():
    K = 3
    A = {"conv": torch.ones(K, 3, 3),
         "fc": contrib(K, K, 12, {(0, 0): [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0],
                                  (1, 1): [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                                  (2, 2): [1] * 12})}
    _, _, masks = run_locate(FlattenNet(), torch.randn(1, 3, 2, 2), A)
    # c2's row is constant: every feature (degenerate min-max rule), so every channel
    assert sets(channel_mask(masks, "relu")) == [{1}, {0, 2}, {0, 1, 2}]


# ----------------------------------------------------------------------------- thresholds

class ChainNet(nn.Module):
    """c1 (3->4) -> relu -> c2 (4->3, 1x1) -> relu -> pool -> linear (3->2)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def chain_contributions() -> dict:
    K = 2
    return {
        "c1": torch.ones(K, 4, 3),
        # c0: constant row -> every input of fc (degenerate rule), for any α < 1
        # c1: R ≈ [0, .5, 1] -> {1, 2} at α=.4, {2} at α=.5 (1/2 scaled by 1/(1+ε) < .5)
        "fc": contrib(K, 2, 3, {(0, 0): [1, 1, 1], (1, 1): [0, 0.5, 1]}, decoy={1: 0}),
        # c0 wants rows 0,1,2: N = [3, 2, 1, 0] -> minmax ≈ [1, .67, .33, 0]
        # c1 wants rows 1,2 -> N = [1, 1, 0, 0]; or only row 2 -> N = [1, 0, 0, 0]
        "c2": contrib(K, 3, 4, {(0, 0): [1, 1, 1, 0], (0, 1): [1, 1, 0, 0], (0, 2): [1, 0, 0, 0],
                                (1, 0): [0, 0, 0, 1], (1, 1): [0, 1, 0, 0], (1, 2): [1, 0, 0, 0]}),
    }


# (thresholds, fc-input mask per class, c2-input mask per class), all by hand from above
THRESHOLD_CASES = [
    (Thresholds(), [{0, 1, 2}, {1, 2}], [{0, 1, 2}, {0, 1}]),
    (Thresholds(linear_alpha=0.5), [{0, 1, 2}, {2}], [{0, 1, 2}, {0}]),
    (Thresholds(linear_alpha=0.0), [{0, 1, 2}, {1, 2}], [{0, 1, 2}, {0, 1}]),  # strict: R=0 out
    (Thresholds(conv_beta=0.5), [{0, 1, 2}, {1, 2}], [{0, 1}, {0, 1}]),
    (Thresholds(conv_beta=0.7), [{0, 1, 2}, {1, 2}], [{0}, {0, 1}]),
    (Thresholds(conv_beta=0.0), [{0, 1, 2}, {1, 2}], [{0, 1, 2}, {0, 1}]),    # strict: N=0 out
    # β = 1: even the top score (N_max/(N_max - N_min + ε) < 1, or 1 for a constant N) fails
    (Thresholds(linear_beta=1.0), [set(), set()], [set(), set()]),
]


@pytest.mark.parametrize("thresholds, want_fc_in, want_c2_in", THRESHOLD_CASES)
def test_thresholds_by_hand(thresholds, want_fc_in, want_c2_in):
    _, _, masks = run_locate(ChainNet(), torch.randn(1, 3, 4, 4), chain_contributions(),
                             thresholds)
    assert sets(channel_mask(masks, "flatten")) == want_fc_in
    assert sets(channel_mask(masks, "relu")) == want_c2_in
    assert masks.thresholds == thresholds


def test_raising_thresholds_never_grows_the_masks_here():
    """On this net, a larger α or β keeps a subset. Not a general law: a smaller output mask
    can raise an input's relative score (see test_weighted_input_mask_alpha_then_beta_by_hand)."""
    A = chain_contributions()
    ladder = [Thresholds().scaled(f) for f in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)]
    prev = None
    sizes = []
    for t in ladder:
        _, _, masks = run_locate(ChainNet(), torch.randn(1, 3, 4, 4), A, t)
        cur = torch.cat([channel_mask(masks, "flatten"), channel_mask(masks, "relu")], 1)
        if prev is not None:
            assert not (cur & ~prev).any(), f"{t} marks a channel that lower thresholds did not"
        sizes.append(int(cur.sum()))
        prev = cur
    assert sizes[0] > sizes[-1], sizes     # the ladder does change something


def test_thresholds_pick_by_layer_type():
    assert Thresholds().for_module(nn.Linear(2, 2)) == (0.4, 0.3)
    assert Thresholds().for_module(nn.Conv2d(2, 2, 1)) == (0.3, 0.2)
    t = Thresholds(conv_alpha=0.1, conv_beta=0.2, linear_alpha=0.3, linear_beta=0.4)
    assert t.scaled(2.0) == Thresholds(0.2, 0.4, 0.6, 0.8)


# ----------------------------------------------------------------------------- edges

def test_layer_without_contributions_keeps_all_its_inputs():
    A = chain_contributions()
    del A["c2"]
    _, _, masks = run_locate_partial(ChainNet(), A)
    assert channel_mask(masks, "relu").all()


def run_locate_partial(model, A):
    gm = trace(model, torch.randn(1, 3, 4, 4))
    cg = channel_groups(gm)
    return gm, cg, locate(gm, A, cg=cg)


def test_empty_contributions_raise():
    gm = trace(ChainNet(), torch.randn(1, 3, 4, 4))
    with pytest.raises(PreconditionError):
        locate(gm, {})


def test_class_count_must_match_the_logits():
    A = {k: torch.cat([v, v[:1]]) for k, v in chain_contributions().items()}  # 3 classes
    gm = trace(ChainNet(), torch.randn(1, 3, 4, 4))
    with pytest.raises(PreconditionError, match="logits"):
        locate(gm, A)


# ------------------------------------------------------------------- factored contributions

@pytest.mark.parametrize("groups, O, Ig", [(1, 7, 5), (2, 6, 4), (3, 6, 1), (4, 8, 2)])
def test_layer_input_mask_equals_weighted_input_mask(groups, O, Ig):
    """Per class, wanted rows only, in row chunks: the same masks as the dense formula."""
    g = torch.Generator().manual_seed(O * 10 + Ig)
    K = 5
    A = torch.rand(K, O, Ig, generator=g)
    A[0, 1] = 3.0                          # constant rows (the degenerate min-max rule)
    A[1, 2] = 0.0
    A[2] = (A[2] * 4).round()              # ties
    M = torch.rand(K, O, generator=g) > 0.4
    M[3] = False                           # no wanted output
    M[4] = True
    for alpha, beta in [(0.3, 0.2), (0.4, 0.3), (0.0, 0.0), (0.5, -0.1), (1.0, 0.5)]:
        want = weighted_input_mask(A, M, groups, alpha, beta)
        for chunk in (1, Ig * 4, 3 * Ig * 4, 2**20):
            got = layer_input_mask(A, M, groups, alpha, beta, chunk_bytes=chunk)
            assert torch.equal(got, want), (alpha, beta, chunk)


class FactoredNet(nn.Module):
    """3×3 stem (dense A), 1×1 convs of groups 1 / 2 / depthwise and two Linears (factored)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.gpw = nn.Conv2d(12, 12, 1, groups=2)
        self.dw = nn.Conv2d(12, 24, 1, groups=12)
        self.fc1 = nn.Linear(24 * 4, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.gpw(F.relu(self.pw(x))) + x.repeat(1, 3, 1, 1)[:, :12])
        x = F.adaptive_avg_pool2d(F.relu(self.dw(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def test_locate_factored_equals_dense_profile():
    torch.manual_seed(0)
    K = 5
    gm = trace(FactoredNet(K), torch.randn(1, 3, 6, 6))
    cg = channel_groups(gm)
    x = torch.randn(4 * K, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4 * K) % K
    fac = class_contributions(gm, [(x[:7], y[:7]), (x[7:], y[7:])], K, progress=False)
    kinds = {k: isinstance(v, FactoredContribution) for k, v in fac.items()}
    assert kinds == {"stem": False, "pw": True, "gpw": True, "dw": True, "fc1": True,
                     "fc2": True}
    dense = {k: densify(v) for k, v in fac.items()}
    sizes = set()
    for scale in (0.5, 1.0, 1.5, 2.0):
        t = Thresholds().scaled(scale)
        want = locate(gm, dense, t, cg=cg)
        got = locate(gm, fac, t, cg=cg)
        one_row = locate_pass(gm, cg, fac, t, chunk_bytes=1)   # one row of A at a time
        assert want.masks.keys() == got.masks.keys() == one_row.masks.keys()
        for name in want.masks:
            assert torch.equal(got.masks[name], want.masks[name]), (scale, name)
            assert torch.equal(one_row.masks[name], want.masks[name]), (scale, name)
        for name in ("pw", "gpw", "dw", "flatten", "relu_3"):
            m = channel_mask(want, name)
            sizes.add((name, int(m.sum()), m.numel()))
    # the masks are not trivial: some channels kept, some dropped, and they move with α/β
    assert any(0 < kept < total for _, kept, total in sizes)
    assert len({kept for _, kept, _ in sizes}) > 3


def test_locate_rejects_contributions_of_another_shape():
    A = chain_contributions()
    A["c2"] = A["c2"][:, :, :3]
    gm = trace(ChainNet(), torch.randn(1, 3, 4, 4))
    with pytest.raises(PreconditionError, match="'c2'.*shape"):
        locate(gm, A)


# ----------------------------------------------------------------------------- functional layers


class ModuleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class FunctionalNet(nn.Module):
    def __init__(self, m: ModuleNet):
        super().__init__()
        self.w, self.b = nn.Parameter(m.conv.weight.detach()), nn.Parameter(m.conv.bias.detach())
        self.lw = nn.Parameter(m.fc.weight.detach())

    def forward(self, x):
        return F.linear(F.relu(F.conv2d(x, self.w, self.b, padding=1)).mean((2, 3)), self.lw)


def test_functional_layers_are_weighted_like_modules():
    torch.manual_seed(0)
    m = ModuleNet().eval()
    x, y = torch.randn(8, 3, 5, 5), torch.arange(8) % 4
    gm_m, gm_f = trace(m, x[:1]), trace(FunctionalNet(m).eval(), x[:1])
    a_m = class_contributions(gm_m, [(x, y)], 4, progress=False)
    a_f = class_contributions(gm_f, [(x, y)], 4, progress=False)
    masks_m = locate(gm_m, a_m, cg=channel_groups(gm_m))
    masks_f = locate(gm_f, a_f, cg=channel_groups(gm_f))
    assert torch.equal(masks_m.masks["conv"], masks_f.masks["conv2d"])   # fc's (α, β) of linear
    assert torch.equal(masks_m.masks["relu"], masks_f.masks["relu"])
    assert not bool(masks_f.masks["conv2d"].all())  # the thresholds did select something


def test_matmul_masks_map_rows_and_columns():
    """Attention-style matmul: each operand gets the rows (columns) its output positions read."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = nn.Linear(4, 6), nn.Linear(4, 6)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            t = x.flatten(2).transpose(1, 2)                              # [B, N, 4]
            q = self.q(t).reshape(t.shape[0], -1, 2, 3).transpose(1, 2)    # 2 heads of 3
            v = self.v(t).reshape(t.shape[0], -1, 2, 3).transpose(1, 2)
            o = ((q @ q.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(
                t.shape[0], -1, 6)
            return self.fc(o.mean(1))

    torch.manual_seed(0)
    m = Attn().eval()
    x, y = torch.randn(6, 4, 3, 3), torch.arange(6) % 3
    gm = trace(m, x[:1])
    A = class_contributions(gm, [(x, y)], 3, progress=False)
    masks = locate(gm, A, cg=channel_groups(gm))
    # the mask reaches through both matmuls to the projections' outputs
    assert masks.masks["q"].any() and masks.masks["v"].any()


class _Recurrent(nn.Module):
    """A conv feeding an LSTM (a barrier) whose output is the nested tuple ``(out, (h, c))``."""

    def __init__(self):
        super().__init__()
        self.conv, self.lstm, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.LSTM(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(self.conv(x).flatten(2).permute(2, 0, 1))
        return self.fc(out.mean(0) + h[0])


def test_locate_passes_nested_tuples_of_a_barrier_and_keeps_its_input():
    g = torch.Generator().manual_seed(0)
    A = {"conv": torch.rand(3, 8, 3, generator=g), "fc": torch.rand(3, 3, 6, generator=g)}
    gm, cg, masks = run_locate(_Recurrent().eval(), torch.randn(1, 3, 4, 4), A)
    assert "lstm" in cg.barriers
    assert channel_mask(masks, "conv").all()  # the barrier's input keeps every channel


# ----------------------------------------------------------------------------- cost exponent

class TwoResolutions(nn.Module):
    """c1 at 8x8, c2 at 4x4 (stride 2): one input channel of c1 costs 4*9*64 = 2304 MACs, one
    of c2 6*9*16 = 864."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 1).flatten(1))


def test_channel_costs_and_multipliers_by_hand():
    from mdafx.passes.locate import channel_costs, cost_multipliers

    gm = trace(TwoResolutions(), torch.randn(1, 3, 8, 8))
    assert channel_costs(gm) == {"c1": 2304, "c2": 864}
    assert cost_multipliers(gm, 0.0) == {}
    m = cost_multipliers(gm, 1.0)       # (c / sqrt(2304 * 864))^1, geometric mean 1
    assert m["c1"] == pytest.approx((2304 / 864) ** 0.5) and m["c2"] == pytest.approx(
        (864 / 2304) ** 0.5)
    assert cost_multipliers(gm, 0.5)["c1"] == pytest.approx((2304 / 864) ** 0.25)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_cost_exponent_scales_each_conv_layers_thresholds(gamma):
    """A conv's input mask is the dense rule at α·m, β·m of that layer (m from its channel
    cost), given the output mask the walk reached; linear layers keep α, β."""
    from mdafx.passes.locate import cost_multipliers

    torch.manual_seed(0)
    K = 2
    A = {"c1": torch.rand(K, 4, 3, 3, 3).sum((3, 4)), "c2": torch.rand(K, 6, 4),
         "fc": torch.rand(K, 2, 6)}
    t = Thresholds(0.5, 0.4, 0.4, 0.3, cost_exponent=gamma)
    gm, cg, masks = run_locate(TwoResolutions(), torch.randn(1, 3, 8, 8), A, t)
    m = cost_multipliers(gm, gamma)
    mult = m.get("c2", 1.0)           # (c1's input is the image: every channel is kept)
    want = weighted_input_mask(A["c2"], channel_mask(masks, "c2"), 1,
                               t.conv_alpha * mult, t.conv_beta * mult)
    assert torch.equal(channel_mask(masks, "relu"), want), gamma
    want_fc = weighted_input_mask(A["fc"], torch.eye(K, dtype=torch.bool), 1, 0.4, 0.3)
    assert torch.equal(channel_mask(masks, "flatten"), want_fc)
    if gamma:   # the exponent changes what c2 keeps here (this test would pass vacuously else)
        _, _, plain = run_locate(TwoResolutions(), torch.randn(1, 3, 8, 8), A,
                                 Thresholds(0.5, 0.4, 0.4, 0.3))
        assert not torch.equal(channel_mask(masks, "relu"), channel_mask(plain, "relu"))
