"""What an mdafx model file may hold, as data keyed on the op (read by ``mdafx.modelfile``).

* ``LAYERS``: each storable ``torch.nn`` layer type and the constructor arguments that rebuild it
  from an instance. Lookup is by exact type: a subclass may override ``forward``, so it is not
  storable unless listed itself. ``LAYERS_BY_NAME`` is the same table keyed on the class name
  that a file stores (``"Conv2d"``).
* ``ARG_KINDS``: the JSON kind each constructor argument must have (checked on save and load).
* ``FUNCTIONS``: canonical ``"module.qualname"`` -> function, for ``call_function`` targets;
  ``FUNCTION_NAMES`` is its reverse. Each function object has exactly one name: aliases
  (``F.relu_ is torch.relu_``, ``F.conv2d is torch.conv2d``) are refused when the table is built.
* ``METHODS``: the tensor method names a ``call_method`` node may call.
* ``GETATTR_ATTRIBUTES``: the only attributes ``builtins.getattr`` may read.
* ``VIEW_FUNCTIONS`` / ``VIEW_METHODS``: ops whose result may share memory with their input,
  so an in-place op on it would write into a parameter or buffer; ``INPLACE_FUNCTIONS``: the
  functions that always write in place (others do so when called with ``inplace=True``).

These tables are the whole vocabulary of a model file: loading never resolves a name anywhere
else, so a name that is not here cannot be imported or called.
"""
from __future__ import annotations

import builtins
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

__all__ = [
    "LayerSpec", "LAYERS", "LAYERS_BY_NAME", "ARG_KINDS", "FUNCTIONS", "FUNCTION_NAMES",
    "METHODS", "GETATTR_ATTRIBUTES", "VIEW_FUNCTIONS", "VIEW_METHODS", "INPLACE_FUNCTIONS",
    "WORD_RE",
]

# Strings in a file are enum-like words only ("bilinear", "nearest-exact", "same", "row"):
# nothing in the tables takes a path or code, and a word cannot become either.
WORD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,31}$")


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSpec:
    """How to store one layer type: ``type(**read_args(instance))`` rebuilds an equal layer."""

    type: type[nn.Module]
    args: tuple[str, ...]
    # Arguments that are not plain attributes of an instance (``bias`` = has a bias tensor).
    derived: Callable[[nn.Module], dict[str, Any]] | None = None

    @property
    def name(self) -> str:
        return self.type.__name__

    def read_args(self, layer: nn.Module) -> dict[str, Any]:
        derived = self.derived(layer) if self.derived is not None else {}
        return {arg: derived[arg] if arg in derived else getattr(layer, arg) for arg in self.args}


LAYERS: dict[type[nn.Module], LayerSpec] = {}
LAYERS_BY_NAME: dict[str, LayerSpec] = {}


def _layers(types: tuple[type[nn.Module], ...], args: str = "",
            derived: Callable[[nn.Module], dict[str, Any]] | None = None) -> None:
    for cls in types:
        spec = LayerSpec(cls, tuple(args.split()), derived)
        if cls in LAYERS or spec.name in LAYERS_BY_NAME:
            raise ValueError(f"layer type {spec.name} is registered twice")
        LAYERS[cls] = spec
        LAYERS_BY_NAME[spec.name] = spec


def _has_bias(layer: nn.Module) -> dict[str, Any]:
    return {"bias": layer.bias is not None}


def _attention_flags(layer: nn.MultiheadAttention) -> dict[str, Any]:
    return {"bias": layer.in_proj_bias is not None, "add_bias_kv": layer.bias_k is not None}


_CONV = "in_channels out_channels kernel_size stride padding dilation groups bias padding_mode"
_layers((nn.Conv1d, nn.Conv2d), _CONV, _has_bias)
_layers((nn.ConvTranspose2d,), _CONV + " output_padding", _has_bias)
_layers((nn.Linear,), "in_features out_features bias", _has_bias)
_layers((nn.BatchNorm1d, nn.BatchNorm2d), "num_features eps momentum affine track_running_stats")
_layers((nn.LayerNorm,), "normalized_shape eps elementwise_affine bias", _has_bias)
_layers((nn.GroupNorm,), "num_groups num_channels eps affine")
_layers((nn.LocalResponseNorm,), "size alpha beta k")
_layers((nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.SELU), "inplace")
_layers((nn.Sigmoid, nn.Tanh, nn.Identity))
_layers((nn.GELU,), "approximate")
_layers((nn.ELU, nn.CELU), "alpha inplace")
_layers((nn.LeakyReLU,), "negative_slope inplace")
_layers((nn.Hardtanh,), "min_val max_val inplace")
_layers((nn.Softplus,), "beta threshold")
_layers((nn.Softmax, nn.LogSoftmax), "dim")
_layers((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
         nn.FeatureAlphaDropout), "p inplace")
_layers((nn.MaxPool1d, nn.MaxPool2d),
        "kernel_size stride padding dilation return_indices ceil_mode")
_layers((nn.AvgPool1d,), "kernel_size stride padding ceil_mode count_include_pad")
_layers((nn.AvgPool2d,), "kernel_size stride padding ceil_mode count_include_pad divisor_override")
_layers((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), "output_size")
_layers((nn.AdaptiveMaxPool2d,), "output_size return_indices")
_layers((nn.Upsample,), "size scale_factor mode align_corners recompute_scale_factor")
_layers((nn.Flatten,), "start_dim end_dim")
_layers((nn.Unflatten,), "dim unflattened_size")
_layers((nn.ZeroPad1d, nn.ZeroPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
         nn.ReplicationPad2d, nn.CircularPad2d), "padding")
_layers((nn.ConstantPad1d, nn.ConstantPad2d), "padding value")
_layers((nn.PReLU,), "num_parameters init")
_layers((nn.RMSNorm,), "normalized_shape eps elementwise_affine")
_layers((nn.MultiheadAttention,), "embed_dim num_heads dropout bias add_bias_kv add_zero_attn "
        "kdim vdim batch_first", _attention_flags)


# --------------------------------------------------------------------------------------------
# Argument kinds: predicates on the JSON value (tuples arrive as lists)
# --------------------------------------------------------------------------------------------

_MAX_INT = 2**31  # sizes and dims; anything larger is a crafted file, not a layer


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -_MAX_INT < v < _MAX_INT


def _is_size(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and abs(v) < 1e300)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_word(v: Any) -> bool:
    return isinstance(v, str) and WORD_RE.match(v) is not None


def _list_of(item: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 8 and all(map(item, v))


def _either(*kinds: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: any(kind(v) for kind in kinds)


def _is_none(v: Any) -> bool:
    return v is None


_SIZES = _either(_is_size, _list_of(_is_size))
_OPT_SIZES = _either(_is_none, _is_size, _list_of(_either(_is_none, _is_size)))  # (None, 7)
_OPT_REAL = _either(_is_none, _is_real)
_OPT_BOOL = _either(_is_none, _is_bool)

ARG_KINDS: Mapping[str, Callable[[Any], bool]] = {
    **dict.fromkeys(("in_channels", "out_channels", "in_features", "out_features", "num_features",
                     "groups", "num_groups", "num_channels", "embed_dim", "num_heads", "kdim",
                     "vdim", "num_parameters"), _is_size),
    **dict.fromkeys(("kernel_size", "stride", "dilation", "output_padding", "normalized_shape",
                     "unflattened_size"), _SIZES),
    "padding": _either(_SIZES, _is_word),  # int, per-dim ints, or "same" / "valid"
    **dict.fromkeys(("output_size", "size"), _OPT_SIZES),
    **dict.fromkeys(("alpha", "beta", "k", "p", "negative_slope", "min_val", "max_val",
                     "threshold", "value", "dropout", "init"), _is_real),
    "eps": _OPT_REAL,  # RMSNorm's default None: the dtype's own epsilon
    "momentum": _OPT_REAL,
    "scale_factor": _either(_is_none, _is_real, _list_of(_is_real)),
    **dict.fromkeys(("padding_mode", "mode", "approximate"), _is_word),
    **dict.fromkeys(("bias", "affine", "track_running_stats", "elementwise_affine", "inplace",
                     "return_indices", "ceil_mode", "count_include_pad", "add_bias_kv",
                     "add_zero_attn", "batch_first"), _is_bool),
    **dict.fromkeys(("align_corners", "recompute_scale_factor"), _OPT_BOOL),
    **dict.fromkeys(("dim", "start_dim", "end_dim"), _either(_is_none, _is_int)),
    "divisor_override": _either(_is_none, _is_size),
}

_unkinded = {a for spec in LAYERS.values() for a in spec.args} - set(ARG_KINDS)
if _unkinded:  # every stored argument is checked; a new one needs its kind
    raise ValueError(f"layer arguments without a kind: {sorted(_unkinded)}")


# --------------------------------------------------------------------------------------------
# Functions (call_function targets) and methods (call_method targets)
# --------------------------------------------------------------------------------------------

def _named(prefix: str, owner: Any, names: str) -> list[tuple[str, Callable]]:
    return [(f"{prefix}.{name}", getattr(owner, name)) for name in names.split()]


def _one_name_each(entries: list[tuple[str, Callable]]) -> dict[str, Callable]:
    table: dict[str, Callable] = {}
    seen: dict[Callable, str] = {}
    for name, fn in entries:
        if fn in seen:  # an alias would give one function two names in files
            raise ValueError(f"{name} is {seen[fn]}: list the function once")
        seen[fn] = name
        table[name] = fn
    return table


FUNCTIONS: Mapping[str, Callable] = _one_name_each([
    *_named("operator", operator,
            "getitem add sub mul truediv floordiv mod neg iadd imul matmul abs pow gt lt ge le "
            "eq ne"),
    ("builtins.getattr", builtins.getattr),  # only with a GETATTR_ATTRIBUTES literal
    *_named("torch", torch,
            "flatten cat concat stack mul add sub div matmul reshape permute transpose swapaxes "
            "unsqueeze squeeze split chunk relu relu_ sigmoid tanh neg index_select mean sum "
            "amax clone softmax narrow max_pool2d exp abs sqrt rsqrt square erf clamp zeros_like "
            "ones_like prelu pow where maximum minimum bmm log_softmax unbind roll tile flip "
            "movedim amin max min repeat_interleave norm einsum addcmul"),
    # F.relu_ / F.conv2d / F.avg_pool1d / F.adaptive_avg_pool1d are the torch.* functions of the
    # same name (listed once, above or here).
    *_named("torch.nn.functional", F,
            "relu relu6 gelu silu hardswish hardsigmoid sigmoid tanh elu leaky_relu hardtanh "
            "mish dropout dropout1d dropout2d softmax log_softmax interpolate pad avg_pool1d "
            "avg_pool2d max_pool1d max_pool2d adaptive_avg_pool1d adaptive_avg_pool2d "
            "adaptive_max_pool2d linear conv2d batch_norm layer_norm group_norm "
            "local_response_norm conv1d softplus selu celu logsigmoid normalize "
            "scaled_dot_product_attention rms_norm adaptive_max_pool1d lp_pool2d"),
    ("torchvision.ops.stochastic_depth", torchvision.ops.stochastic_depth),
])
FUNCTION_NAMES: Mapping[Callable, str] = {fn: name for name, fn in FUNCTIONS.items()}

METHODS: frozenset[str] = frozenset("""
    view view_as reshape reshape_as flatten permute transpose swapaxes contiguous size dim numel
    unsqueeze squeeze expand expand_as repeat narrow chunk split index_select
    mean sum amax amin max min softmax log_softmax
    add sub mul div neg matmul relu sigmoid tanh clone detach float type_as
    add_ mul_ relu_ sigmoid_ tanh_
    to exp abs sqrt rsqrt square clamp clamp_min clamp_max half bfloat16 erf pow masked_fill bmm
    unbind roll tile flip movedim repeat_interleave norm addcmul
""".split())

GETATTR_ATTRIBUTES: frozenset[str] = frozenset({"shape", "dtype", "device", "ndim"})

# Results that may alias their first argument: in-place ops through them reach the source.
VIEW_FUNCTIONS: frozenset[Callable] = frozenset({
    operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose,
    torch.swapaxes, torch.unsqueeze, torch.squeeze, torch.split, torch.chunk, torch.narrow,
    torch.unbind, torch.movedim,
})
VIEW_METHODS: frozenset[str] = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose", "swapaxes",
    "contiguous", "unsqueeze", "squeeze", "expand", "expand_as", "narrow", "chunk", "split",
    "detach", "float", "type_as", "to", "half", "bfloat16", "unbind", "movedim",
})
# In-place call_function targets besides those called with ``inplace=True``.
INPLACE_FUNCTIONS: frozenset[Callable] = frozenset({operator.iadd, operator.imul, torch.relu_})
