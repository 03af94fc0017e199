"""Scoring models on data: logits, task accuracy, per-class tables (one copy for all of mdafx).

``task_accuracy`` is how a source model is scored on an MDA task T (a subset of its classes):
only the samples whose label is in T count, and the prediction is the argmax over T's logits
only, which is exactly what a component for T outputs. Every score refuses non-finite logits
(a model whose outputs are NaN or infinite is an error, never a 50% accuracy).

>>> import torch
>>> logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 5.0, 1.0]])
>>> task_accuracy(logits, torch.tensor([2, 0, 2]), classes=[0, 2])
1.0
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .distributed import Ranks, autocast, current, on_device
from .errors import DataError, PreconditionError
from .ir import eval_mode, module_device
from .progress import track

__all__ = ["EvaluationReport", "GuardReport", "accuracy", "guard", "accuracy_rows", "check_finite", "confusion_report",
           "evaluate", "logits_of", "matched_indices", "predict", "task_accuracy"]


def check_finite(logits: torch.Tensor, what: str = "the model") -> torch.Tensor:
    """``logits`` if every entry is finite, else a DataError naming ``what``."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(-1).sum()) if logits.dim() else 1
        raise DataError(f"{what} gives non-finite outputs (NaN or infinity) on {bad} of "
                        f"{len(logits)} images")
    return logits


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
            what: str = "the model", use_autocast: bool = False, progress: bool = False,
            total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, CPU, finite) and labels of ``batches`` under ``model`` in eval mode
    (every submodule's mode is restored), computed where the model is (under
    ``torch.autocast`` with ``use_autocast``); ``progress`` reports ``total`` batches."""
    device = module_device(model)
    logits, labels = [], []
    with eval_mode(model):
        for x, y, *_ in track(batches, f"evaluate {what}", total=total, enabled=progress):
            with autocast(device, use_autocast):
                out = model(x.to(device, non_blocking=True))
            logits.append(out.float().cpu())
            labels.append(torch.as_tensor(y))
    if not logits:
        raise PreconditionError("predict() got no batches")
    return check_finite(torch.cat(logits), what), torch.cat(labels)


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch_size: int = 256, *,
              what: str = "the model", use_autocast: bool = False) -> torch.Tensor:
    """``model`` on the rows of ``x`` in slices of ``batch_size`` (eval mode, finite), where
    the model is; float32 on the CPU."""
    device = module_device(model)
    out = []
    with eval_mode(model):
        for s in range(0, len(x), batch_size):
            with autocast(device, use_autocast):
                out.append(model(x[s:s + batch_size].to(device)).float().cpu())
    if not out:
        return torch.empty(0, 0)
    return check_finite(torch.cat(out), what)


def accuracy(logits: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> float:
    """Share of rows whose argmax is the target."""
    targets = torch.as_tensor(targets)
    if not len(targets):
        raise PreconditionError("accuracy of no samples")
    return float((logits.argmax(1) == targets).float().mean())


def task_accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                  classes: Sequence[int] | np.ndarray | torch.Tensor) -> float:
    """Accuracy on the samples whose label is in ``classes``, predicting the argmax over only
    those classes' logits."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels)
    classes_t = torch.as_tensor(np.asarray(classes), dtype=torch.int64).flatten()
    if len(classes_t) == 0:
        raise PreconditionError("classes must not be empty")
    if len(torch.unique(classes_t)) != len(classes_t):
        raise PreconditionError(f"classes contain duplicates: {classes_t.tolist()}")
    mask = torch.isin(labels, classes_t)
    if not bool(mask.any()):
        raise PreconditionError(f"no sample has a label in classes {classes_t.tolist()}")
    pred = classes_t[logits[mask][:, classes_t].argmax(1)]
    return float((pred == labels[mask]).float().mean())


def accuracy_rows(logits: torch.Tensor, positions: Sequence[int] | torch.Tensor,
                  class_names: Sequence[str]) -> list[list]:
    """Per-class rows ``[class, samples, correct, accuracy]`` and the overall row."""
    return _rows(logits.argmax(1), positions, class_names)


def _rows(pred: torch.Tensor, positions: Sequence[int] | torch.Tensor,
          class_names: Sequence[str]) -> list[list]:
    """:func:`accuracy_rows` from the predicted positions."""
    positions = torch.as_tensor(positions)
    rows = []
    for c, name in enumerate(class_names):
        hit = positions == c
        n = int(hit.sum())
        correct = int((pred[hit] == c).sum())
        rows.append([name, n, correct, correct / n if n else None])
    total, correct = len(positions), int((pred == positions).sum())
    rows.append(["overall", total, correct, correct / total if total else None])
    return rows


def confusion_report(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     num_classes: int | None = None) -> tuple[float, np.ndarray, np.ndarray]:
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


@dataclass
class EvaluationReport:
    """What :func:`evaluate` measured: per-class ``rows`` ``[class, samples, correct,
    accuracy]`` (last row: overall) of the model on the data's images of its classes, the
    same for ``source`` (the source model restricted to the same classes) when one was given,
    and the data's folders the model does not know."""

    label: str
    class_names: list[str]
    rows: list[list]
    images: int
    skipped: list[str] = field(default_factory=list)
    source_rows: list[list] | None = None

    @property
    def accuracy(self) -> float:
        return self.rows[-1][3]

    def to_dict(self) -> dict:
        def table(rows):
            return [{"class": r[0], "samples": r[1], "correct": r[2], "accuracy": r[3]}
                    for r in rows]
        return {"model": self.label, "classes": self.class_names, "images": self.images,
                "per_class": table(self.rows), "skipped_folders": self.skipped,
                "source": None if self.source_rows is None else table(self.source_rows)}


def matched_indices(dataset, class_names: Sequence[str]) -> tuple[list[int], list[int], list[str]]:
    """Indices of the samples whose folder is named like a model class, their model
    positions, and the folder names that are not."""
    from .data import class_names_of, labels_at

    folders = class_names_of(dataset) or []
    if not folders:
        raise DataError("the evaluation data must name its classes (an ImageFolder)")
    position = {name: i for i, name in enumerate(class_names)}
    labels = labels_at(dataset).tolist()
    index = [i for i, y in enumerate(labels) if folders[y] in position]
    return (index, [position[folders[labels[i]]] for i in index],
            [n for n in folders if n not in position])


def evaluate(model: nn.Module, dataset, class_names: Sequence[str], *,
             classes: Sequence[int] | None = None,
             source: nn.Module | None = None, source_classes: Sequence[int] | None = None,
             batch_size: int = 256, label: str = "model",
             device: str | torch.device | None = None, use_autocast: bool = False,
             progress: bool = False, ranks: Ranks | None = None) -> EvaluationReport:
    """Per-class accuracy of ``model`` (logits of ``class_names``, in that order) on the images
    of ``dataset`` whose folder is named like one of its classes (folders matched by name).

    ``classes`` (the model's logit index of each class) restricts a wider model, e.g. a source
    scored on a task, to those logits: it predicts over them only. With ``source`` (a source
    model) and ``source_classes`` (its logit index of each class), the source is scored on the
    same images predicting over those logits only, side by side.

    ``device`` (default: where each model is) runs the forward passes there, under
    ``torch.autocast`` with ``use_autocast``; the models are moved back after. With ``ranks``
    of several processes (default: the initialised ``torch.distributed`` group, if any) each
    rank scores its shard of the images and the predictions are gathered: every rank returns
    the same report."""
    from .data import batches

    ranks = ranks or current()
    index, positions, skipped = matched_indices(dataset, class_names)
    if not index:
        raise DataError(f"no data folder is named like a class of {label} "
                        f"({', '.join(class_names)})")
    if classes is not None and len(classes) != len(class_names):
        raise PreconditionError(f"{len(classes)} logit indices for {len(class_names)} "
                                "class names")
    mine = ranks.shard(index, batch_size)

    def scored(module: nn.Module, what: str, logit_index: Sequence[int] | None) -> torch.Tensor:
        """This rank's predicted positions (over ``logit_index`` only, when given)."""
        if not mine:
            return torch.empty(0, dtype=torch.long)
        with on_device(module, device) as dev:
            logits, _ = predict(module, batches(dataset, mine, batch_size,
                                                pin_memory=dev.type == "cuda"),
                                what=what, use_autocast=use_autocast, progress=progress,
                                total=-(-len(mine) // batch_size))
        if logit_index is not None:
            if logits.dim() != 2 or not all(0 <= int(c) < logits.shape[1] for c in logit_index):
                raise DataError(f"{what}: outputs {tuple(logits.shape[1:])} per sample, too few "
                                f"for the logit indices {list(logit_index)}")
            logits = logits[:, [int(c) for c in logit_index]]
        if logits.dim() != 2 or logits.shape[1] != len(class_names):
            raise DataError(f"{what}: outputs {tuple(logits.shape[1:])} per sample but has "
                            f"{len(class_names)} class names")
        return logits.argmax(1)

    def local() -> tuple[torch.Tensor, torch.Tensor | None]:
        pred = scored(model, label, classes)
        src = None if source is None else scored(source, "the source model",
                                                 list(source_classes))
        return pred, src

    pred, src = ranks.step("evaluation", local)
    if ranks.world > 1:
        parts = ranks.gather((pred, src))
        pred = torch.cat([p for p, _ in parts])
        src = None if source is None else torch.cat([q for _, q in parts])
    source_rows = None if src is None else _rows(src, positions, class_names)
    return EvaluationReport(label, list(class_names), _rows(pred, positions, class_names),
                            len(index), skipped, source_rows)


FAR_BELOW_PTS = 10.0
"""A component this many points below its source on calibration images is a loud warning."""


@dataclass
class GuardReport:
    """Per-class accuracy of a component and its source on calibration images, and what is
    wrong with it: classes it never predicts, a drop of :data:`FAR_BELOW_PTS` or more."""

    class_names: list[str]
    images: int
    per_class: list[tuple[str, int, float, float]]     # class, images, component, source
    accuracy: float
    source_accuracy: float
    warnings: list[str] = field(default_factory=list)

    def rows(self) -> list[list]:
        out = [[n, k, f"{a:.2%}", f"{s:.2%}", f"{100 * (a - s):+.2f}"]
               for n, k, a, s in self.per_class]
        return out + [["overall", self.images, f"{self.accuracy:.2%}",
                       f"{self.source_accuracy:.2%}",
                       f"{100 * (self.accuracy - self.source_accuracy):+.2f}"]]

    def to_dict(self) -> dict:
        return {"images": self.images, "accuracy": self.accuracy,
                "source_accuracy": self.source_accuracy, "warnings": self.warnings,
                "per_class": [{"class": n, "images": k, "accuracy": a, "source_accuracy": s}
                              for n, k, a, s in self.per_class]}


def guard(component, source: nn.Module, calibration, *, batch_size: int = 256,
          far_below: float = FAR_BELOW_PTS, device: str | torch.device | None = None
          ) -> GuardReport:
    """Score ``component`` (logits of ``component.classes``, source indices) and ``source`` on
    the calibration images ``(dataset, indices)`` of the component's task, per class, both
    predicting over the task's logits only, and name what is wrong. ``device`` (default:
    where each model is) runs the forward passes there."""
    from .data import batches, labels_at

    dataset, indices = calibration
    task = list(component.metadata.get("task") or component.classes)
    where = {c: p for p, c in enumerate(component.classes)}
    labels = labels_at(dataset, indices)
    keep = [i for i, y in zip(indices, labels.tolist()) if y in task]
    if not keep:
        raise DataError(f"no calibration image of the component's classes {task}")
    with on_device(component.module, device):
        comp_logits, y = predict(component.module, batches(dataset, keep, batch_size),
                                 what="the component")
    with on_device(source, device):
        src_logits, _ = predict(source, batches(dataset, keep, batch_size),
                                what="the source model")
    pos = torch.as_tensor([task.index(int(v)) for v in y])
    comp_pred = comp_logits[:, [where[c] for c in task]].argmax(1)
    src_pred = src_logits[:, task].argmax(1)
    names = [component.class_names[where[c]] for c in task]
    rows, warnings = [], []
    for p, name in enumerate(names):
        hit = pos == p
        n = int(hit.sum())
        a = float((comp_pred[hit] == p).float().mean()) if n else float("nan")
        s = float((src_pred[hit] == p).float().mean()) if n else float("nan")
        rows.append((name, n, a, s))
        if n and not bool((comp_pred == p).any()):
            warnings.append(f"the component never predicts class {name!r} on {len(pos)} "
                            "calibration images")
    acc = float((comp_pred == pos).float().mean())
    src = float((src_pred == pos).float().mean())
    if 100 * (src - acc) >= far_below:
        warnings.append(f"the component scores {acc:.2%} against its source's {src:.2%} on "
                        f"{len(pos)} calibration images ({100 * (acc - src):+.1f} points)")
    return GuardReport(names, len(pos), rows, acc, src, warnings)
