"""The Python API; the CLI (``mdafx.cli``) mirrors it one subcommand per function."""
from __future__ import annotations

import torch
import torch.fx as fx

from .ir import trace
from passes.channel_groups import ChannelGraph, ChannelGroups
from passes.prune_channels import (ChannelPlan, masked_model, plan_from_votes, plan_random,
                                   prune as _prune)

__all__ = ["trace", "channel_groups", "ChannelPlan", "plan_from_votes", "plan_random", "prune",
           "masked_model"]


def channel_groups(gm: fx.GraphModule, strict: bool = False) -> ChannelGraph:
    """Channel ids, coupled groups and barriers of a traced model (see passes/channel_groups.py)."""
    return ChannelGroups(strict=strict).compute(gm)


def prune(gm: fx.GraphModule, plan: ChannelPlan | None = None, *, keep: dict | None = None,
          classes=None, cg: ChannelGraph | None = None, instruments=None) -> fx.GraphModule:
    """A physically smaller copy of ``gm``.

    Give either a ``plan`` or ``keep``: per node name, a bool mask over that node's output
    channels (a coupled group stays if any of its channels is marked; unmarked groups stay).
    ``classes`` selects and orders the output logits.
    """
    cg = cg or channel_groups(gm)
    if plan is None:
        plan = plan_from_votes(cg, keep or {}, classes)
    return _prune(gm, plan, cg, instruments)


# ----------------------------------------------------------------------------- disassembly

from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from .errors import PreconditionError  # noqa: E402
from .ir import count_params  # noqa: E402
from passes.contributions import (Profile, build_profile, default_per_class,  # noqa: E402
                                  select_confident_samples)
from passes.locate import ChannelMasks, Thresholds, locate as _locate  # noqa: E402

__all__ += ["profile", "locate", "disassemble", "Component", "Thresholds", "resolve_classes",
            "labels_at", "plan_to_dict", "plan_from_dict"]


def _batches(dataset, indices, batch_size: int, with_index: bool = False):
    """(x, y[, idx]) batches of ``dataset`` restricted to ``indices``; uses a dataset's own fast
    ``batches`` when it has one (mdafx.data.ArrayDataset)."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if hasattr(dataset, "batches"):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            x, y = next(iter(dataset.batches(len(chunk), chunk)))
            yield (x, y, torch.as_tensor(chunk)) if with_index else (x, y)
        return
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        items = [dataset[i] for i in chunk]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
        yield (x, y, torch.as_tensor(chunk)) if with_index else (x, y)


def labels_at(dataset, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Labels of ``dataset`` at ``indices`` (default: all), from its ``labels`` or ``targets``
    when it has them, else from ``dataset[i][1]``; never reads any other sample."""
    idx = torch.arange(len(dataset)) if indices is None else torch.as_tensor(
        [int(i) for i in indices], dtype=torch.long)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is not None:
        return torch.as_tensor(labels[idx] if isinstance(labels, torch.Tensor) else
                               [labels[int(i)] for i in idx]).long().reshape(-1)
    return torch.as_tensor([int(dataset[int(i)][1]) for i in idx], dtype=torch.long)


def profile(gm: fx.GraphModule, dataset, class_names: Sequence[str] | None = None, *,
            per_class: int | None = None, indices: Sequence[int] | None = None,
            batch_size: int = 128, progress: bool = True) -> Profile:
    """Select the most confident samples per class (MDA §1.1) from ``dataset`` (restricted to
    ``indices``) and accumulate per-class contributions over them (§1.2), streamed."""
    labels = labels_at(dataset)
    pool = torch.arange(len(labels)) if indices is None else torch.as_tensor(list(indices))
    num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    counts = torch.bincount(labels[pool], minlength=num_classes)
    empty = [c for c in range(num_classes) if counts[c] == 0]
    if empty:
        names = [class_names[c] if class_names else str(c) for c in empty]
        raise PreconditionError(f"no samples of class(es) {names} to profile")
    quota = ([per_class] * num_classes if per_class is not None
             else [default_per_class(int(n)) for n in counts])
    chosen = select_confident_samples(gm, _batches(dataset, pool.tolist(), batch_size, True),
                                      num_classes, quota, progress=progress)
    picked = chosen.all_indices()
    return build_profile(gm, _batches(dataset, picked, batch_size), num_classes,
                         class_names=class_names, progress=progress)


def locate(gm: fx.GraphModule, prof: Profile | dict, thresholds: Thresholds = Thresholds(),
           cg: ChannelGraph | None = None) -> ChannelMasks:
    """Per-class channel masks of every tensor (MDA §1.3)."""
    if isinstance(prof, Profile):
        prof.check_matches(gm)
        contributions = prof.contributions
    else:
        contributions = prof
    return _locate(gm, cg or channel_groups(gm), contributions, thresholds)


def resolve_classes(task, class_names: Sequence[str] | None, num_classes: int) -> list[int]:
    """Class indices of ``task`` (indices or names), checked, in the given order."""
    out = []
    for t in task:
        if isinstance(t, str) and not t.lstrip("-").isdigit():
            if not class_names or t not in class_names:
                known = ", ".join(class_names or []) or "none (pass class names)"
                raise PreconditionError(f"unknown class {t!r}; known classes: {known}")
            out.append(list(class_names).index(t))
        else:
            c = int(t)
            if not 0 <= c < num_classes:
                raise PreconditionError(f"class index {c} out of range 0..{num_classes - 1}")
            out.append(c)
    if not out:
        raise PreconditionError("the task has no classes")
    if len(set(out)) != len(out):
        raise PreconditionError(f"the task repeats a class: {list(task)}")
    return out


class RunnableModel:
    """What components and assembled models share: call them, count their parameters."""

    module: fx.GraphModule

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @property
    def params(self) -> int:
        return count_params(self.module)


@dataclass
class Component(RunnableModel):
    """A standalone model for a task: logits of ``classes`` (source indices) in that order."""

    module: fx.GraphModule
    classes: list[int]
    class_names: list[str]
    source: str = "model"
    input_shape: tuple[int, ...] = ()
    metadata: dict = field(default_factory=dict)


def disassemble(gm: fx.GraphModule, masks: ChannelMasks, task, *,
                class_names: Sequence[str] | None = None, source: str = "model",
                cg: ChannelGraph | None = None, instruments=None) -> Component:
    """Cut the task-aware component of ``task`` (MDA §1.4) out of ``gm``: keep every channel
    some class of the task relies on (coupled groups keep the union), only the task's logits."""
    cg = cg or channel_groups(gm)
    classes = resolve_classes(task, class_names, masks.num_classes)
    plan = plan_from_votes(cg, masks.votes(classes), classes)
    module = _prune(gm, plan, cg, instruments, name=source)
    names = [class_names[c] if class_names else str(c) for c in classes]
    shape = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["tensor_meta"].shape
    kept, total = _kept_share(cg, plan)
    meta = {"source": source, "classes": classes, "class_names": names,
            "thresholds": vars(masks.thresholds), "channels_kept": kept, "channels_total": total,
            "params_source": count_params(gm), "params": count_params(module),
            "plan": plan_to_dict(plan)}
    return Component(module, classes, names, source, tuple(shape), meta)


def plan_to_dict(plan: ChannelPlan) -> dict:
    """``plan`` as plain JSON: ``keep`` bit-packed (numpy ``packbits``, big-endian) in hex."""
    import numpy as np

    keep = plan.keep.numpy().astype(bool)
    return {"channel_ids": int(keep.size), "keep": np.packbits(keep).tobytes().hex(),
            "classes": None if plan.classes is None else [int(c) for c in plan.classes]}


def plan_from_dict(data: dict, cg: ChannelGraph) -> ChannelPlan:
    """The inverse of :func:`plan_to_dict`, checked against the channel ids of ``cg``."""
    import numpy as np

    n = int(data["channel_ids"])
    if n != cg.forest.size:
        raise PreconditionError(f"the plan covers {n} channel ids but the model has "
                                f"{cg.forest.size}: not the model it was made from")
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(data["keep"]), dtype=np.uint8))[:n]
    return ChannelPlan(torch.from_numpy(bits.astype(bool)), data.get("classes"))


def _kept_share(cg: ChannelGraph, plan: ChannelPlan) -> tuple[int, int]:
    roots = cg.prunable_roots()
    return int(plan.keep[roots].sum()), int(roots.numel())


# ----------------------------------------------------------------------------- the rest

# Assembly, accuracy-targeted search, fine-tuning, export and files, so that ``mdafx.api`` is the
# one place to import from. Resolved on first use (PEP 562): those modules import the
# definitions above, so importing them here would be circular.
_LATE = {
    "assemble": "mdafx.assemble", "Assembled": "mdafx.assemble", "InputFormat": "mdafx.assemble",
    "Budget": "mdafx.search", "SearchResult": "mdafx.search",
    "search_thresholds": "mdafx.search",
    "reestimate_norms": "passes.reestimate_norms",
    "finetune": "mdafx.finetune", "FinetuneReport": "mdafx.finetune",
    "export_onnx": "mdafx.export", "save_model": "mdafx.serialize",
    "load_model": "mdafx.serialize", "split_per_class": "mdafx.data",
}
__all__ += list(_LATE)


def __getattr__(name: str):
    if name in _LATE:
        import importlib

        return getattr(importlib.import_module(_LATE[name]), name)
    raise AttributeError(f"module 'mdafx.api' has no attribute {name!r}")
