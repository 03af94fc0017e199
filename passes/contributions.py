"""Contributions (analysis): per-class channel contributions of every weighted layer (MDA §1.2).

The math and its streaming accumulation; choosing the samples and the profile file that stores
the result live in ``mdafx.profiling``.

Math
----
For a weighted layer with weight ``W`` and one sample ``x`` (the layer's *input*), the
contribution of input channel ``i`` to output channel ``o`` is the part of output map ``o`` that
comes from ``i``, summed over all output positions, without bias, before any norm/activation:

- Conv2d (weight ``[O, I/g, kh, kw]``, ``K = kh·kw``)::

      c[o,i](x) = Σ_{h,w} Σ_k W[o,i,k] · unfold(x)[i,k,h,w]
                = Σ_k W[o,i,k] · S[i,k],      S[i,k] = Σ_{h,w} unfold(x)[i,k,h,w]

  ``unfold(x)[i,(a,b),h,w] = pad(x)[i, h·s_h + a·d_h, w·s_w + b·d_w]``, so ``S[i,(a,b)]`` is a box
  sum of the padded input over a strided window: a sum over the rows ``a·d_h + s_h·[0, H_out)``
  and the columns ``b·d_w + s_w·[0, W_out)``. We compute it separably (first per column tap,
  then per row tap) from strided slices of the *unpadded* input for ``padding_mode='zeros'``
  (padding contributes zeros, so only the in-image part of each window is summed), and from
  ``F.pad(x, mode=padding_mode)`` for 'reflect' / 'replicate' / 'circular' (exactly what
  ``nn.Conv2d`` does). Memory is ``B×I×K`` (plus ``B×I×H×kw`` for the column sums), never
  ``B×O×I×H×W``.
- Grouped / depthwise conv: output ``o`` of group ``g(o) = o // (O/g)`` only sees the input
  channels ``g(o)·I/g + j`` for ``j in [0, I/g)``. The result therefore has shape
  ``[num_classes, O, I/g]`` and **index ``j`` is the input channel's position inside o's group**
  (global input channel ``g(o)·(I/g) + j``), which is also the layout of ``W[o, j]``. For
  ``groups=1`` this is the plain ``[num_classes, O, I]``.
- Linear (weight ``[O, I]``), input ``[B, *, I]`` (extra leading dims such as tokens)::

      c[o,i](x) = Σ_t W[o,i] · x[t,i] = W[o,i] · Σ_t x[t,i]

  i.e. the same form with ``K = 1`` and ``S[i] = Σ_t x[t,i]``.
- A layer whose input folds each sample's windows into the batch dim (window attention:
  ``B·nW`` rows, sample-major) sums a sample's rows into its ``S`` (``S`` is linear in x).
- A layer called at several nodes (a shared module) adds every call: ``A`` is defined per
  weight, and the same weights mix the same channels at every call; a functional layer
  (``F.conv2d``/``F.linear`` on a parameter, keyed by its node) is one call.

Per class ``c`` over the samples of that class (ReLU after the spatial / token sum)::

    A[c, o, i] = Σ_{x of class c} ReLU(c[o,i](x))

Sign split for ``K = 1`` (Linear, 1×1 conv): for scalars ``ReLU(w·s) = w⁺·s⁺ + w⁻·s⁻`` with
``w⁺ = max(w, 0)``, ``w⁻ = min(w, 0)``, hence exactly::

    A[c, o, i] = W⁺[o,i] · Σ_{x of c} S_x[i]⁺  +  W⁻[o,i] · Σ_{x of c} S_x[i]⁻

so such a layer costs ``O(I)`` per sample (two per-class sums, kept in float64). For ``K > 1``
the ReLU acts on a sum over taps and does not split.

Result representation
---------------------
:func:`contributions` returns, per layer, either

- a dense ``Tensor`` ``[C, O, I/g]`` (``K > 1`` convs), or
- a :class:`FactoredContribution` (Linear and 1×1 convs, any groups): the two class sums
  ``pos = Σ S⁺``, ``neg = Σ S⁻`` (``[C, I]``, float64) and the layer's weight ``[O, I/g]``.
  ``A`` of one class is formed on demand (:meth:`FactoredContribution.for_class`, ``.chunk``,
  ``.rows``; ``.dense()`` materialises all of it), so the ``C×O×I`` tensor — 4.1 GB for the
  25088→4096 head of torchvision's VGG-16 and 10 classes — never has to exist.
  ``A[c, o, j] = w·pos`` if ``w = W[o, j] > 0`` else ``w·neg`` (one rounded product in ``dtype``
  after rounding the class sum to ``dtype``): bit-identical to the dense tensor that
  ``dense=True`` returns.

Both expose ``.shape == (C, O, I/g)``. ``dense=True`` gives plain tensors for every layer (the
pre-factored behaviour).

Cost: per sample, the box sums read the layer input ``kw`` times (linear in the activation size)
and, for ``K > 1``, ``c = W·S`` costs ``O·(I/g)·K`` multiply-adds, one per weight: far below
the layer's own ``O·(I/g)·K·H_out·W_out``. Everything is linear in the number of samples. The
per-sample ``[b, O, I/g]`` block of a ``K > 1`` layer is the only large temporary; it is
processed in chunks of samples (and, where one sample alone exceeds the budget, of output
channels) written into one reused buffer of at most ``chunk_bytes``. The ``bmm`` reads the
weight through a strided view (no per-layer copy of the weights is held).

Precision (why ``A`` is float32 by default): ``A`` has ``num_classes · Σ O·I/g`` entries
(torchvision's VGG-16 head alone is 4096×25088, i.e. 4.1 GB per 10 classes in float32, 8.2 GB
in float64), so its dtype sets the memory floor. The box sums run in (at least) float32 with
torch's cascade summation; ``K = 1`` layers keep their class sums in float64 and round once.
``K > 1`` layers add each sample's ReLU'd block into ``A`` in the dataset order of its class
(the batch is sorted by label, stably), one rounding per sample: the relative error is at most
``n_c · 2^-24`` (n_c samples of class c; typically ``√n_c · 2^-24``), far below what the α/β
thresholds of MDA §1.3 resolve, and the summation order does not depend on the batch size.
``dtype=torch.float64`` gives the exact form to ~1e-15 (the tests compare it with the naive
formula that way).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mdafx.errors import InternalError, PreconditionError
from mdafx.ir import eval_mode, module_device
from mdafx.passmanager import Analysis, AnalysisManager
from mdafx.rules import WeightedLayer, weighted_layer

__all__ = [
    "CHUNK_BYTES",
    "Contribution",
    "Contributions",
    "FactoredContribution",
    "accumulate",
    "as_layer",
    "class_contributions",
    "graph_layers",
    "conv_padding",
    "densify",
    "naive_contributions",
    "naive_sample_contributions",
    "resolve_layer",
    "resolve_layers",
    "sample_contributions",
    "weighted_layers",
]

CHUNK_BYTES: int = 256 * 2**20
"""Default budget for the per-sample ``[b, O, I/g]`` contribution block of one layer."""

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# --------------------------------------------------------------------------------------------
# layers


def as_layer(mod: nn.Module | WeightedLayer, name: str = "") -> WeightedLayer:
    """The :class:`~mdafx.rules.WeightedLayer` of an ``nn.Conv2d`` / ``nn.Linear`` (a layer is
    returned as is); PreconditionError for anything else."""
    if isinstance(mod, WeightedLayer):
        return mod
    if isinstance(mod, nn.Conv2d):
        return WeightedLayer(name, "conv", mod.weight, mod.bias, tuple(mod.kernel_size),
                             tuple(mod.stride), mod.padding if isinstance(mod.padding, str)
                             else tuple(mod.padding), tuple(mod.dilation), mod.groups,
                             mod.padding_mode, mod, type(mod).__name__)
    if isinstance(mod, nn.Linear):
        return WeightedLayer(name, "linear", mod.weight, mod.bias, module=mod,
                             type_name=type(mod).__name__)
    raise PreconditionError(f"layer {name!r}: {type(mod).__name__} is not a Conv2d or Linear")


def graph_layers(gm: torch.fx.GraphModule) -> dict[str, WeightedLayer]:
    """Every weighted layer of ``gm`` by key (graph order): the conv/linear modules (by path;
    one entry for a module called at several nodes) and the ``F.conv2d`` / ``F.linear`` calls
    on parameters (by node name), as their channel rules describe them
    (``mdafx.rules.weighted_layer``)."""
    out: dict[str, WeightedLayer] = {}
    for node in gm.graph.nodes:
        layer = weighted_layer(node, gm)
        if layer is not None and layer.key not in out:
            out[layer.key] = layer
    return out


def weighted_layers(gm: torch.fx.GraphModule) -> list[str]:
    """Keys of :func:`graph_layers`: module paths and functional node names, graph order.

    A module called from several nodes is listed once; its contributions are the sum over its
    calls (:func:`class_contributions`). Raises ``PreconditionError`` naming the layer for a
    padding mode this module cannot reproduce.
    """
    layers = graph_layers(gm)
    for name, layer in layers.items():
        _check_supported(name, layer)
    return list(layers)


def resolve_layer(model: nn.Module, name: str) -> WeightedLayer:
    """The weighted layer called ``name`` in ``model``: a functional layer of a GraphModule, or
    the conv/linear submodule at that path."""
    if isinstance(model, torch.fx.GraphModule):
        layer = graph_layers(model).get(name)
        if layer is not None:
            return layer
    try:
        return as_layer(model.get_submodule(name), name)
    except AttributeError:
        raise PreconditionError(f"the model has no weighted layer {name!r}") from None


def _check_supported(name: str, mod: nn.Module | WeightedLayer) -> None:
    layer = as_layer(mod, name)
    if layer.kind == "conv" and layer.padding_mode not in _PADDING_MODES:
        raise PreconditionError(
            f"layer {name!r}: Conv2d padding_mode={layer.padding_mode!r} is not supported "
            f"(supported: {', '.join(_PADDING_MODES)})"
        )


def conv_padding(mod: nn.Conv2d | WeightedLayer) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` padding that ``mod`` applies, string paddings included.

    ``'same'`` pads ``d·(k−1)`` in total per dim, ``⌊total/2⌋`` before and the rest after, as
    ``nn.Conv2d`` does; ``'valid'`` pads nothing.
    """
    mod = as_layer(mod)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return (0, 0, 0, 0)
        pads: list[int] = []
        for k, d in zip(mod.kernel_size, mod.dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = mod.padding
    return (ph, ph, pw, pw)


# --------------------------------------------------------------------------------------------
# per-sample contributions (pre-ReLU)


def _tap_slice(size: int, out_size: int, pad: int, stride: int, offset: int) -> slice | None:
    """Slice of the unpadded axis hit by padded indices ``offset + stride·[0, out_size)``.

    Padded index ``p`` is unpadded ``p − pad``; indices outside ``[0, size)`` are padding.
    ``None`` when the whole window lies in the padding.
    """
    first = offset - pad
    lo = 0 if first >= 0 else (-first + stride - 1) // stride
    hi = min(out_size - 1, (size - 1 - first) // stride)
    if hi < lo:
        return None
    return slice(first + lo * stride, first + hi * stride + 1, stride)


def _box_sums(mod: WeightedLayer, x: Tensor) -> Tensor:
    """``S[b, i, k] = Σ_{h,w} unfold(x)[b, i, k, h, w]`` of a conv input ``x``: ``[B, I, K]``."""
    (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
    top, bottom, left, right = conv_padding(mod)
    if mod.padding_mode != "zeros":
        x = F.pad(x, (left, right, top, bottom), mode=mod.padding_mode)
        top = bottom = left = right = 0
    height, width = x.shape[-2], x.shape[-1]
    h_out = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    w_out = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    if h_out <= 0 or w_out <= 0:
        raise PreconditionError(f"input {tuple(x.shape)} is smaller than the dilated kernel")
    col_slices = [_tap_slice(width, w_out, left, sw, b * dw) for b in range(kw)]
    col_sums = torch.stack(_window_sums(x, -1, col_slices), dim=-1)  # [B, I, H, kw]
    row_slices = [_tap_slice(height, h_out, top, sh, a * dh) for a in range(kh)]
    taps = _window_sums(col_sums, 2, row_slices)  # kh × [B, I, kw]
    return torch.stack(taps, dim=2).reshape(x.shape[0], x.shape[1], kh * kw)


def _window_sums(t: Tensor, dim: int, slices: list[slice | None]) -> list[Tensor]:
    """``t`` summed over ``dim`` restricted to each slice (zeros for ``None``); taps with the
    same window (e.g. every tap of a 1×1 kernel) share one reduction."""
    cache: dict[tuple[int, int, int] | None, Tensor] = {}
    out = []
    for sl in slices:
        key = None if sl is None else (sl.start, sl.stop, sl.step)
        if key not in cache:
            if sl is None:
                shape = list(t.shape)
                del shape[dim]
                cache[key] = t.new_zeros(shape)
            else:
                index: list[slice] = [slice(None)] * t.dim()
                index[dim] = sl
                cache[key] = t[tuple(index)].sum(dim)
        out.append(cache[key])
    return out


def _compute_dtype(x: Tensor) -> torch.dtype:
    # half/bfloat16 activations would overflow/lose the spatial sums
    return torch.promote_types(x.dtype, torch.float32)


def _input_sums(mod: WeightedLayer, x: Tensor) -> Tensor:
    """Per-sample ``S``: ``[B, I, K]`` (conv) or ``[B, I, 1]`` (linear, tokens summed)."""
    x = x.detach().to(_compute_dtype(x))
    if mod.kind == "conv":
        if x.dim() != 4:
            raise PreconditionError(f"Conv2d contributions need a batched [B, C, H, W] input, got "
                             f"{tuple(x.shape)}")
        return _box_sums(mod, x)
    if x.dim() < 2:
        raise PreconditionError(f"Linear contributions need a batched [B, ..., I] input, got "
                         f"{tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-1]).sum(1).unsqueeze(-1)


def _weight_blocks(mod: WeightedLayer, dtype: torch.dtype) -> tuple[Tensor, int]:
    """``W`` as ``[g, O/g, I/g, K]`` in ``dtype`` and the number of groups ``g``."""
    w = mod.weight.detach().to(dtype)
    groups = mod.groups
    out_ch, in_per_group = w.shape[0], w.shape[1]
    return w.reshape(groups, out_ch // groups, in_per_group, -1), groups


def sample_contributions(mod: nn.Module | WeightedLayer, x: Tensor,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Pre-ReLU ``c[b, o, j]`` for every sample of ``x`` (the layer input): ``[B, O, I/g]``.

    Materialises the whole block: for tests and small inputs; :func:`contributions` streams.
    """
    mod = as_layer(mod)
    wb, groups = _weight_blocks(mod, dtype)
    s = _input_sums(mod, x).to(dtype)
    s = s.reshape(s.shape[0], groups, -1, s.shape[-1])  # [B, g, I/g, K]
    c = torch.einsum("goik,bgik->bgoi", wb, s)
    return c.reshape(s.shape[0], -1, wb.shape[2])


def naive_sample_contributions(mod: nn.Module | WeightedLayer, x: Tensor) -> Tensor:
    """The reference's formula: materialise ``unfold`` and the ``B×O×I×H×W`` product, then sum.

    Returns the pre-ReLU ``[B, O, I/g]`` in the input's (promoted) dtype.
    """
    mod = as_layer(mod)
    x = x.detach().to(_compute_dtype(x))
    w = mod.weight.detach().to(x.dtype)
    if mod.kind == "linear":
        tokens = x.reshape(x.shape[0], -1, 1, x.shape[-1])  # [B, T, 1, I]
        return (tokens * w).sum(1)  # [B, T, O, I] summed over T
    top, bottom, left, right = conv_padding(mod)
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    x = F.pad(x, (left, right, top, bottom), mode=mode)
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, stride=mod.stride)
    groups = mod.groups
    batch, in_ch = x.shape[0], x.shape[1]
    k = mod.kernel_size[0] * mod.kernel_size[1]
    cols = cols.reshape(batch, groups, in_ch // groups, k, -1)  # [B, g, I/g, K, L]
    wg = w.reshape(groups, w.shape[0] // groups, w.shape[1], k)  # [g, O/g, I/g, K]
    full = (wg[None, :, :, :, :, None] * cols[:, :, None]).sum(4)  # [B, g, O/g, I/g, L]
    return full.sum(-1).reshape(batch, w.shape[0], w.shape[1])


# --------------------------------------------------------------------------------------------
# factored result of a single-tap layer


_FACTORED_KIND = "mdafx.factored_contribution"


class FactoredContribution:
    """``A`` of a single-tap layer (Linear, 1×1 conv, any groups) without the ``[C, O, I/g]``
    tensor.

    ``A[c, o, j] = W⁺[o, j]·pos[c, i] + W⁻[o, j]·neg[c, i]`` with ``i = g(o)·(I/g) + j`` the global
    input channel of ``o``'s ``j``-th input (``g(o) = o // (O/g)``), ``pos[c] = Σ_{x of c} S_x⁺``
    and ``neg[c] = Σ_{x of c} S_x⁻``. Since one of ``W⁺``, ``W⁻`` is zero, every entry is a single
    product ``w · (pos if w > 0 else neg)``, computed in :attr:`dtype` after rounding the class sum
    to :attr:`dtype`, so any chunking gives the same bits as :meth:`dense`.

    Attributes: ``pos``, ``neg`` (``[C, I]``, float64), ``weight`` (``[O, I/g]``; from
    :func:`contributions` a view of the layer's own weight, not a copy), ``groups``, ``dtype``
    (of the materialised ``A``). ``shape`` is ``(C, O, I/g)`` like the dense tensor's.

    Sharing the weight keeps the factored form's own memory at ``O(C·I)``. Its version counter is
    recorded, so using the object after the weight was changed in place (``optimizer.step()``,
    ``weight.mul_()``, ...) raises instead of giving the contributions of other weights.
    """

    __slots__ = ("pos", "neg", "weight", "groups", "dtype", "_version")

    def __init__(self, pos: Tensor, neg: Tensor, weight: Tensor, groups: int = 1,
                 dtype: torch.dtype = torch.float32) -> None:
        if weight.dim() == 4:
            if weight.shape[2:] != (1, 1):
                raise InternalError(f"a factored contribution needs a 1×1 kernel, got weight "
                                 f"{tuple(weight.shape)}")
            weight = weight.reshape(weight.shape[0], weight.shape[1])
        if weight.dim() != 2:
            raise InternalError(f"weight must be [O, I/g] (or [O, I/g, 1, 1]), got "
                             f"{tuple(weight.shape)}")
        out_ch, in_per_group = weight.shape
        if groups < 1 or out_ch % groups:
            raise InternalError(f"groups={groups} does not divide the {out_ch} output channels")
        if pos.dim() != 2 or pos.shape != neg.shape or pos.shape[1] != groups * in_per_group:
            raise InternalError(f"pos/neg must both be [C, {groups * in_per_group}], got "
                             f"{tuple(pos.shape)} and {tuple(neg.shape)}")
        self.pos, self.neg, self.weight = pos, neg, weight.detach()
        self.groups, self.dtype = int(groups), dtype
        self._version = _version_of(self.weight)

    # -- shape-like metadata -----------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.pos.shape[0],) + tuple(self.weight.shape))

    @property
    def num_classes(self) -> int:
        return self.pos.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dim(self) -> int:
        return 3

    def numel(self) -> int:
        """Entries of the dense ``A`` this object stands for."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the class sums (the weight belongs to the layer)."""
        return self.pos.numel() * self.pos.element_size() * 2

    def dense_nbytes(self) -> int:
        """Bytes :meth:`dense` would allocate."""
        return self.numel() * torch.empty((), dtype=self.dtype).element_size()

    def __repr__(self) -> str:
        return (f"FactoredContribution(shape={tuple(self.shape)}, groups={self.groups}, "
                f"dtype={self.dtype})")

    # -- materialisation ---------------------------------------------------------------------

    def _checked_weight(self) -> Tensor:
        if self._version is not None and _version_of(self.weight) != self._version:
            raise PreconditionError(
                "the layer's weight was modified in place after its contributions were "
                "computed; recompute them (the factored form shares the weight's storage)")
        return self.weight

    def rows(self, c: int, index: slice | Tensor | Sequence[int] = slice(None)) -> Tensor:
        """``A[c, index, :]``: ``[r, I/g]`` in :attr:`dtype` for output channels ``index``."""
        w = self._checked_weight()
        out_ch, in_per_group = w.shape
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=w.device)
        w = w[index].to(self.dtype)
        p = self.pos[c].to(device=w.device, dtype=self.dtype)
        n = self.neg[c].to(device=w.device, dtype=self.dtype)
        if self.groups == 1:
            p, n = p[None], n[None]
        else:
            group = torch.arange(out_ch, device=w.device)[index] // (out_ch // self.groups)
            p = p.view(self.groups, in_per_group)[group]
            n = n.view(self.groups, in_per_group)[group]
        return w * torch.where(w > 0, p, n)

    def for_class(self, c: int) -> Tensor:
        """``A[c]``: ``[O, I/g]`` in :attr:`dtype`."""
        return self.rows(c)

    def chunk(self, classes: slice | range | Sequence[int]) -> Tensor:
        """``A[classes]``: ``[len(classes), O, I/g]`` in :attr:`dtype`."""
        if isinstance(classes, slice):
            classes = range(*classes.indices(self.num_classes))
        classes = [int(c) for c in classes]
        out = torch.empty((len(classes),) + tuple(self.weight.shape), dtype=self.dtype,
                          device=self.device)
        for k, c in enumerate(classes):  # per class: temporaries of one [O, I/g]
            out[k] = self.rows(c)
        return out

    def dense(self) -> Tensor:
        """The whole ``A``: ``[C, O, I/g]`` in :attr:`dtype` (``C·O·I/g`` entries)."""
        return self.chunk(range(self.num_classes))

    # -- plain-data form (Profile files, weights_only=True) ----------------------------------

    def cpu(self) -> FactoredContribution:
        return self.to(torch.device("cpu"))

    def to(self, device: torch.device | str) -> FactoredContribution:
        w = self._checked_weight()
        if all(t.device == torch.device(device) for t in (self.pos, self.neg, w)):
            return self
        return FactoredContribution(self.pos.to(device), self.neg.to(device), w.to(device),
                                    self.groups, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors / str / int (loadable with ``torch.load(weights_only=True)``)."""
        return {"kind": _FACTORED_KIND, "pos": self.pos.detach().cpu(),
                "neg": self.neg.detach().cpu(), "weight": self._checked_weight().cpu(),
                "groups": self.groups, "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FactoredContribution:
        if data.get("kind") != _FACTORED_KIND:
            raise PreconditionError(f"not a factored contribution: kind={data.get('kind')!r}")
        dtype = getattr(torch, str(data["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise PreconditionError(f"unknown dtype {data['dtype']!r}")
        return cls(data["pos"], data["neg"], data["weight"], int(data["groups"]), dtype)

    @staticmethod
    def is_dict(data: Any) -> bool:
        return isinstance(data, Mapping) and data.get("kind") == _FACTORED_KIND


def _version_of(t: Tensor) -> int | None:
    """In-place modification counter (shared by views and ``detach()``); ``None`` for inference
    tensors, which have none (and cannot be modified in place outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return None


Contribution = Tensor | FactoredContribution
"""A layer's entry in :func:`contributions`' result: dense ``[C, O, I/g]`` or factored."""


def densify(a: Contribution) -> Tensor:
    """The dense ``[C, O, I/g]`` tensor of either form (a tensor is returned as is)."""
    return a.dense() if isinstance(a, FactoredContribution) else a


# --------------------------------------------------------------------------------------------
# streaming accumulation over batches


class _Workspace:
    """One flat scratch buffer shared by all layers of a run: the per-sample block is written
    into it (``bmm(out=...)``) instead of being allocated, and page-faulted, per chunk."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        buf = self.buf
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self.buf = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


class _CheapLayer:
    """Accumulates ``A`` of a ``K > 1`` conv from per-batch inputs; the per-sample block is
    bounded by ``chunk_bytes``.

    Internal layout: ``acc[c, g·(I/g) + j, o']`` for output ``o = g·(O/g) + o'``, so that one
    sample's block ``[g·I/g, O/g]`` (the bmm output with the sample index outside) adds to it
    contiguously; :meth:`result` returns the ``[C, O, I/g]`` view.
    """

    def __init__(self, mod: WeightedLayer, num_classes: int, dtype: torch.dtype,
                 chunk_bytes: int, device: torch.device, workspace: _Workspace) -> None:
        self.mod = mod
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.workspace = workspace
        wb, self.groups = _weight_blocks(mod, dtype)
        g, o_per_g, i_per_g, k = wb.shape
        self.shape = (g, o_per_g, i_per_g)
        # bmm batched over (group, input channel): [b, K] @ [K, O/g] per channel. A strided view
        # of the weight where reshape allows it (groups = 1 or depthwise: BLAS reads it through
        # its leading dimension, no copy), else a copy of this (grouped, hence small) weight
        self.wt = wb.permute(0, 2, 3, 1).reshape(g * i_per_g, k, o_per_g).to(device)
        self.acc = torch.zeros(num_classes, g * i_per_g, o_per_g, dtype=dtype, device=device)

    def add(self, x: Tensor, labels: Tensor) -> None:
        g, o_per_g, i_per_g = self.shape
        itemsize = self.acc.element_size()
        per_sample = g * o_per_g * i_per_g * itemsize
        batch_chunk = max(1, self.chunk_bytes // per_sample)
        o_chunk = o_per_g if per_sample <= self.chunk_bytes else max(
            1, self.chunk_bytes // (g * i_per_g * itemsize))
        # box sums first (chunked by the input's own size), then sort the small S by label;
        # adding samples one by one in that (stable) order makes A's summation order the
        # dataset order of each class, whatever the batch size or chunking
        sample_bytes = max(1, x[:1].numel() * x.element_size())
        sums_chunk = max(1, self.chunk_bytes // sample_bytes)
        sums = _fold_rows(torch.cat([_input_sums(self.mod, x[i:i + sums_chunk]).to(self.dtype)
                                     for i in range(0, x.shape[0], sums_chunk)]),
                          labels.shape[0])  # [B, I, K]
        order = torch.argsort(labels, stable=True)
        sums, labels = sums[order], labels[order].tolist()
        for start in range(0, len(labels), batch_chunk):
            s = sums[start:start + batch_chunk]
            b = s.shape[0]
            st = s.reshape(b, g * i_per_g, -1).transpose(0, 1).contiguous()  # [g·I/g, b, K]
            for o0 in range(0, o_per_g, o_chunk):
                o1 = min(o_per_g, o0 + o_chunk)
                c = self.workspace.get((g * i_per_g, b, o1 - o0), self.dtype, self.acc.device)
                torch.bmm(st, self.wt[:, :, o0:o1], out=c).relu_()
                for n in range(b):
                    self.acc[labels[start + n], :, o0:o1].add_(c[:, n])

    def result(self) -> Tensor:
        g, o_per_g, i_per_g = self.shape
        num_classes = self.acc.shape[0]
        view = self.acc.view(num_classes, g, i_per_g, o_per_g).transpose(2, 3)
        return view.reshape(num_classes, g * o_per_g, i_per_g)


class _PointwiseLayer:
    """Accumulates ``A`` of a ``K = 1`` layer (Linear, 1×1 conv) through the sign split.

    For scalars ``ReLU(w·s) = w⁺·s⁺ + w⁻·s⁻`` (``w⁺ = max(w, 0)``, ``w⁻ = min(w, 0)``), so
    ``A[c, o, j] = W⁺[o, j]·P[c, i] + W⁻[o, j]·N[c, i]`` with ``P[c, i] = Σ_{x of c} S_x[i]⁺``,
    ``N[c, i] = Σ_{x of c} S_x[i]⁻`` and ``i`` the global index of ``o``'s ``j``-th input. A
    sample costs ``O(I)``. :meth:`result` returns them as a :class:`FactoredContribution`
    (or, with ``dense=True``, the materialised ``A``).
    """

    def __init__(self, mod: WeightedLayer, num_classes: int, dtype: torch.dtype,
                 chunk_bytes: int, device: torch.device, dense: bool = False) -> None:
        self.mod = mod
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.dense = dense
        in_ch = mod.weight.shape[1] * mod.groups
        # float64: these are O(C·I) and make A independent of the batching to ~1e-16
        self.pos = torch.zeros(num_classes, in_ch, dtype=torch.float64, device=device)
        self.neg = torch.zeros_like(self.pos)

    def add(self, x: Tensor, labels: Tensor) -> None:
        sample_bytes = max(1, x[:1].numel() * x.element_size())
        sums_chunk = max(1, self.chunk_bytes // sample_bytes)
        s = _fold_rows(torch.cat([_input_sums(self.mod, x[i:i + sums_chunk])[..., 0]
                                  for i in range(0, x.shape[0], sums_chunk)]).double(),
                       labels.shape[0])  # [B, I]
        # one-hot matmul instead of index_add_: deterministic on every device
        onehot = F.one_hot(labels, self.pos.shape[0]).T.double()  # [C, B]
        self.pos += onehot @ s.clamp_min(0)
        self.neg += onehot @ s.clamp_max(0)

    def result(self) -> Tensor | FactoredContribution:
        groups = self.mod.groups
        weight = self.mod.weight.detach()
        factored = FactoredContribution(self.pos, self.neg, weight.reshape(weight.shape[0], -1),
                                        groups, self.dtype)
        return factored.dense() if self.dense else factored


def _fold_rows(sums: Tensor, samples: int) -> Tensor:
    """Per-row sums ``[R, ...]`` of an input whose rows fold each sample into ``R / samples``
    consecutive rows (window attention: ``B·windows`` rows, sample-major) summed per sample;
    the sums are linear in the input, so this is the sample's own spatial/token sum."""
    if sums.shape[0] == samples:
        return sums
    return sums.reshape(samples, -1, *sums.shape[1:]).sum(1)


def _cheap_layer(mod: WeightedLayer, num_classes: int, dtype: torch.dtype, chunk_bytes: int,
                 device: torch.device, workspace: _Workspace, dense: bool = False
                 ) -> _CheapLayer | _PointwiseLayer:
    if mod.weight[0, 0].numel() == 1:
        return _PointwiseLayer(mod, num_classes, dtype, chunk_bytes, device, dense)
    return _CheapLayer(mod, num_classes, dtype, chunk_bytes, device, workspace)


class _NaiveLayer:
    """The reference's accumulation: whole batch at once, ``B×O×I×H×W`` materialised."""

    def __init__(self, mod: WeightedLayer, num_classes: int, dtype: torch.dtype,
                 chunk_bytes: int, device: torch.device, workspace: _Workspace) -> None:
        del chunk_bytes, workspace
        self.mod = mod
        shape = (num_classes, mod.weight.shape[0], mod.weight.shape[1])
        self.acc = torch.zeros(shape, dtype=dtype, device=device)

    def add(self, x: Tensor, labels: Tensor) -> None:
        c = _fold_rows(naive_sample_contributions(self.mod, x), labels.shape[0])
        c = c.to(self.acc.dtype).relu_()
        for label in torch.unique(labels).tolist():
            self.acc[label] += c[labels == label].sum(0)

    def result(self) -> Tensor:
        return self.acc


def _as_labels(y: Any, num_classes: int, device: torch.device) -> Tensor:
    labels = torch.as_tensor(y, device=device).long().reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise PreconditionError(f"labels must lie in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def _accumulate(model: nn.Module, batches: Iterable[Sequence[Any]], num_classes: int,
            layers: Sequence[str], make: Callable[..., Any], dtype: torch.dtype,
            chunk_bytes: int, progress: bool, forward_batch: int | None = None
            ) -> tuple[dict[str, Contribution], list[int]]:
    """Run ``model`` on every batch (in slices of ``forward_batch`` rows if given) and feed each
    listed layer's input to its accumulator (``make``). Returns the per-layer results and the
    number of samples of each class."""
    if num_classes < 1:
        raise PreconditionError(f"num_classes must be >= 1, got {num_classes}")
    if forward_batch is not None and forward_batch < 1:
        raise PreconditionError(f"forward_batch must be >= 1, got {forward_batch}")
    device = module_device(model)
    found = graph_layers(model) if isinstance(model, torch.fx.GraphModule) else {}
    mods = {name: found[name] if name in found else resolve_layer(model, name)
            for name in layers}
    for name, mod in mods.items():
        _check_supported(name, mod)
    workspace = _Workspace()
    accs = {name: make(mod, num_classes, dtype, chunk_bytes, device, workspace)
            for name, mod in mods.items()}
    counts = torch.zeros(num_classes, dtype=torch.long)
    state: dict[str, Any] = {"labels": None, "calls": {}}

    def feed(name: str, x: Tensor) -> None:
        # a module called at several nodes adds every call: A is defined per weight, and the
        # same weights mix the same channels at every call
        calls = state["calls"]
        calls[name] = calls.get(name, 0) + 1
        labels = state["labels"]
        if x.shape[0] % max(labels.shape[0], 1) or x.shape[0] < labels.shape[0]:
            raise PreconditionError(
                f"layer {name!r}: input {tuple(x.shape)} has {x.shape[0]} rows on dim 0 "
                f"but the batch has {labels.shape[0]} labels (dim 0 must be the sample, or "
                "the samples' windows, sample-major)")
        accs[name].add(x, labels)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 out: Any) -> None:
            del mod, out
            feed(name, args[0] if args else kwargs["input"])
        return hook

    functional = {name for name, layer in mods.items() if layer.module is None}
    handles = [layer.module.register_forward_hook(hook_for(name), with_kwargs=True)
               for name, layer in mods.items() if layer.module is not None]
    run = (_Capture(model, functional, feed).run if functional else model)
    try:
        with eval_mode(model), torch.no_grad():
            for batch in tqdm(batches, desc="contributions", unit="batch",
                              disable=not progress):
                x, y = batch[0], batch[1]
                labels = _as_labels(y, num_classes, device)
                step = labels.shape[0] if forward_batch is None else forward_batch
                if step < labels.shape[0] and x.shape[0] != labels.shape[0]:
                    raise PreconditionError(f"forward_batch needs one input row per label, got "
                                     f"{tuple(x.shape)} for {labels.shape[0]} labels")
                for start in range(0, max(1, labels.shape[0]), max(1, step)):
                    part = (x, labels) if step >= labels.shape[0] else (
                        x[start:start + step], labels[start:start + step])
                    state["labels"], state["calls"] = part[1], {}
                    run(part[0].to(device))
                    missing = [name for name in layers if name not in state["calls"]]
                    if missing:
                        raise PreconditionError(f"layers not called in the forward pass: {missing}")
                counts += torch.bincount(labels.cpu(), minlength=num_classes)
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.result().cpu() for name, acc in accs.items()}, counts.tolist()


class _Capture(torch.fx.Interpreter):
    """Runs a GraphModule and hands the input of each functional weighted layer (an
    ``F.conv2d``/``F.linear`` node, which no module hook sees) to ``feed`` before the node."""

    def __init__(self, gm: torch.fx.GraphModule, names: set[str],
                 feed: Callable[[str, Tensor], None]) -> None:
        super().__init__(gm)
        self.names, self.feed = names, feed

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.names:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.feed(n.name, args[0] if args else kwargs["input"])
        return super().run_node(n)


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    if layers is not None:
        return list(layers)
    if not isinstance(model, torch.fx.GraphModule):
        raise PreconditionError("layers=None needs a torch.fx.GraphModule (its graph gives the order); "
                        "pass layers=[...] for a plain nn.Module")
    return weighted_layers(model)


def class_contributions(gm: nn.Module, batches: Iterable[Sequence[Any]], num_classes: int,
                  layers: Sequence[str] | None = None, progress: bool = True, *,
                  dtype: torch.dtype = torch.float32, chunk_bytes: int = CHUNK_BYTES,
                  dense: bool = False, forward_batch: int | None = None
                  ) -> dict[str, Contribution]:
    """``A[c, o, j] = Σ_{x of class c} ReLU(c[o,j](x))`` for every layer (see module docstring).

    ``batches`` yields ``(x, y, ...)`` with ``y`` the class labels of the rows of ``x``; extra
    items (e.g. dataset indices) are ignored. The model runs once per batch in eval mode under
    ``no_grad``; forward hooks capture each layer's input and fold it into ``A`` immediately, so
    no activation is kept beyond its layer. ``layers`` defaults to :func:`weighted_layers`.

    Returns a dict keyed by layer name (graph order). Each value has ``.shape ==
    (num_classes, O, I/groups)`` and is either a CPU tensor in ``dtype`` (``K > 1`` convs; some
    are transposed views of the accumulator: call ``.contiguous()`` where layout matters) or,
    for Linear and 1×1 convs, a :class:`FactoredContribution` (``.for_class(c)``, ``.chunk``,
    ``.dense()``; :func:`densify` accepts both). ``dense=True`` returns tensors for every layer
    (``C·O·I/g`` entries each: mind the memory of large Linear heads).

    ``forward_batch`` runs the model on slices of at most that many rows of each batch: the
    activations of one slice are then the only ones alive, at the price of a less batched
    forward. ``A`` is the same up to the forward's own rounding (a conv may round differently at
    another batch size); the summation order into ``A`` does not depend on it.
    """
    result, _ = accumulate(gm, batches, num_classes, layers, progress, dtype=dtype,
                           chunk_bytes=chunk_bytes, dense=dense, forward_batch=forward_batch)
    return result


def accumulate(gm: nn.Module, batches: Iterable[Sequence[Any]], num_classes: int,
               layers: Sequence[str] | None = None, progress: bool = True, *,
               dtype: torch.dtype = torch.float32, chunk_bytes: int = CHUNK_BYTES,
               dense: bool = False, forward_batch: int | None = None
               ) -> tuple[dict[str, Contribution], list[int]]:
    """:func:`contributions` and the number of samples of each class that went into them."""
    layers = resolve_layers(gm, layers)
    return _accumulate(gm, batches, num_classes, layers, partial(_cheap_layer, dense=dense),
                       dtype, chunk_bytes, progress, forward_batch)


def naive_contributions(gm: nn.Module, batches: Iterable[Sequence[Any]], num_classes: int,
                        layers: Sequence[str] | None = None, progress: bool = True, *,
                        dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Same result as ``class_contributions(..., dense=True)`` by the reference's formula (``unfold``
    and the ``B×O×I×H×W`` product per layer and batch; dense tensors for every layer). For tests
    and benchmarks only."""
    layers = resolve_layers(gm, layers)
    result, _ = _accumulate(gm, batches, num_classes, layers, _NaiveLayer, dtype, 0, progress)
    return result


class Contributions(Analysis):
    """``A^c[o, i]`` of every weighted layer (module docstring), keyed by layer name.

    Usually seeded from a profile (``am.provide(Contributions, profile.contributions)``): the
    contributions do not depend on thresholds, so one profile serves every locate. Given
    ``batches`` (``(x, y, ...)``) and ``num_classes`` it computes them on first use instead.
    """

    name = "contributions"

    def __init__(self, batches: Iterable[Sequence[Any]] | None = None,
                 num_classes: int | None = None) -> None:
        self.batches = batches
        self.num_classes = num_classes

    def compute(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> dict[str, Contribution]:
        if self.batches is None or self.num_classes is None:
            raise PreconditionError(
                "no contributions for this graph: profile the model (mdafx.api.analyse) and "
                "seed them with am.provide(Contributions, profile.contributions)")
        return class_contributions(gm, self.batches, self.num_classes, progress=False)
