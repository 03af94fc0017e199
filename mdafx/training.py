"""Training and scoring of classifiers (the MDA source models, and baselines to compare with).

``train_classifier`` is a plain, deterministic recipe: SGD with Nesterov momentum, a one-cycle
learning rate (linear warm-up, cosine decay), weight decay on conv/linear weights only, and
optional label smoothing. Determinism: the data order and augmentation come from a
``torch.Generator`` seeded with ``seed``; with a fixed thread count CPU kernels are
deterministic too, so the same seed gives the same weights.

Scoring lives in ``mdafx.evaluation``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mdafx.data import ArrayDataset
from mdafx.distributed import on_device
from mdafx.errors import PreconditionError
from mdafx.progress import Progress

__all__ = ["train_classifier"]


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
    device: str | torch.device | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``train_ds`` (optionally restricted to ``indices``).

    One-cycle schedule over all steps: the learning rate rises linearly from ``lr / 10`` to
    ``lr`` over ``warmup_frac`` of the steps, then follows a cosine down to ``lr / 1e4``.
    The last incomplete batch of each epoch is dropped (BatchNorm dislikes tiny batches).
    ``channels_last`` runs the convs in NHWC (faster with oneDNN on CPU); the model is returned
    in the default memory format. ``on_epoch_end(epoch, stats)`` is called after each epoch
    with ``stats = {"loss", "train_acc", "seconds", "cpu_seconds"}`` (wall and process CPU
    time; they differ when other processes compete for the cores). ``device`` (default: where
    the model is) trains there and moves the model back after; ``progress`` reports every
    epoch (``mdafx.progress``). Returns the model, in eval mode.
    """
    if epochs < 1:
        raise PreconditionError(f"epochs must be >= 1, got {epochs}")
    with on_device(model, device) as dev:
        return _train(model, train_ds, epochs, lr, batch_size, weight_decay, seed, progress,
                      label_smoothing, momentum, warmup_frac, channels_last, indices,
                      on_epoch_end, dev)


def _train(model: nn.Module, train_ds: ArrayDataset, epochs: int, lr: float, batch_size: int,
           weight_decay: float, seed: int, progress: bool, label_smoothing: float,
           momentum: float, warmup_frac: float, channels_last: bool, indices, on_epoch_end,
           device: torch.device) -> nn.Module:
    """:func:`train_classifier` with the model on ``device``."""
    import time

    n = len(train_ds) if indices is None else len(indices)
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise PreconditionError(f"{n} training samples are fewer than one batch of "
                                f"{batch_size}")

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
        bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", unit="step",
                       enabled=progress)
        for x, y in train_ds.batches(batch_size, indices, shuffle=True, generator=gen,
                                     drop_last=True, channels_last=channels_last):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.note(f"loss {loss_sum / seen:.3f}, acc {correct / seen:.3f}, "
                     f"lr {sched.get_last_lr()[0]:.3g}")
            bar.update()
        bar.close()
        if not math.isfinite(loss_sum):
            raise PreconditionError(f"training diverged in epoch {epoch + 1} (lr={lr})")
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"loss": loss_sum / seen, "train_acc": correct / seen,
                                 "seconds": time.perf_counter() - t0,
                                 "cpu_seconds": time.process_time() - c0})
    if channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    return model.eval()
