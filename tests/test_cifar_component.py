"""End to end on real data (MDA.md §1): train a small CIFAR-10 classifier, profile it, cut the
component of the task {airplane, ship} by names, and score it on the test images of that task.

Recipe (measured: 13-22 s wall / ~10 CPU-seconds in all on 2 moderately busy cores, and about
110 s when other jobs kept the load at 6-8 on those 2 cores):
  * source: ``tiny_cnn`` (mdafx.models), 10 classes, trained on SOURCE_PER_CLASS images of every
    class (a seeded per-class split of the training set) for EPOCHS epochs, no augmentation;
  * profile: ``mdafx.api.profile`` on that same training subset with the *default* sample count
    (MDA §1.1: the 1% most confident images of each class, here 1% of 600 = 6 per class);
  * locate with MDA's default thresholds; disassemble ["airplane", "ship"];
  * score on the 2000 CIFAR-10 test images of the two classes: the source with only the task's
    logits (``task_accuracy``) against the component (argmax of its 2 logits).

Run with ``pytest -s`` to see the numbers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mdafx.api import (channel_groups, cut, locate, masked_model, plan_from_votes,
                       profile, trace)
from mdafx.data import ArrayDataset, load_imagefolder, split_per_class
from mdafx.ir import count_params
from mdafx.models import tiny_cnn
from mdafx.evaluation import task_accuracy
from mdafx.training import train_classifier

pytestmark = pytest.mark.data

SEED = 0
SOURCE_PER_CLASS = 600
EPOCHS = 2
TASK = ["airplane", "ship"]

# Tolerance, in accuracy points, that the component may lose against the source on the task.
# MDA claims components "closely match" their source without retraining. Measured with this very
# fixture (seeds 0/1/2, 2 CPU threads): source task accuracy 0.7225/0.7005/0.7255, so the source
# itself varies by ~2.5 points over seeds; a component that outputs constant logits (or always the
# same class) scores exactly 0.50 on these 1000 + 1000 test images. Any tolerance must stay well
# below 0.72 - 0.50 = 0.22 for the test to be able to fail; 0.10 is four times the source's seed
# spread, generous for "closely match", and still rejects constant logits by 10+ points (the
# first test checks that margin on every run).
TOLERANCE = 0.10
CALIB_PER_CLASS = 100


@pytest.fixture(scope="module")
def run(data_root):
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    train = load_imagefolder(data_root / "cifar10" / "train")
    test = load_imagefolder(data_root / "cifar10" / "test")
    # the calibration images (issue #6) come from the same per-class permutation, after the
    # source's SOURCE_PER_CLASS, so they are disjoint from everything the source and profile saw
    subset, calib = split_per_class(train.labels, [SOURCE_PER_CLASS, CALIB_PER_CLASS], seed=SEED)
    train_ds = ArrayDataset.from_arrays(train)
    model = train_classifier(tiny_cnn(len(train.class_names)), train_ds, epochs=EPOCHS, lr=0.2,
                             batch_size=64, weight_decay=5e-4, seed=SEED, progress=False,
                             indices=subset)
    gm = trace(model, torch.zeros(1, 3, 32, 32))
    cg = channel_groups(gm)
    prof = profile(gm, train_ds, train.class_names, indices=subset, progress=False)
    masks = locate(gm, prof, cg=cg)
    comp = cut(gm, prof, TASK, class_names=train.class_names)

    classes = comp.classes
    index = np.flatnonzero(np.isin(test.labels, classes))
    x, y = next(ArrayDataset.from_arrays(test).batches(len(index), index))
    with torch.no_grad():
        source_logits, comp_logits = gm(x), comp(x)
    source_acc = task_accuracy(source_logits, y, classes)
    # the component's logit k is class classes[k]
    position = torch.as_tensor([classes.index(int(c)) for c in y])
    comp_acc = task_accuracy(comp_logits, position, list(range(len(classes))))
    share = {name: float((comp_logits.argmax(1) == k).float().mean())
             for k, name in enumerate(comp.class_names)}
    print(f"\n[cifar component] task {comp.class_names} = classes {classes}; "
          f"{len(subset)} training images, {prof.samples_per_class[classes[0]]} profiled per class; "
          f"source task acc {source_acc:.4f} ({count_params(gm)} params) | component acc "
          f"{comp_acc:.4f} ({comp.params} params, channels {comp.metadata['channels_kept']}/"
          f"{comp.metadata['channels_total']}) | component predicts {share}")
    return dict(gm=gm, cg=cg, masks=masks, comp=comp, x=x, y=y, classes=classes,
                source_acc=source_acc, comp_acc=comp_acc, comp_logits=comp_logits, prof=prof,
                train_ds=train_ds, calib=calib, position=position,
                class_names=train.class_names)


def test_component_is_the_masked_source_on_real_images(run):
    """The pipeline on real data: 2 logits in task order, equal to the masked-model oracle of the
    same plan, and physically smaller than the source."""
    comp, classes = run["comp"], run["classes"]
    assert classes == [0, 8]
    assert run["comp_logits"].shape == (len(run["y"]), 2)
    plan = plan_from_votes(run["cg"], run["masks"].votes(classes), classes)
    with torch.no_grad():
        want = masked_model(run["gm"], plan, run["cg"])(run["x"])
    err = ((run["comp_logits"] - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-4, err
    assert comp.params < count_params(run["gm"])
    # the source learned the task: well above the 0.5 of a constant answer, so that the
    # tolerance below can separate a working component from a degenerate one
    assert run["source_acc"] - TOLERANCE > 0.5 + 0.05, run["source_acc"]


@pytest.mark.xfail(strict=True, reason=(
    "measured: at MDA's default thresholds the tiny_cnn component of {airplane, ship} scores "
    "0.5655/0.5705/0.5000 vs the source's 0.7225/0.7005/0.7255 (seeds 0/1/2): it answers 'ship' "
    "for 88.6% (seed 0) to 100% (seed 2) of the images. A better-trained source (0.85) collapses "
    "too (0.50). MDA's default thresholds are what fails: the accuracy-targeted component below "
    "holds up on the same images."))
def test_component_accuracy_close_to_source(run):
    source_acc, comp_acc = run["source_acc"], run["comp_acc"]
    assert comp_acc >= source_acc - TOLERANCE, (
        f"component {comp_acc:.4f} loses more than {TOLERANCE} against the source "
        f"{source_acc:.4f} on {TASK}")


def test_accuracy_targeted_component_holds_up_on_test_images(run):
    """Issue #6 on real data: with the budget "at most 1 point below the source on the task's
    calibration images" (100 per class, disjoint from the source's and the profile's images) and
    norms re-estimated, the chosen component is within TOLERANCE of the source on the 2000 test
    images that the search never saw, and smaller than the source."""
    from mdafx.search import Recovery, Budget, search_thresholds

    res = search_thresholds(run["gm"], run["prof"], TASK, run["train_ds"], run["calib"],
                            Budget(max_acc_drop=1.0), class_names=run["class_names"],
                            recovery=Recovery(norms=True), cg=run["cg"])
    with torch.no_grad():
        logits = res.component(run["x"])
    acc = task_accuracy(logits, run["position"], [0, 1])
    print(f"\n[cifar targeted] {res.message}; test acc {acc:.4f} vs source "
          f"{run['source_acc']:.4f}")
    assert res.met and res.calib_images == 2 * CALIB_PER_CLASS
    assert res.candidate.params_frac < 1.0
    assert acc >= run["source_acc"] - TOLERANCE, (acc, run["source_acc"])
