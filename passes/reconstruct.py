"""ReconstructLayers (transform, training-free): refit each weighted layer of a component in
closed form so that it reproduces its source on calibration images.

Pruning removes input channels a layer relied on, and every layer after the first sees inputs
that already differ from the source's. For each weighted layer ``L`` of the component, in graph
order, with ``X`` its input *in the component* (earlier layers already refitted) and ``Y`` the
*source's* output of the same layer on the channels the component kept (pre-norm, raw layer
output; for the head, the source's logits of the task's classes), on the same images::

    W' = argmin_W ||X·Wᵀ + 1·bᵀ − Y||² + λ·||W − W₀||²,      λ = ρ · tr(XᵀX) / d

a ridge regression pulled towards the pruned weight ``W₀`` (``d`` columns of ``X``; ρ = ``ridge``).
Neighbouring output positions of a conv are nearly the same equation, so at most ``max_rows``
rows enter each layer's normal equations (every s-th row, s = ⌈rows / max_rows⌉), and only those
rows of the source's outputs are kept as targets: their memory is bounded by ``max_rows`` per
layer, not by the number of calibration images.
For a convolution ``X`` is the unfolded input (one row per output position, one column per input
channel × kernel tap) and the problem splits by group, so grouped and depthwise convs stay what
they are. The intercept ``b`` goes into the layer's own bias, or, for a bias-free layer read only
by a BatchNorm, into that norm's running mean (``BN(x + b)`` is ``BN`` with ``μ − b``); otherwise
there is none. The normal equations are accumulated over chunks of images (each chunk's
products in float32, their sum in float64) and solved in float64. Shapes, modules and the graph
are unchanged: only weights, biases
and running means of existing layers change.

Residual sums (``through_sums``): where a layer's output reaches a residual sum ``s = a + r``
only through its own batch norm (or directly), matching the layer's own source output leaves
the error the other operand ``r`` already carries (the shortcut sees pruned, refitted inputs
too). Such a layer is instead fitted to what makes the *sum* match the source's sum::

    target = BN⁻¹(s_source − r_component),     BN⁻¹(t) = (t − β)·√(σ² + ε)/γ + μ

per channel (a channel whose γ is zero keeps the layer's own target). Of the operands that
qualify, the layer with the most weights is refitted this way (the 3x3 conv of a ResNet block,
not its 1x1 shortcut); the fit happens when the sum is reached, both operands computed.

Targets come from ``source``, a traced source graph whose nodes carry the same names as the
component's (PruneChannels keeps names), and ``kept``: per weighted node name, the source output
channels the component kept, in the component's order.

Devices: the source and the component run where their parameters are (the images are moved
there, a chunk at a time for the source), and the normal equations are accumulated and solved
in float64 on the component's device.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from mdafx.errors import PreconditionError
from mdafx.ir import eval_mode, module_device
from mdafx.passes.channel_groups import ChannelGroups
from mdafx.passmanager import AnalysisManager, Pass

__all__ = ["ReconstructLayers", "kept_channels", "residual_tails", "weighted_nodes"]

ROW_CHUNK = 1 << 16      # rows of X per accumulation step (bounds the unfolded temporaries)
MAX_ROWS = 1 << 18       # rows of X per layer that enter the normal equations
SUMS = (operator.add, operator.iadd, torch.add, "add", "add_")   # a + b, no alpha


def weighted_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The call_module nodes of Conv2d and Linear layers, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))]


def kept_channels(source: fx.GraphModule, plan, cg, names: set[str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Per weighted node of ``source`` (those in ``names``, default all), the output channels
    ``plan`` keeps (indices, in order)."""
    from mdafx.channels import along

    out = {}
    for node in weighted_nodes(source):
        if names is not None and node.name not in names:
            continue
        kept = plan.kept(cg, node.name)
        dim = 1 if kept.dim() == 4 else -1
        width = source.get_submodule(node.target).weight.shape[0]
        out[node.name] = along(kept, dim, width).nonzero().reshape(-1)
    return out


def _positions(images: int, per_image: int, step: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``step``-th output position of ``images`` images with ``per_image`` positions each
    (image-major, then row, then column), as (image, position within the image). The one
    sampling both a conv's input rows (:func:`_conv_rows`) and its targets (:func:`_sampled`)
    use, so that they are the same rows."""
    pos = torch.arange(0, images * per_image, step, device=device)
    return pos // per_image, pos % per_image


def _sampled(y: torch.Tensor, step: int, channels_first: bool) -> torch.Tensor:
    """Every ``step``-th row of ``y`` laid out as rows of channels, ``[P, C]``: a conv's output
    positions or a linear layer's tokens (compact copies, not views of the whole chunk)."""
    if not channels_first:
        return y.reshape(-1, y.shape[-1])[::step].clone()
    flat = y.flatten(2)                                       # [N, C, H·W]
    image, within = _positions(flat.shape[0], flat.shape[2], step, y.device)
    return flat[image, :, within]


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, step: int) -> torch.Tensor:
    """Every ``step``-th output position of ``x`` unfolded as the conv sees it,
    ``[P, C·kh·kw]`` (channel-major columns, as the weight is laid out).

    Patches are a strided view of the padded input (no im2col of all positions): only the
    sampled rows are copied."""
    from mdafx.passes.contributions import conv_padding

    top, bottom, left, right = conv_padding(conv)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, (left, right, top, bottom), mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    patches = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    patches = patches[..., ::dh, ::dw]                        # [N, C, Ho, Wo, kh, kw]
    n, c, ho, wo = patches.shape[:4]
    image, within = _positions(n, ho * wo, step, x.device)
    rows = patches[image, :, within // wo, within % wo]       # [P, C, kh, kw]
    return rows.reshape(len(image), -1)


def _input_rows(layer: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    """``X`` as a row matrix (every ``step``-th row): conv positions or linear tokens."""
    if isinstance(layer, nn.Conv2d):
        return _conv_rows(layer, x, step)
    return x.reshape(-1, x.shape[-1])[::step]


class _Rows(NamedTuple):
    """A layer's (or sum's) target, only the rows that enter the normal equations: every
    ``step``-th row of each chunk of ``chunk`` images (:func:`_sampled`)."""

    rows: torch.Tensor        # [P, C]
    step: int
    chunk: int

    def of(self, y: torch.Tensor, channels_first: bool) -> torch.Tensor:
        """The same rows of ``y``, an output over all the images (``[N, ...]``)."""
        return torch.cat([_sampled(y[s:s + self.chunk], self.step, channels_first)
                          for s in range(0, y.shape[0], self.chunk)])


def _step(images: int, per_image: int, max_rows: int) -> int:
    """The row stride that keeps at most about ``max_rows`` rows of ``images`` images."""
    return max(1, -(-images * per_image // max_rows))


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def residual_tails(gm: fx.GraphModule, names: set[str]
                   ) -> dict[str, tuple[str, str | None, int]]:
    """Per residual sum node of ``gm``: ``(layer, norm or None, operand position)`` of the
    weighted layer in ``names`` refitted against the sum (module docstring)."""
    out = {}
    for n in gm.graph.nodes:
        if n.target not in SUMS or n.kwargs or len(n.args) != 2 \
                or not all(isinstance(a, fx.Node) for a in n.args):
            continue
        best = None
        for pos, a in enumerate(n.args):
            if _single_user(a) is not n or n.args[1 - pos] is a:
                continue
            layer, norm = a, None
            if _norm_module(gm, a) is not None and isinstance(a.args[0], fx.Node):
                layer, norm = a.args[0], a
            if layer.op != "call_module" or layer.name not in names \
                    or _single_user(layer) is not (norm or n):
                continue
            size = gm.get_submodule(layer.target).weight.numel()
            if best is None or size > best[0]:
                best = (size, layer.name, None if norm is None else norm.name, pos)
        if best is not None:
            out[n.name] = best[1:]
    return out


def _inverse_norm(bn: nn.modules.batchnorm._BatchNorm, t: torch.Tensor,
                  fallback: torch.Tensor) -> torch.Tensor:
    """``BN⁻¹(t)`` per channel (dim 1) in eval mode; ``fallback`` where γ is zero."""
    shape = (1, -1) + (1,) * (t.dim() - 2)
    c = t.shape[1]
    gamma = bn.weight.detach() if bn.weight is not None else t.new_ones(c)
    beta = bn.bias.detach() if bn.bias is not None else t.new_zeros(c)
    std = (bn.running_var + bn.eps).sqrt()
    ok = gamma.abs() > 1e-12
    z = (t - beta.view(shape)) * (std / torch.where(ok, gamma, 1.0)).view(shape) \
        + bn.running_mean.view(shape)
    return torch.where(ok.view(shape), z, fallback)


class _Normal:
    """Accumulates ``XᵀX`` and ``XᵀY`` per group (with a ones column for the intercept)."""

    def __init__(self, groups: int, cols: int, outs: int, intercept: bool,
                 device: torch.device | None = None) -> None:
        d = cols + int(intercept)
        self.groups, self.intercept = groups, intercept
        self.gram = torch.zeros(groups, d, d, dtype=torch.float64, device=device)
        self.cross = torch.zeros(groups, d, outs, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        g = self.groups
        for start in range(0, x.shape[0], ROW_CHUNK):
            xs = x[start:start + ROW_CHUNK].float()
            ys = y[start:start + ROW_CHUNK].float()
            n = xs.shape[0]
            xs = xs.reshape(n, g, -1).transpose(0, 1)              # [g, n, cols]
            ys = ys.reshape(n, g, -1).transpose(0, 1)              # [g, n, outs]
            if self.intercept:
                xs = torch.cat([xs, xs.new_ones(g, n, 1)], 2)
            self.gram += (xs.transpose(1, 2) @ xs).double()
            self.cross += (xs.transpose(1, 2) @ ys).double()
            self.rows += n

    def solve(self, w0: torch.Tensor, b0: torch.Tensor | None, ridge: float) -> torch.Tensor:
        """``[g, d, outs]``: the ridge solution pulled towards ``w0`` (``[g, cols, outs]``) and
        ``b0`` (``[g, outs]``, the intercept's prior)."""
        prior = w0.double()
        if self.intercept:
            prior = torch.cat([prior, (b0 if b0 is not None else
                                       w0.new_zeros(w0.shape[0], w0.shape[2])).double()[:, None]],
                              1)
        d = self.gram.shape[1]
        scale = self.gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)   # tr(G) / d
        lam = (ridge * scale)[:, None, None]
        eye = torch.eye(d, dtype=torch.float64, device=self.gram.device)
        return torch.linalg.solve(self.gram + lam * eye, self.cross + lam * prior)


def _norm_module(gm: fx.GraphModule, node: fx.Node) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm (with running statistics) that ``node`` calls, if it calls one."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            return m
    return None


def _bn_reader(gm: fx.GraphModule, node: fx.Node) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm that is the only reader of ``node``, if there is one."""
    user = _single_user(node)
    return None if user is None else _norm_module(gm, user)


class _Refitter(fx.Interpreter):
    """Runs the component on all calibration images; at each weighted layer, refits it on its
    input before computing its output with the new weights."""

    def __init__(self, gm: fx.GraphModule, targets: Mapping[str, _Rows], ridge: float,
                 sums: Mapping[str, tuple[str, str | None, int]] | None = None,
                 sum_targets: Mapping[str, _Rows] | None = None) -> None:
        super().__init__(gm)
        self.targets, self.ridge = targets, ridge
        self.sums, self.sum_targets = dict(sums or {}), dict(sum_targets or {})
        self.deferred = {layer for layer, _, _ in self.sums.values()}
        self.pending: dict[str, torch.Tensor] = {}   # a deferred layer's input, until its sum
        self.refitted: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and n.name in self.deferred:
            self.pending[n.name] = self.env[n.args[0]]       # refitted at its sum
        elif n.op == "call_module" and n.name in self.targets:
            x = self.env[n.args[0]]
            self._refit(n, self.module.get_submodule(n.target), x, self.targets[n.name])
        elif n.name in self.sums:
            self._refit_at_sum(n)
        return super().run_node(n)

    @torch.no_grad()
    def _refit_at_sum(self, n: fx.Node) -> None:
        """Refit the sum's tail layer so that ``tail + other`` matches the source's sum, then
        recompute the tail operand with the new weights (module docstring)."""
        layer_name, norm_name, pos = self.sums[n.name]
        operand = n.args[pos]                       # the layer, or its norm
        layer_node = operand if norm_name is None else operand.args[0]
        layer = self.module.get_submodule(layer_node.target)
        x = self.pending.pop(layer_name)
        wanted = self.sum_targets[n.name]
        channels_first = isinstance(layer, nn.Conv2d)
        rows = wanted.rows - wanted.of(self.env[n.args[1 - pos]], channels_first)
        if norm_name is not None:
            norm = self.module.get_submodule(operand.target)
            rows = _inverse_norm(norm, rows, self.targets[layer_name].rows)
        self._refit(layer_node, layer, x, wanted._replace(rows=rows))
        out = layer(x)
        self.env[operand] = out if norm_name is None else norm(out)

    @torch.no_grad()
    def _refit(self, node: fx.Node, layer: nn.Module, x: torch.Tensor, y: _Rows) -> None:
        groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        out_ch = layer.weight.shape[0]
        if y.rows.shape[1] != out_ch:
            raise PreconditionError(f"reconstruct: target of {node.format_node()} has "
                                    f"{y.rows.shape[1]} channels, the layer {out_ch} outputs")
        bn = None if layer.bias is not None else _bn_reader(self.module, node)
        intercept = layer.bias is not None or bn is not None
        w = layer.weight.detach()
        cols = w[0].numel()
        normal = _Normal(groups, cols, out_ch // groups, intercept, w.device)
        offset = 0
        for start in range(0, x.shape[0], y.chunk):
            xs = _input_rows(layer, x[start:start + y.chunk], y.step)
            normal.add(xs, y.rows[offset:offset + xs.shape[0]].to(xs.device))
            offset += xs.shape[0]
        if offset != y.rows.shape[0]:
            raise PreconditionError(f"reconstruct: {node.format_node()} sees {offset} rows, its "
                                    f"target has {y.rows.shape[0]}: not the same images")
        w0 = w.reshape(groups, out_ch // groups, cols).transpose(1, 2)     # [g, cols, outs]
        b0 = None if layer.bias is None else layer.bias.detach().reshape(groups, -1)
        sol = normal.solve(w0, b0, self.ridge)
        if not bool(torch.isfinite(sol).all()):
            return  # a degenerate system: keep the pruned weights
        new_w = sol[:, :cols].transpose(1, 2).reshape(w.shape)
        layer.weight.copy_(new_w.to(w.dtype))
        if intercept:
            b = sol[:, cols].reshape(-1).to(w.dtype)
            if layer.bias is not None:
                layer.bias.copy_(b)
            else:
                bn.running_mean.sub_(b)
        self.refitted.append(node.name)


class _Capture(fx.Interpreter):
    """Runs the source a chunk of images at a time and keeps, per node in ``kept``, the sampled
    rows (:func:`_sampled`) of its output's kept channels.

    A module-level class on purpose: a class defined in a function forms a reference cycle with
    its closure, which would keep the captured tensors alive until the cyclic collector runs."""

    def __init__(self, gm: fx.GraphModule, kept: Mapping[str, torch.Tensor],
                 channels_first: Mapping[str, bool], images: int, max_rows: int) -> None:
        super().__init__(gm)
        self.kept, self.channels_first = kept, channels_first
        self.images, self.max_rows = images, max_rows
        self.captured: dict[str, list[torch.Tensor]] = {n: [] for n in kept}
        self.steps: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.kept:
            first = self.channels_first[n.name]
            dim = 1 if first else -1
            y = out.index_select(dim, self.kept[n.name].to(out.device))
            if n.name not in self.steps:
                self.steps[n.name] = _step(self.images, y[0].numel() // y.shape[dim],
                                           self.max_rows)
            self.captured[n.name].append(_sampled(y, self.steps[n.name], first))
        return out


class ReconstructLayers(Pass):
    """Refit every weighted layer on calibration images (module docstring). ``images`` are
    model inputs ``[N, ...]``; ``kept[name]`` the source output channels the component's layer
    ``name`` kept (``source_targets`` computes them from the source)."""

    name = "reconstruct-layers"
    # weights change, the graph and its shapes do not
    preserves = (ChannelGroups,)

    def __init__(self, source: fx.GraphModule, kept: Mapping[str, torch.Tensor],
                 images: torch.Tensor, *, ridge: float = 1e-1, chunk: int = 64,
                 max_rows: int = MAX_ROWS, layers: set[str] | None = None,
                 through_sums: bool = True) -> None:
        self.source, self.kept, self.images = source, dict(kept), images
        self.ridge, self.chunk, self.layers, self.max_rows = ridge, chunk, layers, max_rows
        self.through_sums = through_sums
        self.refitted: list[str] = []

    def _targets(self, layers: list[str], sums: Mapping[str, tuple[str, str | None, int]]
                 ) -> dict[str, _Rows]:
        """The source's outputs of ``layers`` and of ``sums`` on the kept channels (a sum's are
        its tail layer's), only the rows that enter the normal equations: memory is bounded by
        ``max_rows`` per layer, not by the number of images."""
        channels_of = {n: n for n in layers} | {s: layer for s, (layer, _, _) in sums.items()}
        names = [*layers, *sums]
        src_nodes = {n.name: n for n in self.source.graph.nodes}
        missing = [n for n in names if n not in src_nodes]
        if missing:
            raise PreconditionError(f"reconstruct: the source has no node {missing[0]!r}: "
                                    "not the component's source")
        conv = {n: isinstance(self.source.get_submodule(src_nodes[channels_of[n]].target),
                              nn.Conv2d) for n in names}
        capture = _Capture(self.source, {n: self.kept[channels_of[n]] for n in names}, conv,
                           len(self.images), self.max_rows)
        device = module_device(self.source)
        with eval_mode(self.source), torch.no_grad():
            for start in range(0, len(self.images), self.chunk):
                capture.run(self.images[start:start + self.chunk].to(device))
        return {n: _Rows(torch.cat(v), capture.steps[n], self.chunk)
                for n, v in capture.captured.items()}

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        layers = [n.name for n in weighted_nodes(gm)
                  if n.name in self.kept and (self.layers is None or n.name in self.layers)]
        sums = residual_tails(gm, set(layers)) if self.through_sums else {}
        captured = self._targets(layers, sums)
        if not captured:
            return False
        sum_targets = {s: captured.pop(s) for s in sums}
        refitter = _Refitter(gm, captured, self.ridge, sums, sum_targets)
        with eval_mode(gm), torch.no_grad():
            refitter.run(self.images.to(module_device(gm)))
        self.refitted = refitter.refitted
        return bool(self.refitted)
