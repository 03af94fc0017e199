"""Assembling (MDA §2): components of any sources into one classifier.

``assemble(components, calibration)`` builds the *parallel graph*: every component is a
branch on the shared input, which first adapts the input to the format its source was trained on
(undo the shared normalisation, convert channels, resize, apply the source's normalisation); the
branches' logits are concatenated (node ``mdafx_branches``). Then the assembly pipeline
(``mdafx.passes.assembly_pipeline``) makes the branches comparable as ``calibration`` says,
merges the branches into one wider network for ``layout="merged"`` (alignment padding, §2.2:
isomorphic components with one input format), and gives one logit per class name.

How branches are made comparable (:func:`fit_calibration`, on a calibration split of images of
*all* the assembled classes, never the test split; :data:`CALIBRATIONS`):

* ``head`` (the default): one closed-form linear head (LDA) over the concatenated features the
  components' heads read (passes/feature_head.py), replacing their logits;
* ``joint``: a factor and an offset per logit, fitted on images of all the classes
  (:func:`calibrate_jointly`);
* ``mda``: MDA §2.1's factors, each component on its own classes (:func:`calibrate`).

Measured on the CIFAR-10 sources (README, "Assembly"): ``head`` is 1.3-1.9 points above
``joint``, which is 0.1-0.6 above ``mda``.

Classes: the output has one logit per distinct class *name*, in order of first appearance over
the components. Where several components carry a class of the same name, its logit is the
maximum of their calibrated logits ("merge by max"), and the class map lists every source of it.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .data import InputFormat, batches
from .disassembly import Component, RunnableModel
from .errors import DataError, PreconditionError
from .instrument import run_pipeline
from .ir import eval_mode, trace
from .passes import assembly_pipeline
from .passes.align_padding import BRANCHES
from .passes.feature_head import SHRINKAGE, features_module, fit_head
from .passes.logit_scaling import ScaleFactors, calibrate_scales

__all__ = ["Assembled", "CALIBRATIONS", "Calibration", "InputAdapter", "assemble", "calibrate",
           "calibrate_jointly", "class_groups", "component_format", "fit_calibration",
           "guard_assembled"]

CALIBRATIONS = ("head", "joint", "mda")
"""The methods of :func:`fit_calibration`, the default first (module docstring)."""

LUMA = (0.299, 0.587, 0.114)


class InputAdapter(nn.Module):
    """Maps an input in format ``src`` to format ``dst``: de-normalise, convert channels
    (grey→RGB by repetition, RGB→grey by ITU-R 601 luma), resize (bilinear), normalise."""

    def __init__(self, src: InputFormat, dst: InputFormat) -> None:
        super().__init__()
        self.size = tuple(dst.size) if tuple(dst.size) != tuple(src.size) else None
        self.convert = (src.channels, dst.channels) if src.channels != dst.channels else None
        if self.convert not in (None, (1, 3), (3, 1)):
            raise PreconditionError(f"cannot convert {src.channels} input channels to "
                                    f"{dst.channels}")
        self.register_buffer("src_std", torch.tensor(src.std).reshape(1, -1, 1, 1))
        self.register_buffer("src_mean", torch.tensor(src.mean).reshape(1, -1, 1, 1))
        self.register_buffer("dst_std", torch.tensor(dst.std).reshape(1, -1, 1, 1))
        self.register_buffer("dst_mean", torch.tensor(dst.mean).reshape(1, -1, 1, 1))
        self.register_buffer("luma", torch.tensor(LUMA).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.src_std + self.src_mean
        if self.convert == (1, 3):
            x = x.repeat(1, 3, 1, 1)
        elif self.convert == (3, 1):
            x = (x * self.luma).sum(1, keepdim=True)
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x - self.dst_mean) / self.dst_std


class _Parallel(nn.Module):
    """``cat([branch_k(adapter_k(x)) for k], 1)``; traced into the parallel graph."""

    def __init__(self, branches: list[nn.Module], adapters: list[nn.Module | None]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.adapters = nn.ModuleDict({str(k): a for k, a in enumerate(adapters)
                                       if a is not None})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for k, branch in enumerate(self.branches):
            adapter = self.adapters[str(k)] if str(k) in self.adapters else None
            outs.append(branch(adapter(x) if adapter is not None else x))
        return torch.cat(outs, 1)


@dataclass
class Assembled(RunnableModel):
    """An assembled classifier: ``module`` maps the shared input to ``class_names`` logits."""

    module: fx.GraphModule
    class_names: list[str]
    class_map: list[dict]
    input_format: InputFormat
    layout: str
    metadata: dict = field(default_factory=dict)


def component_format(component) -> InputFormat:
    """The input format a component's source was trained on (its metadata), else its input
    shape without normalisation."""
    fmt = component.metadata.get("input")
    if fmt:
        return InputFormat.from_dict(fmt)
    shape = component.input_shape
    c = int(shape[1])
    return InputFormat((int(shape[2]), int(shape[3])), c, (0.0,) * c, (1.0,) * c)


def class_groups(components) -> tuple[list[str], list[list[int]], list[dict]]:
    """Distinct class names in order of first appearance, the concatenated-logit positions of
    each, and the class map (name, and every (component, source, class index) behind it)."""
    names, groups, cmap, position = [], [], [], 0
    for k, comp in enumerate(components):
        for name, cls in zip(comp.class_names, comp.classes):
            entry = {"component": k, "source": comp.source, "source_class": int(cls)}
            if name in names:
                i = names.index(name)
                groups[i].append(position)
                cmap[i]["sources"].append(entry)
            else:
                names.append(name)
                groups.append([position])
                cmap.append({"name": name, "sources": [entry]})
            position += 1
    return names, groups, cmap


def _branch(component, shared: InputFormat, *, features: bool = False) -> nn.Module:
    """The component as the assembled model runs it on the shared input; with ``features``,
    up to its head's input (passes/feature_head.py)."""
    fmt = component_format(component)
    module = features_module(component.module) if features else copy.deepcopy(component.module)
    return module if fmt == shared else nn.Sequential(InputAdapter(shared, fmt), module)


def dataset_class_names(dataset) -> list[str]:
    """The names of a labelled dataset's classes (``class_names``, or torchvision's
    ``classes``)."""
    names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
    if not names:
        raise DataError("the calibration dataset does not name its classes (give a dataset "
                        "with class_names, e.g. an ImageFolder)")
    return list(names)


def _task_indices(dataset, names: Sequence[str], indices: Sequence[int] | None = None
                  ) -> tuple[list[int], torch.Tensor]:
    """Indices of the samples (of ``indices``, default all) whose class is one of ``names``, and
    their positions in it."""
    from .data import labels_at

    folder = dataset_class_names(dataset)
    position = {n: i for i, n in enumerate(names)}
    pool = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    labels = labels_at(dataset, pool).tolist()
    picked = [(i, position[folder[y]]) for i, y in zip(pool, labels) if folder[y] in position]
    return [i for i, _ in picked], torch.as_tensor([p for _, p in picked], dtype=torch.long)


def calibrate(components: Sequence, dataset, *, batch_size: int = 256,
              indices: Sequence[int] | None = None) -> tuple[list[ScaleFactors], list[int]]:
    """MDA §2.1's logit scale factors of every component, each on the samples of ``dataset``
    (a calibration split, never the test split) whose class it outputs, fed as the assembled
    model feeds it. Returns the factors and the number of samples per component."""
    shared = component_format(components[0])
    results, counts = [], []
    for k, comp in enumerate(components):
        index, positions = _task_indices(dataset, comp.class_names, indices)
        if not index:
            raise DataError(f"the calibration data has no sample of component {k}'s classes "
                            f"({comp.source}: {', '.join(comp.class_names)})")
        branch = _branch(comp, shared)
        with eval_mode(branch), torch.no_grad():
            logits = torch.cat([branch(x) for x, _ in batches(dataset, index, batch_size)])
        results.append(calibrate_scales(logits, positions))
        counts.append(len(index))
    return results, counts


@torch.no_grad()
def _branch_outputs(components, dataset, index: list[int], batch_size: int, *,
                    features: bool = False) -> torch.Tensor:
    """The concatenated logits (or head inputs) of every branch on ``dataset[index]``."""
    shared = component_format(components[0])
    branches = [_branch(c, shared, features=features).eval() for c in components]
    out = []
    for x, _ in batches(dataset, index, batch_size):
        out.append(torch.cat([b(x).reshape(len(x), -1) for b in branches], 1))
    return torch.cat(out)


def _all_classes(components, dataset, indices: Sequence[int] | None = None
                 ) -> tuple[list[str], list[int], torch.Tensor]:
    """The assembled class names, the indices of ``dataset``'s images of them (among
    ``indices``) and their positions among the names; an error naming the classes without any
    image."""
    names, _, _ = class_groups(components)
    index, targets = _task_indices(dataset, names, indices)
    missing = sorted(set(range(len(names))) - set(targets.tolist()))
    if missing:
        raise DataError(f"the calibration data has no image of class(es) "
                        f"{', '.join(names[g] for g in missing)}")
    return names, index, targets


def calibrate_jointly(components: Sequence, dataset, *, batch_size: int = 256,
                      indices: Sequence[int] | None = None,
                      init: Sequence[torch.Tensor] | None = None, steps: int = 100,
                      weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-class logit factors ``s`` and offsets ``b`` of the assembled model, fitted on the
    calibration images of *all* its classes (never the test split).

    MDA's scaling (:func:`calibrate`) puts each component's logits on one scale using its own
    classes' images only; it cannot see how confident a component is on the *other*
    components' images, which is where an assembled model goes wrong. Here the concatenated
    logits ``z`` of every branch are calibrated together: class g scores
    ``max_{p in group g} (s_p·z_p + b_p)`` (merge by max, as the assembled model computes it)
    and ``(log s, b)`` minimise the cross-entropy of the images' true classes plus
    ``weight_decay·(||log s||² + ||b||²)``, by L-BFGS from ``s = init`` (default MDA's factors),
    ``b = 0``. 2 numbers per logit are fitted; no weight of any component changes. Returns
    ``(factors, offsets, images)``."""
    _, groups, _ = class_groups(components)
    _, index, targets = _all_classes(components, dataset, indices)
    z = _branch_outputs(components, dataset, index, batch_size).float()
    if init is None:
        init = [r.factors for r in calibrate(components, dataset, batch_size=batch_size,
                                             indices=indices)[0]]
    u = torch.cat([torch.as_tensor(f, dtype=torch.float32) for f in init]).log().clone()
    u.requires_grad_(True)
    b = torch.zeros_like(u, requires_grad=True)
    u0 = u.detach().clone()
    opt = torch.optim.LBFGS([u, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def scores() -> torch.Tensor:
        y = z * u.exp() + b
        return torch.stack([y[:, g].amax(1) for g in groups], 1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(scores(), targets) + weight_decay * (
            (u - u0).pow(2).sum() + b.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    factors, offsets = u.detach().exp(), b.detach()
    if not (bool(torch.isfinite(factors).all()) and bool(torch.isfinite(offsets).all())):
        raise DataError("joint logit calibration diverged (non-finite factors)")
    return factors, offsets, len(index)


@dataclass
class Calibration:
    """What :func:`assemble` puts after the branches to make them comparable.

    ``method`` "head": ``head = (weight [C, D], bias [C])``, one Linear over the concatenated
    features of every branch (passes/feature_head.py), one row per class name in
    :func:`class_groups` order. "joint" / "mda" / "given": ``factors[k]`` scale component k's
    logits (one per logit) and ``offsets`` (one per concatenated logit) are added after them.
    ``record`` says how it was fitted (method, images, fallbacks); it goes into the assembled
    model's metadata."""

    method: str
    factors: list[torch.Tensor] | None = None
    offsets: torch.Tensor | None = None
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    record: dict = field(default_factory=dict)

    @classmethod
    def scaling(cls, factors: Sequence[torch.Tensor | None] | None,
                offsets: torch.Tensor | None = None) -> "Calibration":
        """Logit factors (and offsets) given by the caller."""
        return cls("given", None if factors is None else list(factors), offsets,
                   record={"method": "given"})


def fit_calibration(components: Sequence, dataset, indices: Sequence[int] | None = None,
                    method: str = CALIBRATIONS[0], *, batch_size: int = 256,
                    shrinkage: float = SHRINKAGE) -> Calibration:
    """The :class:`Calibration` of ``components`` by ``method`` (:data:`CALIBRATIONS`, module
    docstring), fitted on the images of the labelled ``dataset`` at ``indices`` (default all)
    whose class is assembled: a calibration split, never the test split, read as the assembled
    model reads its input."""
    if method not in CALIBRATIONS:
        raise PreconditionError(f"unknown calibration {method!r}; known: "
                                f"{', '.join(CALIBRATIONS)}")
    if method == "head":
        names, index, targets = _all_classes(components, dataset, indices)
        features = _branch_outputs(components, dataset, index, batch_size, features=True)
        weight, bias = fit_head(features, targets, len(names), shrinkage)
        return Calibration("head", head=(weight, bias), record={
            "method": "head", "images": len(index), "features": int(features.shape[1]),
            "shrinkage": shrinkage})
    results, counts = calibrate(components, dataset, batch_size=batch_size, indices=indices)
    factors = [r.factors for r in results]
    record = {"method": method, "samples": counts,
              "fallbacks": [{c.class_names[int(i)]: why for i, why in r.fallbacks.items()}
                            for c, r in zip(components, results)]}
    if method == "mda":
        return Calibration("mda", factors, record=record)
    flat, offsets, images = calibrate_jointly(components, dataset, batch_size=batch_size,
                                              indices=indices, init=factors)
    return Calibration("joint", list(flat.split([len(c.classes) for c in components])),
                       offsets, record={**record, "images": images})


def assemble(components: Sequence[Component], calibration: Calibration | None = None, *,
             layout: str = "parallel", input_format: InputFormat | None = None,
             instruments=None, name: str = "assembled") -> Assembled:
    """Assemble ``components`` into one classifier (module docstring), made comparable by
    ``calibration`` (:func:`fit_calibration`, or ``Calibration.scaling(factors)``; ``None``:
    the logits as they are). ``input_format`` defaults to the first component's."""
    if len(components) < 2:
        raise PreconditionError("assembling needs at least two components")
    if layout not in ("parallel", "merged"):
        raise PreconditionError(f"unknown layout {layout!r}: use 'parallel' or 'merged'")
    record = None if calibration is None else dict(calibration.record)
    calibration = calibration or Calibration.scaling(None)
    factors = calibration.factors
    scales = [torch.ones(len(c.classes)) if factors is None or factors[k] is None
              else torch.as_tensor(factors[k], dtype=torch.float32)
              for k, c in enumerate(components)]
    for k, (c, s) in enumerate(zip(components, scales)):
        if s.shape != (len(c.classes),) or not bool(torch.isfinite(s).all()):
            raise PreconditionError(f"scale factors of component {k} ({c.source}) must be "
                                    f"{len(c.classes)} finite numbers")
    formats = [component_format(c) for c in components]
    shared = input_format or formats[0]
    if layout == "merged" and any(f != shared for f in formats):
        raise PreconditionError("the merged layout needs components with the same input "
                                "format; use layout='parallel'")
    names, groups, cmap = class_groups(components)
    if calibration.head is not None and calibration.head[0].shape[0] != len(names):
        raise PreconditionError(f"a feature head of {calibration.head[0].shape[0]} classes for "
                                f"components of {len(names)} class names")
    parallel = _Parallel([copy.deepcopy(c.module) for c in components],
                         [None if f == shared else InputAdapter(shared, f) for f in formats])
    gm = trace(parallel, shared.example())
    cat = next(n for n in reversed(gm.graph.nodes) if n.target is torch.cat)
    cat.name = BRANCHES
    gm.recompile()
    run_pipeline(assembly_pipeline(groups, merged=layout == "merged", factors=torch.cat(scales),
                                   offsets=calibration.offsets, head=calibration.head),
                 gm, instruments=instruments, name=name)
    meta = {"layout": layout, "class_names": names, "class_map": cmap,
            "input": shared.to_dict(), "components": [dict(c.metadata) for c in components],
            "calibration": record}
    if calibration.head is None:
        meta.update(scales=[s.tolist() for s in scales],
                    offsets=None if calibration.offsets is None
                    else torch.as_tensor(calibration.offsets).tolist())
    return Assembled(gm, names, cmap, shared, layout, meta)


def guard_assembled(asm: Assembled, components: Sequence, dataset, *, batch_size: int = 256,
                    far_below: float | None = None):
    """Per-class accuracy of ``asm`` on the calibration images of all its classes, next to each
    class's component alone (predicting over its own classes only), and what is wrong: a class
    never predicted, or the assembled model ``far_below`` points or more under its components
    (``mdafx.evaluation.GuardReport``; its "source" column holds the components')."""
    from .evaluation import FAR_BELOW_PTS, GuardReport, predict

    far_below = FAR_BELOW_PTS if far_below is None else far_below
    index, targets = _task_indices(dataset, asm.class_names)
    logits, _ = predict(asm.module, batches(dataset, index, batch_size), what="the assembled model")
    pred = logits.argmax(1)
    alone = torch.zeros(len(index), dtype=torch.bool)
    first = {entry["name"]: entry["sources"][0]["component"] for entry in asm.class_map}
    for k, comp in enumerate(components):
        mine = [i for i, t in enumerate(targets.tolist())
                if first[asm.class_names[t]] == k]
        if not mine:
            continue
        sub, pos = _task_indices(dataset, comp.class_names)
        hit = {i: p for i, p in zip(sub, pos.tolist())}
        c_logits, _ = predict(_branch(comp, asm.input_format),
                              batches(dataset, [index[i] for i in mine], batch_size),
                              what=f"component {k}")
        want = torch.as_tensor([hit[index[i]] for i in mine])
        alone[mine] = c_logits.argmax(1) == want
    rows, warnings = [], []
    for g, name in enumerate(asm.class_names):
        m = targets == g
        n = int(m.sum())
        rows.append((name, n, float((pred[m] == g).float().mean()) if n else float("nan"),
                     float(alone[m].float().mean()) if n else float("nan")))
        if n and not bool((pred == g).any()):
            warnings.append(f"the assembled model never predicts class {name!r}")
    acc, base = float((pred == targets).float().mean()), float(alone.float().mean())
    if 100 * (base - acc) >= far_below:
        warnings.append(f"the assembled model scores {acc:.2%} against {base:.2%} for its "
                        f"components on their own classes ({100 * (acc - base):+.1f} points)")
    return GuardReport(list(asm.class_names), len(index), rows, acc, base, warnings)
