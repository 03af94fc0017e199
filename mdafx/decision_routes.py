"""Decision routes (MDA §4): which input channels of every weighted layer two classes rely on.

For each weighted layer (conv/linear call, graph order) and each of the two classes, the channels
of the layer's input that Locate's mask keeps for that class: shared, exclusive to one, or used by
neither. ``routes(gm, profile, a, b)`` gives the rows, a table and a picture (hand-written SVG,
no plotting dependency). Layers are named by their fx node names, as in dumps and tables.
"""
from __future__ import annotations

import functools
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .disassembly import locate, resolve_classes, source_analyses
from .errors import PreconditionError
from .passes.channel_groups import ChannelGroups
from .passes.locate import Thresholds
from .profiling import Profile

__all__ = ["Routes", "route_rows", "routes", "routes_svg"]

ROUTE_COLOURS = {"a-only": "#d62728", "b-only": "#1f77b4", "both": "#9467bd",
                 "neither": "#e6e6e6"}


def route_rows(gm: fx.GraphModule, cg, masks, a: int, b: int) -> list[tuple[str, Any, Any]]:
    """Per weighted layer (conv/linear call, graph order): ``(layer, a_mask, b_mask)`` over the
    channels of its input. Features that hold one channel (a flatten into a Linear) are folded
    back onto that channel (it matters if any of its features does)."""
    K = masks.num_classes
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target),
                                                      (nn.Conv2d, nn.Linear)):
            continue
        src = node.args[0]
        shape = tuple(src.meta["tensor_meta"].shape)
        axis = len(shape) - 1 if isinstance(gm.get_submodule(node.target), nn.Linear) else 1
        mask = masks.masks.get(src.name)
        if mask is None:  # locate never reached it: no class relies on it
            mask = torch.zeros((K, *shape), dtype=torch.bool)
        along = mask.expand(K, *shape).movedim(axis + 1, 1).reshape(K, shape[axis], -1).any(2)
        ids = cg.ids.get(src.name)
        if isinstance(ids, torch.Tensor):
            ids = ids.expand(shape).movedim(axis, 0).reshape(shape[axis], -1)[:, 0]
            distinct, slot = torch.unique_consecutive(ids, return_inverse=True)
            if 1 < len(distinct) < len(ids):
                folded = torch.zeros(K, len(distinct), dtype=torch.long)
                along = folded.index_add_(1, slot, along.long()) > 0
        rows.append((node.name, along[a].clone(), along[b].clone()))
    return rows


def routes_svg(rows, name_a: str, name_b: str, title: str) -> str:
    """One row per layer, one square per input channel coloured by which class relies on it."""
    esc = functools.partial(html.escape, quote=True)
    label_w, max_w, row_h, top = 230, 760, 18, 64
    width = label_w + max_w + 20
    height = top + row_h * len(rows) + 16
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
           f"<title>{esc(title)}</title>", "<style>",
           *[f".{cls} {{ fill: {colour}; }}" for cls, colour in ROUTE_COLOURS.items()],
           "</style>",
           f'<text x="8" y="18" font-size="13">{esc(title)}</text>']
    legend = [("a-only", f"only {name_a}"), ("b-only", f"only {name_b}"), ("both", "both"),
              ("neither", "neither")]
    x = 8
    for cls, text in legend:
        out.append(f'<rect class="swatch {cls}" x="{x}" y="30" width="10" height="10"/>'
                   f'<text x="{x + 14}" y="39">{esc(text)}</text>')
        x += 24 + 7 * len(text)
    for r, (layer, ma, mb) in enumerate(rows):
        y = top + r * row_h
        n = len(ma)
        cell = min(10.0, max_w / max(n, 1))
        out.append(f'<g class="layer" data-layer="{esc(layer)}" data-channels="{n}">'
                   f'<text x="8" y="{y + 10}">{esc(layer)} ({n})</text>')
        for c in range(n):
            a, b = bool(ma[c]), bool(mb[c])
            cls = "both" if a and b else "a-only" if a else "b-only" if b else "neither"
            out.append(f'<rect class="{cls}" x="{label_w + c * cell:.2f}" y="{y}" '
                       f'width="{max(cell - 1, 0.5):.2f}" height="12"/>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


@dataclass
class Routes:
    """The decision routes of classes ``a`` and ``b``: per layer, their masks over its input."""

    names: tuple[str, str]
    rows: list[tuple[str, Any, Any]]
    thresholds: Thresholds

    def table_rows(self) -> list[list]:
        out = []
        for layer, ma, mb in self.rows:
            both, union = int((ma & mb).sum()), int((ma | mb).sum())
            out.append([layer, len(ma), int(ma.sum()), int(mb.sum()), both,
                        int((ma & ~mb).sum()), int((mb & ~ma).sum()), len(ma) - union,
                        both / union if union else None])
        return out

    def headers(self) -> list[str]:
        a, b = self.names
        return ["layer", "in channels", a, b, "shared", f"only {a}", f"only {b}", "neither",
                "overlap"]

    def svg(self, title: str) -> str:
        return routes_svg(self.rows, *self.names, title)


def routes(gm: fx.GraphModule, profile: Profile, classes: Sequence[Any],
           thresholds: Thresholds = Thresholds(), *, am=None) -> Routes:
    """The decision routes of the two ``classes`` (names, ints or ``#N``) of ``gm``."""
    if len(classes) != 2:
        raise PreconditionError(f"routes compares exactly two classes, got {len(classes)}")
    am = am or source_analyses(gm, profile)
    a, b = resolve_classes(classes, profile.class_names, len(profile.class_names))
    masks = locate(gm, profile, thresholds, am=am)
    rows = route_rows(gm, am.get(ChannelGroups), masks, a, b)
    return Routes((profile.class_names[a], profile.class_names[b]), rows, thresholds)
