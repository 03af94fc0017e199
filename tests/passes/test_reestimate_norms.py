"""ReestimateNorms (passes/reestimate_norms.py): only norm statistics change, and they equal the
batch statistics computed by hand (per batch, then averaged over the batches)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdafx.api import trace
from mdafx.errors import PreconditionError
from mdafx.passmanager import PassManager
from mdafx.passes.reestimate_norms import ReestimateNorms, reestimate_batch_norms

STATS = ("running_mean", "running_var", "num_batches_tracked")


class Net(nn.Module):
    """conv-BN-ReLU-dropout-conv-BN-ReLU-pool-linear-BN1d-linear, with stale statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc1 = nn.Linear(5, 6)
        self.bn3 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)
        g = torch.Generator().manual_seed(0)
        for bn in (self.bn1, self.bn2, self.bn3):
            c = bn.num_features
            bn.weight.data = torch.rand(c, generator=g) + 0.5
            bn.bias.data = torch.randn(c, generator=g)
            bn.running_mean.copy_(torch.randn(c, generator=g) * 3)
            bn.running_var.copy_(torch.rand(c, generator=g) * 5 + 0.1)
            bn.num_batches_tracked.fill_(123)

    def forward(self, x):
        x = self.drop(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.relu(self.bn3(self.fc1(x))))


def batch_norm_by_hand(z: torch.Tensor, bn: nn.Module):
    """(normalised output in training mode, batch mean, unbiased batch variance)."""
    dims = (0, 2, 3) if z.dim() == 4 else (0,)
    shape = (1, -1, 1, 1) if z.dim() == 4 else (1, -1)
    mean, var = z.mean(dims), z.var(dims, unbiased=False)
    n = z.numel() // z.shape[1]
    out = (z - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    return out * bn.weight.view(shape) + bn.bias.view(shape), mean, var * n / (n - 1)


@torch.no_grad()
def stats_by_hand(net: Net, x: torch.Tensor):
    """Per norm (mean, unbiased var) of one batch, every norm normalising by batch statistics and
    dropout off (eval)."""
    y1, m1, v1 = batch_norm_by_hand(net.conv1(x), net.bn1)
    y2, m2, v2 = batch_norm_by_hand(net.conv2(F.relu(y1)), net.bn2)
    h = torch.flatten(F.adaptive_avg_pool2d(F.relu(y2), 1), 1)
    _, m3, v3 = batch_norm_by_hand(net.fc1(h), net.bn3)
    return [(m1, v1), (m2, v2), (m3, v3)]


def batches(n: int = 3, size: int = 6):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 8, 8, generator=g) * 2 + 1 for _ in range(n)]


def test_only_norm_statistics_change():
    net = Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    reestimate_batch_norms(net, [(x, torch.zeros(len(x))) for x in batches()])
    after = net.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        if key.rsplit(".", 1)[1] in STATS:
            assert not torch.equal(after[key], before[key]), f"{key} was not re-estimated"
        else:
            assert torch.equal(after[key], before[key]), f"{key} changed"
            assert after[key].dtype == before[key].dtype


def test_equals_the_batch_statistics_by_hand():
    xs = batches(n=1)
    net = Net().eval()
    want = stats_by_hand(net, xs[0])
    reestimate_batch_norms(net, xs)
    for bn, (mean, var) in zip((net.bn1, net.bn2, net.bn3), want):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 1


def test_several_batches_average_their_statistics():
    xs = batches(n=3)
    net = Net().eval()
    per_batch = [stats_by_hand(net, x) for x in xs]
    reestimate_batch_norms(net, xs)
    for k, bn in enumerate((net.bn1, net.bn2, net.bn3)):
        mean = torch.stack([s[k][0] for s in per_batch]).mean(0)
        var = torch.stack([s[k][1] for s in per_batch]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 3
    # for equal-sized batches the mean is the mean over every image
    z1 = torch.cat([net.conv1(x) for x in xs]).detach()
    torch.testing.assert_close(net.bn1.running_mean, z1.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_modes_and_momentum_are_restored(training):
    net = Net().train(training)
    net.bn2.eval()                      # a mixed state must survive too
    modes = {name: m.training for name, m in net.named_modules()}
    want = stats_by_hand(copy.deepcopy(net), batches(n=1)[0])
    reestimate_batch_norms(net, batches(n=1))
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert net.bn1.momentum == 0.3 and net.bn2.momentum == 0.1
    # the model has dropout after bn1: bn2's statistics match the hand computation without it,
    # so dropout stayed in eval mode even when the model was in training mode
    torch.testing.assert_close(net.bn2.running_var, want[1][1], rtol=1e-5, atol=1e-6)


def test_no_batches_is_an_error_and_changes_nothing():
    net = Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PreconditionError, match="no calibration batches"):
        reestimate_batch_norms(net, [])
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert net.bn1.momentum == 0.3 and not net.bn1.training


def test_pass_on_a_graph_module():
    net = Net().eval()
    gm = trace(net, torch.zeros(2, 3, 8, 8))
    code = gm.code
    xs = batches(n=1)
    want = stats_by_hand(net, xs[0])
    result = PassManager([ReestimateNorms(xs)]).run(gm)
    assert result.modified and result.timings[0][0] == "reestimate-norms"
    assert gm.code == code
    torch.testing.assert_close(gm.get_submodule("bn2").running_var, want[1][1],
                               rtol=1e-5, atol=1e-6)


def test_pass_without_norms_is_a_no_op():
    gm = trace(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()), torch.zeros(1, 3, 4, 4))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    assert PassManager([ReestimateNorms(batches(n=1))]).run(gm).modified is False
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in before.items())
