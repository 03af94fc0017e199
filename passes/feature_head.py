"""InsertFeatureHead (transform): one closed-form classifier over the features of every branch of
an assembled model, instead of each component's own logits.

Logit calibration (passes/logit_scaling.py, ``mdafx.assembly.calibrate_jointly``) can only
rescale what each component says about *its own* classes; which component an image belongs to
must then be read off logits that were never trained to be compared. Measured on the CIFAR-10
sources (README, "Assembly"), the task is told wrong for 3-6% of the images even with whole
sources. The features a component's head reads carry more than its few logits, so the assembled
model gets one linear head over all of them, fitted in closed form on calibration images of all
its classes (no gradient step):

Let ``f(x) ∈ R^D`` be the concatenation of every branch's *head input* (the input of the Linear
layer that produces its logits, :func:`head_input`), computed on calibration images ``x_n`` of
classes ``y_n ∈ {1..C}`` (one class per distinct class name). With each feature standardised,
``z = (f − μ)/σ`` (features with σ = 0 carry nothing and get weight 0)::

    m_g  = mean of z_n over the images of class g
    S    = 1/N · Σ_n (z_n − m_{y_n})(z_n − m_{y_n})ᵀ             (pooled within-class covariance)
    S_λ  = (1 − λ)·S + λ·(tr S / D)·I                            (shrinkage, λ = SHRINKAGE)
    w_g  = S_λ⁻¹ m_g,        b_g = −½ · m_gᵀ S_λ⁻¹ m_g

and the head computes ``logit_g(x) = w_gᵀ z + b_g``, folded into one ``nn.Linear`` over ``f``
(``W = w/σ``, ``b' = b − W·μ``). This is linear discriminant analysis: ``softmax(logits)`` is the
class posterior of Gaussian classes with a shared covariance and equal priors, so the logits are
comparable across classes by construction. Sums are accumulated and solved in float64.

The pass rewrites the parallel graph ``mdafx_branches = cat([head_k(f_k) ...])`` into
``mdafx_branches = cat([f_k ...]); mdafx_head = Linear(mdafx_branches)``: the branches' heads
(and class reorderings) are removed, the concatenation keeps its name so that AlignPadding can
still merge the branch bodies, and the output has exactly one logit per class (no merge by max).
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from mdafx.errors import DataError, PreconditionError
from mdafx.ir import shape_of
from mdafx.passes.align_padding import BRANCHES
from mdafx.passes.logit_scaling import output_value
from mdafx.passmanager import AnalysisManager, Pass
from mdafx.rules.movement import is_class_select

__all__ = ["HEAD", "SHRINKAGE", "InsertFeatureHead", "fit_head", "head_input",
           "features_module"]

HEAD = "mdafx_head"
SHRINKAGE = 0.1
"""λ of the covariance shrinkage. Measured on the CIFAR-10 assemblies (4 and 10 classes, fitted on
2/3 of the calibration images, scored on the rest and on the test split): λ from 0.003 to 0.3
moves test accuracy by less than 0.3 points (README), so it is fixed rather than searched."""


def head_input(gm: fx.GraphModule, value: fx.Node | None = None) -> tuple[fx.Node, fx.Node]:
    """``(head, features)``: the Linear node that produces ``value`` (default: the graph's
    output), through a class reordering, and the node it reads. Raises PreconditionError naming
    the node when the logits do not come straight from a Linear over ``[N, D]`` features."""
    value = output_value(gm) if value is None else value
    head = value.args[0] if is_class_select(value) else value
    ok = head.op == "call_module" and isinstance(gm.get_submodule(head.target), nn.Linear) \
        and isinstance(head.args[0], fx.Node) and len(head.users) == 1
    if not ok:
        raise PreconditionError(f"a feature head needs logits computed by a Linear layer read by "
                                f"nothing else; {head.format_node()} is not one (use the joint "
                                "or MDA calibration for this component)")
    features = head.args[0]
    shape = shape_of(features)
    if shape is not None and len(shape) != 2:
        raise PreconditionError(f"a feature head needs [N, D] features; {head.format_node()} "
                                f"reads a tensor of shape {tuple(shape)}")
    return head, features


def features_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` that returns its head's input (:func:`head_input`) instead of logits."""
    out = copy.deepcopy(gm)
    _, features = head_input(out)
    output = next(n for n in out.graph.nodes if n.op == "output")
    output.args = (features,)
    out.graph.eliminate_dead_code()
    out.delete_all_unused_submodules()
    out.recompile()
    return out


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
             shrinkage: float = SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [C, D], bias [C])`` of the LDA head over raw features (module docstring), from
    ``features [N, D]`` and ``labels [N]`` in ``0..C-1``; float32, finite."""
    if not 0.0 < shrinkage <= 1.0:
        raise PreconditionError(f"shrinkage must be in (0, 1], got {shrinkage}")
    f = features.detach().double().reshape(len(features), -1)
    y = torch.as_tensor(labels, dtype=torch.long)
    missing = sorted(set(range(num_classes)) - set(y.tolist()))
    if missing:
        raise DataError(f"a feature head needs images of every class; none of class(es) "
                        f"{', '.join(map(str, missing))}")
    mu, sigma = f.mean(0), f.std(0, unbiased=False)
    live = sigma > 1e-12 * sigma.max().clamp_min(1e-300)
    if not bool(live.any()):
        raise DataError("the branches' features are constant on the calibration images: "
                        "nothing to fit a head on")
    z = (f[:, live] - mu[live]) / sigma[live]
    means = torch.zeros(num_classes, z.shape[1], dtype=torch.float64)
    means.index_add_(0, y, z)
    means /= torch.bincount(y, minlength=num_classes).double()[:, None]
    centred = z - means[y]
    cov = centred.T @ centred / len(z)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (cov.trace() / d) * torch.eye(d, dtype=cov.dtype)
    w = torch.linalg.solve(cov, means.T).T                     # [C, D_live]
    b = -0.5 * (w * means).sum(1)
    weight = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
    weight[:, live] = w / sigma[live]
    bias = b - weight @ mu
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
        raise DataError("the feature head is not finite (degenerate calibration features)")
    return weight.float(), bias.float()


class InsertFeatureHead(Pass):
    """``cat([head_k(f_k)]) -> Linear(cat([f_k]))`` on an assembled parallel graph (module
    docstring); ``weight [C, D]`` and ``bias [C]`` from :func:`fit_head`."""

    name = "insert-feature-head"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = torch.as_tensor(weight, dtype=torch.float32)
        self.bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)
        if self.weight.dim() != 2 or self.bias.shape != (self.weight.shape[0],):
            raise PreconditionError("a feature head is a [C, D] weight and a [C] bias")
        if not (bool(torch.isfinite(self.weight).all()) and bool(torch.isfinite(self.bias).all())):
            raise PreconditionError("feature head weights must be finite")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        cat = next((n for n in gm.graph.nodes if n.name == BRANCHES), None)
        if cat is None:
            raise PreconditionError(f"insert-feature-head needs an assembled graph in the "
                                    f"parallel layout (a node named {BRANCHES})")
        if output_value(gm) is not cat:
            raise PreconditionError(f"insert-feature-head runs on the branches' logits as the "
                                    f"graph returns them; the output is {output_value(gm).name}, "
                                    f"not {BRANCHES} (put the pass first in the pipeline)")
        features = [head_input(gm, out)[1] for out in cat.args[0]]
        widths = [(shape_of(f) or (None, None))[1] for f in features]
        if None in widths or sum(widths) != self.weight.shape[1]:
            raise PreconditionError(f"a feature head of {self.weight.shape[1]} inputs for "
                                    f"branch features of widths {widths}")
        cat.args = (list(features),) + tuple(cat.args[1:])
        head = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(self.weight)
            head.bias.copy_(self.bias)
        gm.add_submodule(HEAD, head)
        with gm.graph.inserting_after(cat):
            node = gm.graph.call_module(HEAD, (cat,))
            node.name = HEAD
        cat.replace_all_uses_with(node, delete_user_cb=lambda user: user.op == "output")
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        return True
