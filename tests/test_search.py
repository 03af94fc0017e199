"""search_thresholds (mdafx/search.py) on a tiny CNN trained for a few seconds on synthetic data.

The data: 16x16 images of 4 classes, each a noisy class-specific pattern at a random position,
so a TinyCNN learns them in about a second and pruning too hard visibly costs accuracy. The
training split is divided per class into profiling, calibration and unused parts; a separate
"test" split exists only to prove the search never reads it.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from mdafx.api import trace
from mdafx.ir import count_macs, count_params
from mdafx.data import ArrayDataset, split_per_class
from mdafx.models import tiny_cnn
from mdafx import search
from mdafx.search import Recovery, DEFAULT_SCALES, Budget, search_thresholds, tradeoff_svg
from mdafx.training import train_classifier
from mdafx.profiling import build_profile

K = 4
SIZE = 16
TASK = [2, 0]            # not sorted: the component's logits come out in this order
SCALES = (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


def synthetic(n_per_class: int, seed: int) -> ArrayDataset:
    """Class 0: red square, 1: green square, 2: horizontal blue bars, 3: vertical blue bars;
    each at a random position on a noisy grey background."""
    rng = np.random.default_rng(seed)
    n = n_per_class * K
    labels = np.repeat(np.arange(K), n_per_class)
    imgs = rng.normal(110, 35, size=(n, SIZE, SIZE, 3))
    for i, c in enumerate(labels):
        r, q = rng.integers(0, SIZE - 7, size=2)
        patch = imgs[i, r:r + 7, q:q + 7]
        if c == 0:
            patch[..., 0] += 90
        elif c == 1:
            patch[..., 1] += 90
        elif c == 2:
            patch[::2, :, 2] += 110
        else:
            patch[:, ::2, 2] += 110
    imgs = np.clip(imgs, 0, 255).astype(np.uint8)
    return ArrayDataset(imgs, labels, mean=(0.45,) * 3, std=(0.2,) * 3)


@functools.lru_cache(maxsize=1)
def setup():
    """(gm, profile, train dataset, profiling idx, calibration idx, test dataset); trained once."""
    torch.manual_seed(0)
    train = synthetic(200, seed=0)
    test = synthetic(50, seed=1)
    select, calib, fit = split_per_class(train.labels.numpy(), [20, 60, 120], seed=0)
    model = tiny_cnn(K)
    train_classifier(model, train, epochs=3, lr=0.05, batch_size=32, weight_decay=5e-4, seed=0,
                     progress=False, indices=fit)
    gm = trace(model, torch.zeros(1, 3, SIZE, SIZE))
    prof = build_profile(gm, train.batches(64, select), K, progress=False)
    return gm, prof, train, select, calib, test


class Guarded:
    """A dataset view that raises on any read outside ``allowed`` (images or labels)."""

    def __init__(self, dataset: ArrayDataset, allowed) -> None:
        self.dataset = dataset
        self.allowed = {int(i) for i in allowed}
        self.reads = set()
        self.labels = _GuardedLabels(self)

    def check(self, indices) -> list[int]:
        indices = [int(i) for i in torch.as_tensor(np.asarray(indices)).reshape(-1).tolist()]
        bad = [i for i in indices if i not in self.allowed]
        if bad:
            raise AssertionError(f"read outside the calibration indices: {bad[:5]}")
        self.reads.update(indices)
        return indices

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        self.check([i])
        return self.dataset[i]

    def batches(self, batch_size, indices=None, *args, **kwargs):
        if indices is None:
            raise AssertionError("read the whole dataset")
        return self.dataset.batches(batch_size, self.check(indices), *args, **kwargs)


class _GuardedLabels:
    def __init__(self, owner: Guarded) -> None:
        self.owner = owner

    def __getitem__(self, idx):
        return self.owner.dataset.labels[torch.as_tensor(self.owner.check(idx))]


def test_meets_accuracy_budget_on_calibration():
    gm, prof, train, _, calib, _ = setup()
    budget = Budget(max_acc_drop=2.0)
    res = search_thresholds(gm, prof, TASK, train, calib, budget, scales=SCALES)
    assert res.met and res.candidate.meets, res.table()
    assert res.candidate.accuracy >= res.source_accuracy - 0.02 - 1e-9
    # the smallest (by MACs) of the candidates meeting the budget
    meeting = [c for c in res.candidates if c.meets]
    assert res.candidate.macs == min(c.macs for c in meeting)
    # the search pruned something, and the defaults-or-larger candidates pruned more
    assert res.candidate.macs < res.source_macs
    assert max(c.macs for c in res.candidates) > min(c.macs for c in res.candidates)
    # reported scores are the component's real calibration accuracy
    idx = [i for i in calib if int(train.labels[i]) in TASK]
    x, y = next(iter(train.batches(len(idx), idx)))
    pos = torch.tensor([TASK.index(int(v)) for v in y])
    with torch.no_grad():
        logits = res.component.module(x)
    acc = float((logits.argmax(1) == pos).float().mean())
    assert acc == pytest.approx(res.candidate.accuracy)
    # ... and its loss: the mean cross-entropy of the task logits (the fit and score images
    # are the same here: no reconstruction)
    loss = float(torch.nn.functional.cross_entropy(logits.double(), pos))
    assert res.candidate.loss == pytest.approx(loss, rel=1e-5)
    assert all((c.loss is None) == (c.accuracy is None) for c in res.candidates)
    assert res.calib_images == len(idx)
    assert res.component.classes == TASK
    assert res.component.metadata["search"]["met"] is True
    table = res.table()
    assert table.count("\n") >= len(SCALES) + 2 and "*" in table and "budget met" in table


@pytest.mark.parametrize("reestimate", [False, True])
def test_lazy_scoring_chooses_what_scoring_everything_chooses(reestimate):
    gm, prof, train, _, calib, _ = setup()
    args = (gm, prof, TASK, train, calib, Budget(max_acc_drop=2.0))
    lazy = search_thresholds(*args, scales=SCALES, recovery=Recovery(norms=reestimate))
    full = search_thresholds(*args, scales=SCALES, recovery=Recovery(norms=reestimate), score_all=True)
    assert lazy.scale == full.scale and lazy.candidate.accuracy == full.candidate.accuracy
    assert all(c.accuracy is not None for c in full.candidates)
    unscored = [c for c in lazy.candidates if c.accuracy is None]
    assert unscored and all(c.meets is None and c.macs > lazy.candidate.macs for c in unscored)
    assert "not scored" in lazy.table()


def test_deterministic_for_a_seed():
    gm, prof, train, _, calib, _ = setup()
    runs = [search_thresholds(gm, prof, TASK, train, calib, Budget(max_acc_drop=2.0),
                              scales=SCALES, recovery=Recovery(norms=True), seed=3) for _ in range(2)]
    a, b = runs
    assert [(c.scale, c.params, c.macs, c.accuracy) for c in a.candidates] == \
           [(c.scale, c.params, c.macs, c.accuracy) for c in b.candidates]
    sa, sb = a.component.module.state_dict(), b.component.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_never_reads_outside_the_calibration_indices():
    gm, prof, train, _, calib, test = setup()
    # one dataset holding the training split and, after it, the test split
    images = np.concatenate([train.images.numpy(), test.images.numpy()])
    labels = np.concatenate([train.labels.numpy(), test.labels.numpy()])
    both = ArrayDataset(images, labels, mean=(0.45,) * 3, std=(0.2,) * 3)
    guarded = Guarded(both, calib)
    res = search_thresholds(gm, prof, TASK, guarded, calib, Budget(), scales=SCALES,
                            recovery=Recovery(norms=True))
    assert guarded.reads and guarded.reads <= set(map(int, calib))
    assert len(res.candidates) == len(SCALES)
    # the norms were re-estimated on every class given, not only the task's
    assert {int(both.labels[i]) for i in guarded.reads} == set(range(K))
    # and the guard works: a search given test indices as calibration trips it
    with pytest.raises(AssertionError, match="outside"):
        search_thresholds(gm, prof, TASK, Guarded(both, calib), [len(train)], scales=SCALES)


def test_unreachable_budget_is_flagged_not_hidden():
    gm, prof, train, _, calib, _ = setup()
    res = search_thresholds(gm, prof, TASK, train, calib, Budget(max_acc_drop=-50.0),
                            scales=SCALES)
    assert not res.met and not res.candidate.meets
    assert "NOT MET" in res.message and "NOT MET" in res.table()
    assert_largest_unless_beaten(res, res.candidates)
    assert res.component.metadata["search"]["met"] is False


def assert_largest_unless_beaten(res, pool):
    """The choice rule seen from outside: the most accurate of the scored candidates of ``pool``
    within EQUALLY_LARGE of the largest's MACs fraction, or one that scores higher than it
    (significance needs the per-image results, tested below)."""
    scored = [c for c in pool if c.accuracy is not None and c.same_as is None]
    top = max(c.macs_frac for c in scored)
    band = [c for c in scored if c.macs_frac >= top - search.EQUALLY_LARGE]
    reference = max(c.accuracy for c in band)
    assert (res.candidate in band and res.candidate.accuracy == reference
            or res.candidate.accuracy > reference), res.table()


def test_choice_is_the_largest_unless_a_smaller_one_is_significantly_better():
    from mdafx.distributed import current
    from mdafx.search import Candidate, _largest_unless_beaten, significantly_better

    assert not significantly_better(0, 0) and not significantly_better(3, 1)
    assert significantly_better(10, 0) and not significantly_better(10, 10)
    assert significantly_better(30, 10) and not significantly_better(10, 30)

    def cand(macs, acc):
        return Candidate(1.0, None, params=macs, macs=macs, params_frac=macs / 10,
                         macs_frac=macs / 10, channels_kept=0, accuracy=acc)

    def right(n_right, first_wrong=0, n=100):
        h = torch.zeros(n, dtype=torch.bool)
        h[first_wrong:first_wrong + n_right] = True
        return h

    cands = [cand(1, 0.92), cand(2, 0.90), cand(3, 0.90)]
    # tied or a few images apart: the largest
    hits = {0: right(92), 1: right(90), 2: right(90, first_wrong=10)}
    assert _largest_unless_beaten([0, 1, 2], cands, hits, current()) == 2
    # the smallest gets 20 images right that the largest misses, and misses none it gets
    cands[0].accuracy, hits[0] = 1.0, right(100)
    assert _largest_unless_beaten([0, 1, 2], cands, hits, current()) == 0
    assert _largest_unless_beaten([1, 2], cands, hits, current()) == 2


def test_candidates_nearly_as_large_as_the_largest_count_as_equally_large():
    """Within EQUALLY_LARGE of the largest's MACs fraction the most accurate wins, even by a gap
    the paired test calls noise; just outside the band the paired test decides again."""
    from mdafx.distributed import current
    from mdafx.search import EQUALLY_LARGE, Candidate, _largest_unless_beaten

    def cand(macs_frac, acc):
        return Candidate(1.0, None, params=1, macs=macs_frac, params_frac=0.5,
                         macs_frac=macs_frac, channels_kept=0, accuracy=acc)

    n = 100
    hits = {0: torch.arange(n) < 84, 1: torch.arange(n) < 82, 2: torch.arange(n) < 82}
    near = 0.5 - EQUALLY_LARGE / 2
    cands = [cand(near, 0.84), cand(0.5, 0.82), cand(0.5, 0.82)]
    assert _largest_unless_beaten([0, 1, 2], cands, hits, current()) == 0
    # equally accurate within the band: the larger
    cands[0].accuracy, hits[0] = 0.82, hits[1].clone()
    assert _largest_unless_beaten([0, 1, 2], cands, hits, current()) in (1, 2)
    # outside the band two images are noise: the largest
    far = 0.5 - 2 * EQUALLY_LARGE
    cands = [cand(far, 0.84), cand(0.5, 0.82)]
    hits = {0: torch.arange(n) < 84, 1: torch.arange(n) < 82}
    assert _largest_unless_beaten([0, 1], cands, hits, current()) == 1


def test_size_budget_picks_within_it():
    gm, prof, train, _, calib, _ = setup()
    res = search_thresholds(gm, prof, TASK, train, calib, Budget(max_macs_frac=0.5),
                            scales=SCALES)
    fitting = [c for c in res.candidates if c.macs_frac <= 0.5]
    assert fitting, res.table()
    assert res.met and res.candidate.macs_frac <= 0.5
    assert_largest_unless_beaten(res, fitting)


def test_a_size_limit_between_grid_steps_is_bisected():
    """Where the (conv, linear) grid crosses the MACs limit, REFINE_STEPS more conv multipliers
    between the two neighbours are cut, and the choice can only get closer to the limit."""
    gm, prof, train, _, calib, _ = setup()
    grid = tuple((c, lin) for lin in (0.0, 1.0) for c in SCALES)
    coarse = search_thresholds(gm, prof, TASK, train, calib, Budget(), scales=grid)  # no size limit
    assert len(coarse.candidates) == len(grid)
    fracs = sorted({c.macs_frac for c in coarse.candidates})
    limit = (fracs[len(fracs) // 2 - 1] + fracs[len(fracs) // 2]) / 2   # between two grid steps
    budget = Budget(max_macs_frac=limit)
    res = search_thresholds(gm, prof, TASK, train, calib, budget, scales=grid)
    refined = res.candidates[len(grid):]
    edges = [search._budget_edges(res.candidates[:len(grid)], budget, lin) for lin in (0.0, 1.0)]
    assert len(refined) == search.REFINE_STEPS * sum(map(len, edges)) > 0, res.table()
    for c in refined:  # strictly between the neighbouring grid multipliers of its edge
        (inside, outside), = search._budget_edges(res.candidates[:len(grid)], budget, c.scale[1])
        assert min(inside, outside) < c.scale[0] < max(inside, outside)
    best_grid = max(c.macs_frac for c in res.candidates[:len(grid)] if c.macs_frac <= limit)
    best_all = max(c.macs_frac for c in res.candidates if c.macs_frac <= limit)
    assert best_all >= best_grid and res.candidate.macs_frac <= limit
    assert_largest_unless_beaten(res, [c for c in res.candidates if c.macs_frac <= limit])
    plain = search_thresholds(gm, prof, TASK, train, calib, budget, scales=SCALES)  # one multiplier
    assert len(plain.candidates) == len(SCALES)


def test_identical_plans_are_scored_once():
    gm, prof, train, _, calib, _ = setup()
    res = search_thresholds(gm, prof, TASK, train, calib, scales=(1.0, 1.0, 0.5))
    assert res.candidates[1].same_as == 0
    assert res.candidates[1].macs == res.candidates[0].macs


def test_channel_selection_changes_which_channels_not_how_many():
    """With ``select``, every candidate keeps exactly as many channels (and MACs, params) as
    without it at the same thresholds; only which ones differ, and the component records how
    many moved."""
    gm, prof, train, _, calib, _ = setup()
    args = (gm, prof, TASK, train, calib, Budget(max_acc_drop=100.0))
    plain = search_thresholds(*args, scales=SCALES, recovery=Recovery(reconstruct=True),
                              score_all=True)
    chosen = search_thresholds(*args, scales=SCALES, score_all=True,
                               recovery=Recovery(reconstruct=True, select=True))
    for a, b in zip(plain.candidates, chosen.candidates):
        assert (a.scale, a.macs, a.params, a.channels_kept) == \
            (b.scale, b.macs, b.params, b.channels_kept)
    final = chosen.component          # refined and refitted: the size its candidate says
    assert (count_macs(final.module), count_params(final.module)) == \
        (chosen.candidate.macs, chosen.candidate.params)
    moved = chosen.component.metadata["channels_selected"]
    assert isinstance(moved, int) and moved >= 0
    assert "channels_selected" not in plain.component.metadata
    assert any(a.accuracy != b.accuracy or a.loss != b.loss          # the test can fail
               for a, b in zip(plain.candidates, chosen.candidates))


def test_default_grid():
    gm, prof, train, _, calib, _ = setup()
    res = search_thresholds(gm, prof, TASK, train, calib)
    assert len(res.candidates) == len(DEFAULT_SCALES) == 51
    assert all(isinstance(c.scale, tuple) for c in res.candidates)
    assert (1.0, 1.0) in DEFAULT_SCALES                  # MDA's defaults are a candidate
    assert res.met


def test_per_type_scales_and_bad_budgets():
    gm, prof, train, _, calib, _ = setup()
    res = search_thresholds(gm, prof, TASK, train, calib, scales=((1.0, 0.5), (2.0, 1.0)))
    t = res.candidates[0].thresholds
    assert (t.conv_alpha, t.linear_alpha) == pytest.approx((0.3, 0.2))
    assert Budget().max_acc_drop == 1.0 and Budget(max_macs_frac=0.5).max_acc_drop is None
    with pytest.raises(Exception, match="max_macs_frac"):
        Budget(max_macs_frac=1.5)


def test_tradeoff_svg_draws_every_distinct_candidate():
    import xml.etree.ElementTree as ET

    gm, prof, train, _, calib, _ = setup()
    lazy = search_thresholds(gm, prof, TASK, train, calib, Budget(max_acc_drop=2.0),
                             scales=SCALES)
    sized = search_thresholds(gm, prof, TASK, train, calib, Budget(max_macs_frac=0.5),
                              scales=SCALES)
    svg = ET.fromstring(tradeoff_svg([("lazy", lazy), ("sized", sized)]))
    ns = "{http://www.w3.org/2000/svg}"
    panels = [g for g in svg.iter(f"{ns}g") if g.get("class") == "search"]
    assert [g.get("data-title") for g in panels] == ["lazy", "sized"]
    for panel, res in zip(panels, (lazy, sized)):
        distinct = [c for c in res.candidates if c.same_as is None]
        dots = [c.get("class") for c in panel.iter(f"{ns}circle")
                if not c.get("class").endswith("legend")]
        legend = [c.get("class") for c in panel.iter(f"{ns}circle")
                  if c.get("class").endswith("legend")]
        assert legend == ["candidate legend", "candidate chosen legend"]
        labels = [t.text for t in panel.iter(f"{ns}text") if t.get("class") == "limit-label"]
        assert labels == (["accuracy floor: source - 2 pts"] if res is lazy
                          else ["MACs ceiling 50%"])
        ticks = [t for t in panel.iter(f"{ns}line") if t.get("class") == "unscored"]
        assert len(dots) == sum(c.accuracy is not None for c in distinct)
        assert len(ticks) == sum(c.accuracy is None for c in distinct)
        assert dots.count("candidate chosen") == 1
        limits = [t.get("data-limit") for t in panel.iter(f"{ns}line")
                  if t.get("class") == "limit"]
        assert limits == (["accuracy"] if res is lazy else ["macs"])
    assert any(c.accuracy is None for c in lazy.candidates)  # the lazy panel has ticks
