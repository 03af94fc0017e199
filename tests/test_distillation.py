"""finetune (mdafx/finetune.py): the loss by hand, the architecture kept, and a deliberately
over-pruned tiny component recovering on its task (data and model from tests/test_search.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdafx.api import cut
from mdafx.errors import PreconditionError
from mdafx.distillation import distill as finetune, distillation_loss
from mdafx.passes.locate import Thresholds
from test_search import TASK, setup


def over_pruned(task=TASK, scale: float = 1.5):
    """MDA's thresholds x1.5: the component keeps ~10% of the parameters and guesses."""
    gm, prof, *_ = setup()
    return cut(gm, prof, task, thresholds=Thresholds().scaled(scale))


def test_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 4, generator=g)
    t1, t2 = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    y = torch.tensor([0, 3, 2, 1, 0])
    T, a = 3.0, 0.3
    got = distillation_loss(s, y, [t1, t2], [[0, 1], [2, 3]], T, a)

    def kl(t, block):  # KL(teacher || student) per sample, averaged over the batch
        p_t = torch.softmax(t / T, 1)
        return (p_t * (torch.log(p_t) - torch.log_softmax(s[:, block] / T, 1))).sum(1).mean()

    ce = -torch.log_softmax(s, 1)[torch.arange(5), y].mean()
    want = a * ce + (1 - a) * T * T * (kl(t1, [0, 1]) + kl(t2, [2, 3])) / 2
    torch.testing.assert_close(got, want)
    # alpha = 1 is plain cross-entropy; alpha = 0 pure distillation
    torch.testing.assert_close(distillation_loss(s, y, [t1, t2], [[0, 1], [2, 3]], T, 1.0),
                               F.cross_entropy(s, y))
    assert float(distillation_loss(s[:, :2], y % 2, [s[:, :2]], [[0, 1]], T, 0.0)) == \
        pytest.approx(0.0, abs=1e-6)


def test_recovers_an_over_pruned_component_and_keeps_its_architecture():
    gm, _, train, _, calib, test = setup()
    comp = over_pruned()
    shapes = {k: v.shape for k, v in comp.module.state_dict().items()}
    original = {k: v.clone() for k, v in comp.module.state_dict().items()}
    module, report = finetune(comp.module, [(gm, comp.classes)], train, calib, epochs=4, lr=0.05,
                              eval_dataset=test, eval_indices=range(len(test)), seed=0)
    assert report.acc_before <= 0.8, "the component should start out over-pruned"
    assert report.acc_after >= report.acc_before + 0.15, report
    assert report.eval_images == 100 and report.train_images == 120 and report.teachers == 1
    assert {k: v.shape for k, v in module.state_dict().items()} == shapes
    assert not module.training
    # the input component is untouched: finetune trains a copy
    assert all(torch.equal(comp.module.state_dict()[k], v) for k, v in original.items())
    # deterministic for a seed
    again, report2 = finetune(comp.module, [(gm, comp.classes)], train, calib, epochs=4, lr=0.05,
                              eval_dataset=test, eval_indices=range(len(test)), seed=0)
    assert report2.acc_after == report.acc_after
    assert all(torch.equal(again.state_dict()[k], v) for k, v in module.state_dict().items())


def test_several_teachers_each_cover_their_block():
    gm, _, train, _, calib, test = setup()
    comp = over_pruned([0, 1, 2, 3], scale=2.0)
    # as for an assembled model: one teacher per block of outputs
    teachers = [(gm, {0: 0, 1: 1}), (gm, {2: 2, 3: 3})]
    module, report = finetune(comp.module, teachers, train, calib, epochs=3, lr=0.05,
                              eval_dataset=test, eval_indices=range(len(test)))
    assert report.teachers == 2 and report.eval_images == 200
    assert report.acc_after > report.acc_before


def test_bad_arguments():
    gm, _, train, _, calib, _ = setup()
    comp = over_pruned()
    common = dict(epochs=1, lr=0.01)
    with pytest.raises(PreconditionError, match="overlap"):
        finetune(comp.module, [(gm, comp.classes)], train, calib, eval_indices=calib[:3],
                 **common)
    with pytest.raises(PreconditionError, match="no teacher"):
        finetune(comp.module, [(gm, {0: 2})], train, calib[:10], eval_indices=calib[10:],
                 **common)
    with pytest.raises(PreconditionError, match="covered by teachers"):
        finetune(comp.module, [(gm, comp.classes), (gm, {1: 0})], train, calib[:10],
                 eval_indices=calib[10:], **common)
    with pytest.raises(PreconditionError, match="alpha"):
        finetune(comp.module, [(gm, comp.classes)], train, calib[:10], eval_indices=calib[10:],
                 alpha=1.5, **common)
