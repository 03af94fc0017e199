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

Devices: ``device`` runs the student, the teachers and the accuracy passes there (the batches
are moved there, pinned when it is a GPU); the models given are moved back after and the
fine-tuned copy is returned on the component's own device.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .assembly import InputAdapter, component_format
from .data import batches, labels_at, split_per_class
from .distributed import on_device, resolve_device
from .errors import InternalError, PreconditionError
from .evaluation import check_finite
from .ir import eval_mode, module_device
from .progress import Progress

__all__ = ["FinetuneReport", "distill", "distillation_loss", "finetune", "teacher_maps"]


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


def _batches(dataset, indices: list[int], targets: torch.Tensor, batch_size: int,
             device: torch.device = torch.device("cpu"), **kw):
    """``(x, target)`` batches of ``dataset[indices]`` (``targets`` aligned with ``indices``)
    on ``device``."""
    target_of = dict(zip(indices, targets.tolist()))
    cuda = device.type == "cuda"
    for x, _, idx in batches(dataset, indices, batch_size, True, pin_memory=cuda, **kw):
        yield (x.to(device, non_blocking=cuda),
               torch.as_tensor([target_of[int(i)] for i in idx]).to(device))


@torch.no_grad()
def _accuracy(module: nn.Module, dataset, indices: list[int], targets: torch.Tensor,
              batch_size: int, device: torch.device) -> float:
    correct = 0
    with eval_mode(module):
        for x, y in _batches(dataset, indices, targets, batch_size, device):
            logits = check_finite(module(x), "the fine-tuned model")
            correct += int((logits.argmax(1) == y).sum())
    return correct / len(indices)


def _signature(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def distill(component_module: nn.Module, teacher_modules_and_class_maps, dataset,
             indices: Sequence[int], epochs: int, lr: float, temperature: float = 4.0,
             alpha: float = 0.5, seed: int = 0, *, eval_indices: Sequence[int],
             eval_dataset=None, label_map: Mapping[int, int] | None = None,
             batch_size: int = 64, weight_decay: float = 5e-4, momentum: float = 0.9,
             device: str | torch.device | None = None, progress: bool = False
             ) -> tuple[nn.Module, FinetuneReport]:
    """Fine-tune a copy of ``component_module`` on ``dataset[indices]`` (only the task's
    classes) with the distillation loss of the module docstring; return it (in eval mode) and a
    :class:`FinetuneReport` with the accuracy before and after on ``eval_dataset[eval_indices]``
    (default dataset: ``dataset``; the indices must then be disjoint from ``indices``).

    ``teacher_modules_and_class_maps``: ``[(teacher, class_map)]`` where ``class_map`` is a
    list (teacher logit of student position 0, 1, ...) or a dict ``{position: teacher logit}``.
    ``label_map`` maps dataset labels to student positions (default: teacher logit index =
    dataset label). The input module is not modified. ``device`` (default: where the
    component is) trains there (module docstring); ``progress`` reports every epoch.
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

    home = module_device(component_module)
    dev = home if device is None else resolve_device(device)
    with contextlib.ExitStack() as stack:
        for teacher, _ in teacher_modules_and_class_maps:
            stack.enter_context(on_device(teacher, dev))
        student, report = _distill(copy.deepcopy(component_module).to(dev),
                                   teacher_modules_and_class_maps, dataset, indices, epochs, lr,
                                   temperature, alpha, seed, eval_indices, eval_dataset,
                                   label_map, batch_size, weight_decay, momentum, dev, progress)
    return student.to(home), report


def _distill(student: nn.Module, teacher_modules_and_class_maps, dataset, indices, epochs: int,
             lr: float, temperature: float, alpha: float, seed: int, eval_indices,
             eval_dataset, label_map, batch_size: int, weight_decay: float, momentum: float,
             dev: torch.device, progress: bool) -> tuple[nn.Module, FinetuneReport]:
    """:func:`distill` with the student (a copy) and the teachers on ``dev``."""
    was = [(m, m.training) for m in (t for t, _ in teacher_modules_and_class_maps)]
    x_probe = next(batches(dataset, [int(next(iter(indices)))], 1))[0].to(dev)
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
    acc_before = _accuracy(student, eval_dataset, eval_idx, eval_targets, 256, dev)
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
        for epoch in range(epochs):
            loss_sum, seen = 0.0, 0
            bar = Progress(steps_per_epoch, f"fine-tune epoch {epoch + 1}/{epochs}",
                           unit="step", enabled=progress)
            for x, y in _batches(dataset, train_idx, train_targets, batch_size, dev,
                                 shuffle=True, generator=gen, drop_last=drop_last):
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
                bar.note(f"loss {loss_sum / seen:.3f}")
                bar.update()
            bar.close()
            if not math.isfinite(loss_sum):
                raise PreconditionError(f"fine-tuning diverged (lr={lr}): the loss is not "
                                        "finite; lower --lr")
            epoch_losses.append(loss_sum / max(1, seen))
    finally:
        for m, training in was:
            m.train(training)
    seconds = time.perf_counter() - t0
    student.eval()

    after = _signature(student)
    if after != before:
        raise InternalError("fine-tuning changed the architecture: state_dict keys/shapes "
                             f"differ ({sorted(set(before) ^ set(after))[:5]} ...)")
    acc_after = _accuracy(student, eval_dataset, eval_idx, eval_targets, 256, dev)
    return student, FinetuneReport(acc_before, acc_after, len(eval_idx), len(train_idx), epochs,
                                   steps, seconds, lr, temperature, alpha, len(teachers),
                                   epoch_losses)


def teacher_maps(model) -> list[dict[int, int]]:
    """Per source of ``model`` (a Component: one; an Assembled model: one per component), the
    map ``{output position: that source's logit}`` it teaches; a class several components share
    is taught by the first."""
    meta = model.metadata
    if meta.get("kind") == "assembled" or hasattr(model, "class_map"):
        class_map = getattr(model, "class_map", None) or meta.get("class_map") or []
        maps: list[dict[int, int]] = [{} for _ in meta.get("components") or []]
        for position, entry in enumerate(class_map):
            first = entry["sources"][0]
            maps[int(first["component"])][position] = int(first["source_class"])
        return maps
    return [dict(enumerate(int(c) for c in model.classes))]


def finetune(model, dataset, *, epochs: int, teachers: Sequence[nn.Module] | None = None,
             lr: float = 0.01, temperature: float = 4.0, alpha: float = 0.5,
             holdout: float = 0.1, eval_dataset=None, batch_size: int = 64, seed: int = 0,
             device: str | torch.device | None = None, progress: bool = False):
    """Fine-tune a Component or Assembled model on the images of ``dataset`` (a labelled
    dataset with ``class_names``; folders matched to the model's classes by name) and report
    the accuracy before and after on ``eval_dataset`` or a ``holdout`` share held out of it.

    ``teachers[k]`` is the source model of component k (taking that source's input format):
    distillation from the sources, as MDA §4 suggests. Without teachers the frozen starting
    model is its own teacher (the labels teach; the soft targets keep what it knew), so a file
    alone is enough. Returns ``(fine-tuned model, FinetuneReport)``; the input is unchanged.
    ``device`` and ``progress`` as in :func:`distill`."""
    names = list(model.class_names)
    folders = list(getattr(dataset, "class_names", None) or [])
    position = {n: i for i, n in enumerate(names)}
    label_map = {j: position[n] for j, n in enumerate(folders) if n in position}
    if not label_map:
        raise PreconditionError(f"no class folder is named like a class of the model "
                                f"({', '.join(names)})")
    labels = labels_at(dataset).numpy()
    index = [i for i, y in enumerate(labels.tolist()) if y in label_map]
    if eval_dataset is None:
        if not 0.0 < holdout < 1.0:
            raise PreconditionError("give holdout in (0, 1) or an evaluation dataset: accuracy "
                                    "is reported on images the fine-tuning does not train on")
        fit, held = split_per_class(labels[index], [1.0 - holdout, holdout], seed=seed)
        train_idx = [index[i] for i in fit.tolist()]
        eval_idx = [index[i] for i in held.tolist()]
        eval_ds = dataset
    else:
        eval_folders = list(getattr(eval_dataset, "class_names", None) or [])
        relabel = {j: folders.index(n) for j, n in enumerate(eval_folders) if n in folders}
        missing = [n for n in eval_folders if n in position and n not in folders]
        if missing:
            raise PreconditionError(f"classes {', '.join(missing)} have evaluation images but "
                                    "no training images")
        eval_labels = labels_at(eval_dataset).tolist()
        eval_idx = [i for i, y in enumerate(eval_labels) if relabel.get(y) in label_map]
        eval_ds = _Relabelled(eval_dataset, relabel)
        train_idx = index
    if teachers is None:
        frozen = copy.deepcopy(model.module).eval()
        pairs = [(frozen, {p: p for p in range(len(names))})]
    else:
        maps = teacher_maps(model)
        if len(teachers) != len(maps):
            raise PreconditionError(f"{len(teachers)} teachers for {len(maps)} sources")
        shared = getattr(model, "input_format", None) or component_format(model)
        parts = model.metadata.get("components") or [model.metadata]
        pairs = []
        for teacher, cmap, part in zip(teachers, maps, parts):
            fmt = component_format(_Meta(part)) if part.get("input") else shared
            if fmt != shared:  # the teacher sees the student's input in its own format
                teacher = nn.Sequential(InputAdapter(shared, fmt), teacher).eval()
            if cmap:
                pairs.append((teacher, cmap))
    student, report = distill(model.module, pairs, dataset, train_idx, epochs, lr, temperature,
                              alpha, seed, eval_indices=eval_idx, eval_dataset=eval_ds,
                              label_map=label_map, batch_size=batch_size, device=device,
                              progress=progress)
    tuned = copy.copy(model)
    tuned.module = student
    tuned.metadata = {**model.metadata, "finetune": {
        "epochs": epochs, "lr": lr, "temperature": temperature, "alpha": alpha, "seed": seed,
        "teachers": "sources" if teachers is not None else "self",
        "train_images": report.train_images, "eval_images": report.eval_images,
        "acc_before": report.acc_before, "acc_after": report.acc_after}}
    return tuned, report


class _Meta:
    """An object with ``metadata`` (what ``component_format`` reads) for a metadata dict."""

    def __init__(self, metadata: dict) -> None:
        self.metadata = metadata


class _Relabelled:
    """``dataset`` with its labels mapped through ``relabel`` (other labels become -1)."""

    def __init__(self, dataset, relabel: Mapping[int, int]) -> None:
        self.dataset = dataset
        table = torch.full((max(relabel, default=0) + 1,), -1, dtype=torch.long)
        for k, v in relabel.items():
            table[k] = v
        self.labels = table[labels_at(dataset)]
        self.class_names = getattr(dataset, "class_names", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i][0], int(self.labels[i])
