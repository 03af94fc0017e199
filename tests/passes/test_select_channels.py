"""passes/select_channels.py: which groups are free for which reader, the block-OBS step against
a brute-force re-solve, and plans refined without changing their size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mdafx.api import channel_groups, plan_random, prune, trace
from mdafx.errors import PreconditionError
from mdafx.ir import count_macs, count_params
from mdafx.passes.reconstruct import kept_channels
from mdafx.passes.select_channels import ChannelSelection, free_blocks, obs_eliminate
from mdafx.search import Recovery


class Net(nn.Module):
    """c1 -> c2 (c1's channels read by c2 only: free), c2 -> c3 + residual (c2's channels also
    reach the sum: not free), c4 -> pool -> flatten -> fc1 (c4's channels free for fc1, four
    columns each), fc1 -> relu -> fc2 (hidden units free for fc2)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 6, 1)
        self.fc1 = nn.Linear(6 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.b1(self.c1(x)).relu()
        h = self.b2(self.c2(h)).relu()
        h = (self.c3(h) + h).relu()
        h = nn.functional.max_pool2d(self.c4(h).relu(), 4)
        return self.fc2(self.fc1(torch.flatten(h, 1)).relu())


def _setup(seed=0):
    torch.manual_seed(seed)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    gm = trace(net, torch.zeros(1, 3, 8, 8))
    return gm, channel_groups(gm)


def test_free_blocks_are_the_groups_only_one_layer_reads():
    gm, cg = _setup()
    blocks = {fb.reader: fb for fb in free_blocks(gm, cg)}
    assert sorted(blocks) == ["c2", "fc1", "fc2"]     # not c3, c4 (the residual stream)
    assert blocks["c2"].columns.shape == (8, 9)       # c1's 8 channels, 3x3 taps each
    assert blocks["fc1"].columns.shape == (6, 4)      # c4's 6 channels, 2x2 positions each
    assert blocks["fc2"].columns.shape == (16, 1)     # fc1's hidden units
    # a block's columns are where its root sits in the reader's input
    for fb in blocks.values():
        assert torch.equal(fb.column_roots[fb.columns], fb.roots[:, None].expand_as(fb.columns))


def _objective(h, w0, zero):
    """min over W with the columns ``zero`` fixed at 0 of tr((W - W0)ᵀ H (W - W0)), re-solved."""
    free = torch.ones(h.shape[0], dtype=torch.bool)
    free[zero] = False
    if not bool((~free).any()):
        return 0.0
    # W_free = W0_free - H_ff⁻¹ H_fz (0 - W0_z)  (the optimum given W_z = 0)
    delta = torch.zeros_like(w0)
    delta[~free] = -w0[~free]
    delta[free] = -torch.linalg.solve(h[free][:, free], h[free][:, ~free] @ delta[~free])
    return float((delta * (h @ delta)).sum())


def test_each_drop_is_the_cheapest_by_a_brute_force_resolve():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(300, 12) @ torch.randn(12, 12), torch.ones(300, 1)], 1).double()
    gram, w0 = x.T @ x, torch.randn(13, 3, dtype=torch.float64)
    blocks = torch.arange(12).reshape(4, 3)           # the ones column (12) in no block
    ridge = 0.05
    h = gram + ridge * gram.diagonal().mean() * torch.eye(13, dtype=torch.float64)
    dropped = []
    for keep in (3, 2, 1):
        alive = obs_eliminate(gram, w0, blocks, keep, ridge)
        assert int(alive.sum()) == keep
        now = [b for b in range(4) if not alive[b]]
        assert set(dropped) <= set(now) and len(now) == len(dropped) + 1   # greedy: nested
        new = (set(now) - set(dropped)).pop()
        cost = {b: _objective(h, w0, blocks[dropped + [b]].reshape(-1))
                for b in range(4) if b not in dropped}
        assert cost[new] == pytest.approx(min(cost.values()), rel=1e-9)
        assert len(set(round(c, 6) for c in cost.values())) == len(cost)   # no tie decided it
        dropped = now
    assert bool(obs_eliminate(gram, w0, blocks, 4, ridge).all())


def test_blocks_the_reader_ignores_go_first():
    torch.manual_seed(2)
    x = torch.cat([torch.randn(200, 8), torch.ones(200, 1)], 1).double()
    w0 = torch.randn(9, 2, dtype=torch.float64)
    w0[[1, 4, 6]] = 0.0                                # the reader ignores these inputs
    alive = obs_eliminate(x.T @ x, w0, torch.arange(8)[:, None], 5, 0.1)
    assert alive.tolist() == [True, False, True, True, False, True, False, True]


def test_refine_keeps_the_counts_and_the_size():
    gm, cg = _setup()
    plan = plan_random(cg, 0.5, seed=3, classes=[1, 2])
    selection = ChannelSelection.measure(gm, cg, torch.randn(64, 3, 8, 8))
    refined, changed = selection.refine(plan)
    assert changed > 0                                    # the test can fail
    for fb in selection.blocks:                           # as many kept per reader
        assert int(refined.keep[fb.roots].sum()) == int(plan.keep[fb.roots].sum())
    free = torch.cat([fb.roots for fb in selection.blocks])
    others = torch.ones_like(plan.keep)
    others[free] = False
    assert torch.equal(refined.keep[others], plan.keep[others])   # the rest as planned
    assert refined.classes == plan.classes and refined.keep is not plan.keep
    a, b = prune(gm, plan, cg=cg), prune(gm, refined, cg=cg)
    assert (count_macs(a), count_params(a)) == (count_macs(b), count_params(b))


def test_refine_drops_what_the_reader_does_not_read():
    gm, cg = _setup()
    with torch.no_grad():
        gm.get_submodule("fc2").weight[:, :8] = 0.0      # fc2 ignores hidden units 0..7
    plan = plan_random(cg, 0.5, seed=4, classes=[1, 2])
    selection = ChannelSelection.measure(gm, cg, torch.randn(64, 3, 8, 8))
    fb = next(fb for fb in selection.blocks if fb.reader == "fc2")
    refined, _ = selection.refine(plan)
    kept_units = kept_channels(gm, refined, cg)["fc1"].tolist()
    assert len(kept_units) == int(plan.keep[fb.roots].sum()) <= 8
    assert min(kept_units) >= 8                          # only units fc2 reads
    assert min(kept_channels(gm, plan, cg)["fc1"].tolist()) < 8   # the plan kept some it ignores


def test_select_needs_reconstruction():
    with pytest.raises(PreconditionError, match="needs reconstruct"):
        Recovery(select=True)
    assert "channels selected" in Recovery(reconstruct=True, select=True).describe()
    gm, cg = _setup()
    with pytest.raises(PreconditionError, match="positive ridge"):
        ChannelSelection.measure(gm, cg, torch.randn(4, 3, 8, 8), ridge=0.0)
