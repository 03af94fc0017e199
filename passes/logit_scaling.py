"""Logit calibration of assembled components (MDA.md §2.1): InsertLogitScale, FoldLogitScale.

Logits of different source models live on different scales, so before components are assembled
each class c of a component gets a factor

    s_c = 1 / mean_{x in calib(c), component correct on x} max_j logit_j(x)

computed on a calibration split (never the test split), and logit c is multiplied by s_c
(:func:`calibrate_scales`; ``mdafx.assembly`` offers other calibrations that fit an offset too).

Degenerate classes: when class c has no correctly classified calibration sample, or the mean is
not positive, s_c falls back to the component-wide factor (the same formula over every correct
calibration sample of any class); if that is undefined too, s_c = 1. Every fallback is recorded
in ``ScaleFactors.fallbacks``; factors are never NaN or infinite.

``InsertLogitScale(s, b)`` multiplies the graph output by a constant vector and adds an optional
offset, ``y' = y·s + b`` (node ``mdafx_scale_<n>``). ``FoldLogitScale`` folds such a node into
the Linear layers that produce its input when it is their only reader: straight after a Linear
(``W' = diag(s)·W``, ``b' = s·b + b_offset``), through a class-reordering ``getitem`` (the factors
are permuted back onto the Linear's rows) and through a ``cat`` of such producers (the factors
are split by width). The result computes the same logits with the node gone; anything else (a
conv head, a merge by max) keeps the node.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from mdafx.errors import PreconditionError
from mdafx.ir import shape_of
from mdafx.passmanager import AnalysisManager, Pass

__all__ = ["ScaleFactors", "calibrate_scales", "InsertLogitScale", "FoldLogitScale",
           "output_value"]

SCALE_PREFIX = "mdafx_scale_"


@dataclass
class ScaleFactors:
    factors: torch.Tensor                       # [K] float, finite, > 0
    fallbacks: dict[int, str] = field(default_factory=dict)   # class position -> reason


def calibrate_scales(logits: torch.Tensor, labels: torch.Tensor) -> ScaleFactors:
    """``s_c`` from a component's calibration logits [N, K] and labels in 0..K-1 (positions)."""
    K = logits.shape[1]
    correct = logits.argmax(1) == labels
    top = logits.max(1).values
    overall = top[correct]
    overall_mean = float(overall.mean()) if overall.numel() else float("nan")
    factors, fallbacks = torch.ones(K), {}
    for c in range(K):
        picked = top[correct & (labels == c)]
        mean = float(picked.mean()) if picked.numel() else float("nan")
        if picked.numel() and mean > 0:
            factors[c] = 1.0 / mean
            continue
        why = "no correctly classified calibration sample" if not picked.numel() else \
            f"non-positive mean max logit {mean:.4g}"
        if overall_mean > 0:
            factors[c] = 1.0 / overall_mean
            fallbacks[c] = why + "; used the component-wide factor"
        else:
            fallbacks[c] = why + "; no usable component-wide factor either, used 1"
    return ScaleFactors(factors, fallbacks)


def output_value(gm: fx.GraphModule) -> fx.Node:
    """The node whose value the graph returns (one tensor)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if not isinstance(value, fx.Node):
        raise PreconditionError("the graph's output is not one tensor")
    return value


class InsertLogitScale(Pass):
    """``y' = y · s (+ b)`` on the graph output (module docstring)."""

    name = "insert-logit-scale"

    def __init__(self, factors: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        self.factors = torch.as_tensor(factors, dtype=torch.float32).reshape(-1)
        self.offsets = None if offsets is None else torch.as_tensor(
            offsets, dtype=torch.float32).reshape(-1)
        for what, t in (("factors", self.factors), ("offsets", self.offsets)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise PreconditionError(f"logit scale {what} must be finite")
        if self.offsets is not None and self.offsets.shape != self.factors.shape:
            raise PreconditionError("logit scale factors and offsets differ in length")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        value = output_value(gm)
        width = (shape_of(value) or (None, None))[-1]
        if width != self.factors.numel():
            raise PreconditionError(f"{self.factors.numel()} logit factors for an output of "
                                    f"width {width}")
        n = sum(1 for node in gm.graph.nodes if node.name.startswith(SCALE_PREFIX)
                and node.target is torch.mul)
        name = f"{SCALE_PREFIX}{n}"
        gm.register_buffer(f"{name}_factors", self.factors.reshape(1, -1).clone())
        if self.offsets is not None:
            gm.register_buffer(f"{name}_offsets", self.offsets.reshape(1, -1).clone())
        with gm.graph.inserting_after(value):
            factors = gm.graph.get_attr(f"{name}_factors")
        with gm.graph.inserting_after(factors):
            scaled = gm.graph.call_function(torch.mul, (value, factors))
            scaled.name = name
        last = scaled
        if self.offsets is not None:
            with gm.graph.inserting_after(scaled):
                offsets = gm.graph.get_attr(f"{name}_offsets")
            with gm.graph.inserting_after(offsets):
                last = gm.graph.call_function(torch.add, (scaled, offsets))
                last.name = f"{name}_offset"
        value.replace_all_uses_with(last, delete_user_cb=lambda user: user is not scaled)
        return True


def _column_selection(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The distinct columns a ``x[:, [i, j, ...]]`` or ``index_select(x, 1, const)`` picks."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        index = node.args[1]
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)
                and isinstance(index[1], list)):
            return None
        picked = torch.as_tensor(index[1])
    elif node.target is torch.index_select and node.args[1] in (1, -1) and isinstance(
            node.args[2], fx.Node) and node.args[2].op == "get_attr":
        picked = getattr(gm, node.args[2].target)
    else:
        return None
    return picked if len(torch.unique(picked)) == len(picked) else None


def _column_sources(gm: fx.GraphModule, node: fx.Node) -> list[tuple[nn.Linear, int]] | None:
    """For each column of ``node``, the Linear and its output row that produce it, or None
    when some column does not come straight from a Linear read by nothing else."""
    if len(node.users) != 1:
        return None
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
        lin = gm.get_submodule(node.target)
        return [(lin, r) for r in range(lin.out_features)]
    picked = _column_selection(gm, node)
    if picked is not None:
        inner = _column_sources(gm, node.args[0])
        return None if inner is None else [inner[int(c)] for c in picked]
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim not in (1, -1) or not isinstance(parts, (list, tuple)):
            return None
        found = []
        for part in parts:
            inner = _column_sources(gm, part) if isinstance(part, fx.Node) else None
            if inner is None:
                return None
            found += inner
        return found
    return None


class FoldLogitScale(Pass):
    """Fold ``mdafx_scale_*`` nodes into the Linear layers that produce their input."""

    name = "fold-logit-scale"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if not (node.op == "call_function" and node.target is torch.mul
                    and node.name.startswith(SCALE_PREFIX)):
                continue
            producer, factors_node = node.args
            factors = getattr(gm, factors_node.target).reshape(-1)
            offset_node = next((u for u in node.users if u.name == f"{node.name}_offset"), None)
            offsets = (getattr(gm, offset_node.args[1].target).reshape(-1)
                       if offset_node is not None and len(node.users) == 1 else None)
            sources = _column_sources(gm, producer)
            if (sources is None or len(sources) != factors.numel()
                    or len({(id(lin), r) for lin, r in sources}) != len(sources)
                    or (offset_node is not None and (
                        offsets is None or any(lin.bias is None for lin, _ in sources)))):
                continue
            with torch.no_grad():
                for p, (lin, r) in enumerate(sources):
                    lin.weight[r] *= factors[p]
                    if lin.bias is not None:
                        lin.bias[r] *= factors[p]
                    if offsets is not None:
                        lin.bias[r] += offsets[p]
            self._erase(gm, node, offset_node, producer)
            modified = True
        return modified

    @staticmethod
    def _erase(gm: fx.GraphModule, node: fx.Node, offset_node: fx.Node | None,
               producer: fx.Node) -> None:
        last = offset_node if offset_node is not None else node
        last.replace_all_uses_with(producer)
        for dead in ([offset_node] if offset_node is not None else []) + [node]:
            attrs = [a for a in dead.args if isinstance(a, fx.Node) and a.op == "get_attr"]
            gm.graph.erase_node(dead)
            for a in attrs:
                if not a.users:
                    gm.graph.erase_node(a)
                    delattr(gm, a.target)
