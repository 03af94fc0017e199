"""Assembling components into one classifier (MDA.md §2).

Two layouts:

* ``parallel`` (default, any architectures): every component is a branch on the shared input.
  Each branch first adapts the input to the format its source was trained on (undo the shared
  normalisation, convert channels, resize, apply the source's normalisation), runs, has its logits
  scaled (§2.1), and the branches' logits are concatenated. The result is traced into one flat
  fx graph.
* ``merged`` (the paper's alignment padding, isomorphic components only): one layer-wise wider
  network with block-diagonal weights, built by ``passes.align_padding``.

Classes: the output has one logit per distinct class *name*, in order of first appearance over the
components. Where several components carry a class of the same name, its logit is the maximum of
their (scaled) logits ("merge by max"), and the class map lists every source of it.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .api import RunnableModel
from .errors import PreconditionError
from .ir import trace

LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class InputFormat:
    """What a model expects: ``size`` (H, W), ``channels``, and per-channel ``mean``/``std``
    applied to [0, 1] pixels."""

    size: tuple[int, int]
    channels: int = 3
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def from_dict(cls, d: dict) -> "InputFormat":
        return cls(tuple(d["size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]))

    def to_dict(self) -> dict:
        return {"size": list(self.size), "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std)}


class InputAdapter(nn.Module):
    """Maps an input in format ``src`` to format ``dst``: de-normalise, convert channels
    (grey→RGB by repetition, RGB→grey by ITU-R 601 luma), resize (bilinear), normalise."""

    def __init__(self, src: InputFormat, dst: InputFormat) -> None:
        super().__init__()
        self.size = tuple(dst.size) if tuple(dst.size) != tuple(src.size) else None
        self.convert = (src.channels, dst.channels) if src.channels != dst.channels else None
        if self.convert not in (None, (1, 3), (3, 1)):
            raise PreconditionError(f"cannot convert {src.channels} input channels to {dst.channels}")
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
    def __init__(self, branches, adapters, scales, groups: list[list[int]]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.adapters = nn.ModuleList(a if a is not None else nn.Identity() for a in adapters)
        for i, s in enumerate(scales):
            self.register_buffer(f"mdafx_scale_{i}", s.reshape(1, -1).clone())
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, (adapter, branch) in enumerate(zip(self.adapters, self.branches)):
            outs.append(branch(adapter(x)) * getattr(self, f"mdafx_scale_{i}"))
        logits = torch.cat(outs, 1)
        if all(len(g) == 1 for g in self.groups):
            return logits
        cols = []
        for g in self.groups:
            cols.append(logits[:, g[0]:g[0] + 1] if len(g) == 1 else logits[:, g].amax(1, keepdim=True))
        return torch.cat(cols, 1)


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


def assemble(components: Sequence, scales: Sequence[torch.Tensor] | None = None, *,
             layout: str = "parallel", input_format: InputFormat | None = None) -> Assembled:
    """Assemble ``components`` (mdafx Components) into one classifier (module docstring).

    ``scales[k]`` are component k's logit factors (``passes.logit_scaling.calibrate_scales``);
    ``None`` assembles without scaling. ``input_format`` defaults to the first component's.
    """
    if len(components) < 2:
        raise PreconditionError("assembling needs at least two components")
    if layout not in ("parallel", "merged"):
        raise PreconditionError(f"unknown layout {layout!r}: use 'parallel' or 'merged'")
    scales = [torch.ones(len(c.classes)) if scales is None or scales[k] is None
              else torch.as_tensor(scales[k], dtype=torch.float32)
              for k, c in enumerate(components)]
    for k, (c, s) in enumerate(zip(components, scales)):
        if s.shape != (len(c.classes),) or not bool(torch.isfinite(s).all()):
            raise PreconditionError(f"scale factors of component {k} ({c.source}) must be "
                                    f"{len(c.classes)} finite numbers")
    formats = [component_format(c) for c in components]
    shared = input_format or formats[0]
    names, groups, cmap = class_groups(components)
    if layout == "merged":
        from passes.align_padding import merge_components

        if any(f != shared for f in formats):
            raise PreconditionError("the merged layout needs components with the same input "
                                    "format; use layout='parallel'")
        module = merge_components([c.module for c in components], scales, groups)
    else:
        adapters = [None if f == shared else InputAdapter(shared, f) for f in formats]
        branches = [copy.deepcopy(c.module) for c in components]
        parallel = _Parallel(branches, adapters, scales, groups)
        example = torch.zeros(1, shared.channels, *shared.size)
        module = trace(parallel, example)
    meta = {"layout": layout, "class_names": names, "class_map": cmap,
            "input": shared.to_dict(), "components": [dict(c.metadata) for c in components],
            "scales": [s.tolist() for s in scales]}
    return Assembled(module, names, cmap, shared, layout, meta)
