"""Parameter scaling of logits (MDA.md §2.1): InsertLogitScale and FoldLogitScale (transforms).

Logits of different source models live on different scales, so before components are assembled
each class c of a component gets a factor

    s_c = 1 / mean_{x in calib(c), component correct on x} max_j logit_j(x)

computed on a calibration split (never the test split), and logit c is multiplied by s_c.

Degenerate classes: when class c has no correctly classified calibration sample, or the mean is
not positive, s_c falls back to the component-wide factor (the same formula over every correct
calibration sample of any class); if that is undefined too, s_c = 1. Every fallback is recorded
in ``ScaleFactors.fallbacks`` (and the component's metadata); factors are never NaN or infinite.

``InsertLogitScale`` multiplies the graph output by a constant vector (node ``mdafx_scale_<n>``).
``FoldLogitScale`` folds that multiply into the producing Linear when the multiply is its only
reader (``W' = diag(s)·W``, ``b' = s·b``), leaving an equivalent graph with one node less; a
scale after anything else (a class reordering, a conv head) stays a node.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from mdafx.passmanager import AnalysisManager, Pass


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


def _output(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


class InsertLogitScale(Pass):
    """Multiply the logits by per-class factors: ``y' = y · s``."""

    name = "insert-logit-scale"

    def __init__(self, factors: torch.Tensor) -> None:
        self.factors = torch.as_tensor(factors, dtype=torch.float32)
        if not bool(torch.isfinite(self.factors).all()):
            raise ValueError("scale factors must be finite")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        out = _output(gm)
        n = sum(1 for node in gm.graph.nodes if node.name.startswith("mdafx_scale_"))
        buffer = f"mdafx_scale_{n}_factors"
        gm.register_buffer(buffer, self.factors.clone())
        with gm.graph.inserting_before(out):
            factors = gm.graph.get_attr(buffer)
            scaled = gm.graph.call_function(torch.mul, (out.args[0], factors))
            scaled.name = f"mdafx_scale_{n}"
        out.args = (scaled,)
        return True


class FoldLogitScale(Pass):
    """Fold ``mdafx_scale_*`` multiplies into the Linear producing their input."""

    name = "fold-logit-scale"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if not (node.op == "call_function" and node.target is torch.mul
                    and node.name.startswith("mdafx_scale_")):
                continue
            producer, factors_node = node.args
            if producer.op != "call_module" or len(producer.users) != 1:
                continue
            module = gm.get_submodule(producer.target)
            factors = getattr(gm, factors_node.target)
            if not isinstance(module, nn.Linear):
                continue
            with torch.no_grad():
                module.weight.mul_(factors.reshape(-1, 1))
                if module.bias is not None:
                    module.bias.mul_(factors)
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
            if not factors_node.users:
                gm.graph.erase_node(factors_node)
                delattr(gm, factors_node.target)
            modified = True
        return modified
