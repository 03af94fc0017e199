"""Optional, explicit fine-tuning of a component (or an assembled model) with distillation.

MDA's components need no training (MDA.md §1); this module is the paper's optional last step
(§4: "assembled models optionally fine-tuned briefly"). Nothing in mdafx calls it implicitly.

The student outputs one logit per task class. Each *teacher* is a source model with a class map
``{student position p: teacher logit l}``; it covers the positions ``P_k`` of its map. For a
component of task ``T = (c_1, ..., c_n)`` from source ``S`` the only teacher is ``(S, [c_1, ...,
c_n])``; an assembled model has one teacher per source, each covering its component's classes.
Per batch (``s`` student logits, ``t_k`` teacher k's logits, ``y`` the student position of the
label, ``T`` the temperature)::

    loss = α · CE(s, y) + (1 − α) · (1/K) · Σ_k T² · KL(softmax(t_k[L_k]/T) ‖ softmax(s[P_k]/T))

where ``L_k`` are teacher k's logits for the positions ``P_k`` (its *task logits*: the source's
logits restricted to the classes it covers). Teachers are combined block-wise: each teacher's
distribution is compared with the student's softmax over the *same block* of positions, and the
K block terms are averaged (one vote per teacher). We do not softmax over the concatenated
teacher logits, because logits of different sources live on different scales (the reason for
MDA §2.1's parameter scaling), so their concatenation is not a distribution any teacher stated;
cross-block decisions (is it a cat or an airplane?) are learned from the labels (the CE term).
The KL is Hinton's direction, ``KL(teacher ‖ student)`` (``F.kl_div(log p_s, p_t)``), i.e. the
cross-entropy to the teacher's soft targets up to a constant; ``T²`` keeps its gradients on the
scale of the CE term's.

Only samples whose label belongs to the task are used (labels map to student positions through
``label_map``, by default teacher logit index = dataset label). The architecture never changes:
the student is deep-copied, trained (SGD + Nesterov, cosine learning rate, weight decay on
weights only, BatchNorm in training mode), and the state_dict's keys and shapes are checked to be
unchanged. Accuracy is reported before and after on a held-out split given by the caller.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .api import labels_at
from .errors import PreconditionError

__all__ = ["FinetuneReport", "distillation_loss", "finetune"]


@dataclass
class FinetuneReport:
    acc_before: float           # on the held-out images of the task, 0..1
    acc_after: float
    eval_images: int
    train_images: int
    epochs: int
    steps: int
    seconds: float
    lr: float
    temperature: float
    alpha: float
    teachers: int
    epoch_losses: list[float] = field(default_factory=list)


def _teachers(teachers: Sequence[tuple[nn.Module, Any]], width: int
              ) -> list[tuple[nn.Module, list[int], list[int]]]:
    """``[(module, positions P_k, teacher logits L_k)]``, checked: positions in range, each
    covered by exactly one teacher."""
    if not teachers:
        raise PreconditionError("finetune needs at least one (teacher, class map)")
    out, covered = [], {}
    for k, (module, class_map) in enumerate(teachers):
        items = (sorted(class_map.items()) if isinstance(class_map, Mapping)
                 else list(enumerate(class_map)))
        if not items:
            raise PreconditionError(f"teacher #{k} has an empty class map")
        positions = [int(p) for p, _ in items]
        logits = [int(l) for _, l in items]
        for p in positions:
            if not 0 <= p < width:
                raise PreconditionError(f"teacher #{k} maps student position {p}, but the "
                                        f"student has {width} outputs")
            if p in covered:
                raise PreconditionError(f"student position {p} is covered by teachers "
                                        f"#{covered[p]} and #{k}")
            covered[p] = k
        out.append((module, positions, logits))
    missing = sorted(set(range(width)) - set(covered))
    if missing:
        raise PreconditionError(f"student positions {missing} have no teacher")
    return out


def distillation_loss(student: torch.Tensor, targets: torch.Tensor,
                      teacher_logits: Sequence[torch.Tensor], positions: Sequence[Sequence[int]],
                      temperature: float = 4.0, alpha: float = 0.5) -> torch.Tensor:
    """The loss of the module docstring. ``teacher_logits[k]`` is teacher k's task logits
    ``[B, len(positions[k])]`` (already restricted to ``L_k``), ``targets`` student positions."""
    loss = alpha * F.cross_entropy(student, targets) if alpha > 0 else student.new_zeros(())
    if alpha < 1:
        T = temperature
        kd = student.new_zeros(())
        for t, pos in zip(teacher_logits, positions):
            log_p_s = F.log_softmax(student[:, list(pos)] / T, dim=1)
            p_t = F.softmax(t.float() / T, dim=1)
            kd = kd + F.kl_div(log_p_s, p_t, reduction="batchmean") * T * T
        loss = loss + (1 - alpha) * kd / len(teacher_logits)
    return loss


def _select(dataset, indices, label_map: Mapping[int, int]) -> tuple[list[int], torch.Tensor]:
    """The indices whose label is in the task, and their student positions."""
    indices = [int(i) for i in indices]
    labels = labels_at(dataset, indices).tolist()
    kept = [(i, label_map[y]) for i, y in zip(indices, labels) if y in label_map]
    if not kept:
        raise PreconditionError(f"no sample with a label in the task {sorted(label_map)}")
    return [i for i, _ in kept], torch.as_tensor([p for _, p in kept])


def _batches(dataset, indices: list[int], batch_size: int, shuffle: bool = False,
             generator: torch.Generator | None = None, drop_last: bool = False):
    """``(x, idx positions)`` batches: ``dataset.batches`` when there is one (ArrayDataset, with
    its own augmentation), else stacked ``dataset[i]``."""
    order = torch.arange(len(indices))
    if shuffle:
        order = order[torch.randperm(len(indices), generator=generator)]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        pos = order[start:start + batch_size]
        chunk = [indices[int(p)] for p in pos]
        if hasattr(dataset, "batches"):
            x, _ = next(iter(dataset.batches(len(chunk), chunk, generator=generator)))
        else:
            x = torch.stack([torch.as_tensor(dataset[i][0]) for i in chunk])
        yield x, pos


@torch.no_grad()
def _accuracy(module: nn.Module, dataset, indices: list[int], targets: torch.Tensor,
              batch_size: int) -> float:
    was_training = module.training
    module.eval()
    correct = 0
    try:
        for x, pos in _batches(dataset, indices, batch_size):
            correct += int((module(x).argmax(1) == targets[pos]).sum())
    finally:
        module.train(was_training)
    return correct / len(indices)


def _signature(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def finetune(component_module: nn.Module, teacher_modules_and_class_maps, dataset,
             indices: Sequence[int], epochs: int, lr: float, temperature: float = 4.0,
             alpha: float = 0.5, seed: int = 0, *, eval_indices: Sequence[int],
             eval_dataset=None, label_map: Mapping[int, int] | None = None,
             batch_size: int = 64, weight_decay: float = 5e-4, momentum: float = 0.9
             ) -> tuple[nn.Module, FinetuneReport]:
    """Fine-tune a copy of ``component_module`` on ``dataset[indices]`` (only the task's
    classes) with the distillation loss of the module docstring; return it (in eval mode) and a
    :class:`FinetuneReport` with the accuracy before and after on ``eval_dataset[eval_indices]``
    (default dataset: ``dataset``; the indices must then be disjoint from ``indices``).

    ``teacher_modules_and_class_maps``: ``[(teacher, class_map)]`` where ``class_map`` is a
    list (teacher logit of student position 0, 1, ...) or a dict ``{position: teacher logit}``.
    ``label_map`` maps dataset labels to student positions (default: teacher logit index =
    dataset label). The input module is not modified.
    """
    if epochs < 1:
        raise PreconditionError(f"epochs must be >= 1, got {epochs}")
    if not 0.0 <= alpha <= 1.0:
        raise PreconditionError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise PreconditionError(f"temperature must be > 0, got {temperature}")
    eval_dataset = dataset if eval_dataset is None else eval_dataset
    if eval_dataset is dataset and set(map(int, indices)) & set(map(int, eval_indices)):
        raise PreconditionError("the held-out indices overlap the fine-tuning indices")

    student = copy.deepcopy(component_module)
    was = [(m, m.training) for m in (t for t, _ in teacher_modules_and_class_maps)]
    x_probe = next(_batches(dataset, [int(next(iter(indices)))], 1))[0]
    with torch.no_grad():
        student.eval()
        width = student(x_probe).shape[1]
    teachers = _teachers(teacher_modules_and_class_maps, width)
    if label_map is None:
        label_map = {}
        for _, positions, logits in teachers:
            for p, l in zip(positions, logits):
                if l in label_map:
                    raise PreconditionError(f"dataset label {l} maps to student positions "
                                            f"{label_map[l]} and {p}: give label_map")
                label_map[l] = p
    label_map = {int(k): int(v) for k, v in label_map.items()}
    train_idx, train_targets = _select(dataset, indices, label_map)
    eval_idx, eval_targets = _select(eval_dataset, eval_indices, label_map)
    before = _signature(student)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    acc_before = _accuracy(student, eval_dataset, eval_idx, eval_targets, 256)
    decay = [p for p in student.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum, nesterov=momentum > 0)
    drop_last = len(train_idx) >= batch_size
    steps_per_epoch = max(1, len(train_idx) // batch_size if drop_last else 1)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))

    t0 = time.perf_counter()
    epoch_losses, steps = [], 0
    for t, _ in teacher_modules_and_class_maps:
        t.eval()
    try:
        student.train()
        for _ in range(epochs):
            loss_sum, seen = 0.0, 0
            for x, pos in _batches(dataset, train_idx, batch_size, shuffle=True, generator=gen,
                                   drop_last=drop_last):
                y = train_targets[pos]
                with torch.no_grad():
                    t_logits = [t(x)[:, logits] for t, _, logits in teachers]
                out = student(x)
                loss = distillation_loss(out, y, t_logits, [p for _, p, _ in teachers],
                                         temperature, alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                steps += 1
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"fine-tuning diverged (lr={lr})")
            epoch_losses.append(loss_sum / max(1, seen))
    finally:
        for m, training in was:
            m.train(training)
    seconds = time.perf_counter() - t0
    student.eval()

    after = _signature(student)
    if after != before:
        raise AssertionError("fine-tuning changed the architecture: state_dict keys/shapes "
                             f"differ ({sorted(set(before) ^ set(after))[:5]} ...)")
    acc_after = _accuracy(student, eval_dataset, eval_idx, eval_targets, 256)
    return student, FinetuneReport(acc_before, acc_after, len(eval_idx), len(train_idx), epochs,
                                   steps, seconds, lr, temperature, alpha, len(teachers),
                                   epoch_losses)
