"""Training and scoring of classifiers (the MDA source models, and baselines to compare with).

``train_classifier`` is a plain, deterministic recipe: SGD with Nesterov momentum, a one-cycle
learning rate (linear warm-up, cosine decay), weight decay on conv/linear weights only, and
optional label smoothing. Determinism: the data order and augmentation come from a
``torch.Generator`` seeded with ``seed``; with a fixed thread count CPU kernels are
deterministic too, so the same seed gives the same weights.

``task_accuracy`` is how a source model is scored on an MDA task T (a subset of its classes):
only the samples whose label is in T count, and the prediction is the argmax over T's logits
only, which is exactly what a component for T outputs.

>>> import torch
>>> logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 5.0, 1.0]])
>>> task_accuracy(logits, torch.tensor([2, 0, 2]), classes=[0, 2])
1.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from mdafx.data import ArrayDataset

__all__ = ["evaluate", "predict", "task_accuracy", "train_classifier"]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay only multi-dim weights (conv kernels, linear matrices): decaying BN scales and
    # biases only fights the normalisation and costs accuracy on short schedules.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train_classifier(
    model: nn.Module,
    train_ds: ArrayDataset,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    progress: bool = True,
    label_smoothing: float = 0.0,
    momentum: float = 0.9,
    warmup_frac: float = 0.15,
    channels_last: bool = False,
    indices: Sequence[int] | np.ndarray | None = None,
    on_epoch_end=None,
) -> nn.Module:
    """Train ``model`` in place on ``train_ds`` (optionally restricted to ``indices``).

    One-cycle schedule over all steps: the learning rate rises linearly from ``lr / 10`` to
    ``lr`` over ``warmup_frac`` of the steps, then follows a cosine down to ``lr / 1e4``.
    The last incomplete batch of each epoch is dropped (BatchNorm dislikes tiny batches).
    ``channels_last`` runs the convs in NHWC (faster with oneDNN on CPU); the model is returned
    in the default memory format. ``on_epoch_end(epoch, stats)`` is called after each epoch
    with ``stats = {"loss", "train_acc", "seconds", "cpu_seconds"}`` (wall and process CPU
    time; they differ when other processes compete for the cores). Returns the model, in eval mode.
    """
    import time

    from tqdm.auto import tqdm

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    n = len(train_ds) if indices is None else len(indices)
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n} training samples are fewer than one batch of {batch_size}")

    torch.manual_seed(seed)  # for any randomness inside the model (e.g. dropout)
    gen = torch.Generator().manual_seed(seed)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        _param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=momentum > 0
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=lr,
        total_steps=epochs * steps_per_epoch,
        pct_start=warmup_frac,
        anneal_strategy="cos",
        cycle_momentum=False,
        div_factor=10.0,
        final_div_factor=1e3,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    model.train()
    for epoch in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            train_ds.batches(batch_size, indices, shuffle=True, generator=gen, drop_last=True,
                             channels_last=channels_last),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=True,
            mininterval=2.0,
        )
        for x, y in bar:
            out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            lr=f"{sched.get_last_lr()[0]:.3g}", refresh=False)
        bar.close()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training diverged in epoch {epoch + 1} (lr={lr})")
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"loss": loss_sum / seen, "train_acc": correct / seen,
                                 "seconds": time.perf_counter() - t0,
                                 "cpu_seconds": time.process_time() - c0})
    if channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    return model.eval()


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of ``batches`` under ``model`` in eval mode (mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        logits, labels = [], []
        for x, y in batches:
            logits.append(model(x).float())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("predict() got no batches")
    return torch.cat(logits), torch.cat(labels)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int | None = None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """``(overall_acc, per_class_acc, confusion)`` of ``model`` on ``batches``.

    ``confusion[t, p]`` counts samples of true class t predicted as p (int64, K x K with K =
    ``num_classes`` or the logit width). ``per_class_acc[c]`` is NaN for a class with no sample.
    """
    logits, labels = predict(model, batches)
    k = num_classes if num_classes is not None else logits.shape[1]
    pred = logits.argmax(1)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).reshape(k, k).numpy()
    support = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.diag(confusion) / support
    overall = float(np.trace(confusion) / max(1, confusion.sum()))
    return overall, per_class.astype(np.float64), confusion.astype(np.int64)


def task_accuracy(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    classes: Sequence[int] | np.ndarray | torch.Tensor,
) -> float:
    """Accuracy on the samples whose label is in ``classes``, predicting the argmax over only
    those classes' logits. Raises ``ValueError`` if no sample has a label in ``classes``."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels)
    classes_t = torch.as_tensor(np.asarray(classes), dtype=torch.int64).flatten()
    if len(classes_t) == 0:
        raise ValueError("classes must not be empty")
    if len(torch.unique(classes_t)) != len(classes_t):
        raise ValueError(f"classes contain duplicates: {classes_t.tolist()}")
    mask = torch.isin(labels, classes_t)
    if not bool(mask.any()):
        raise ValueError(f"no sample has a label in classes {classes_t.tolist()}")
    pred = classes_t[logits[mask][:, classes_t].argmax(1)]
    return float((pred == labels[mask]).float().mean())
