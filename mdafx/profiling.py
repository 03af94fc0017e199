"""Profiling (MDA §1.1–1.2): choose the confident samples and store their contributions.

``profile(gm, dataset)`` selects, per class, the samples with the highest true-label probability
(§1.1) and accumulates their per-class contributions (§1.2, ``mdafx.passes.contributions``) into
a :class:`Profile`, which records what is needed to trust it later: the class names, the sample
counts and indices, a fingerprint of every weighted layer, and where the samples came from.

A profile file is a safetensors file: every contribution tensor under ``<layer>`` (dense) or
``<layer>.pos|neg|weight`` (factored single-tap layers), and the rest as JSON in the header's
``__metadata__["profile"]``. Loading reads no pickle, validates every field (shapes against the
recorded weight shapes, every layer present, values finite, ``A >= 0``) and refuses files of the
previous (torch.save) format with a message that says how to re-make them.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from .distributed import DistributedError, Ranks, autocast, current, merge_ranked, on_device
from .errors import DataError, FormatError, PreconditionError, ProfileMismatchError
from .fileio import atomic_output
from .ir import eval_mode, module_device
from .progress import track
from .passes.contributions import (CHUNK_BYTES, Contribution, FactoredContribution, accumulate,
                                   graph_layers, resolve_layer, resolve_layers)
from .rules import WeightedLayer

__all__ = ["DEFAULT_SAMPLE_FRACTION", "ConfidentSamples", "Profile", "analyse", "build_profile",
           "calibration_split", "default_per_class", "merge_confident_samples",
           "model_fingerprint", "profile", "select_confident_samples"]

DEFAULT_SAMPLE_FRACTION: float = 0.01
"""MDA §1.1: keep 1% of each class's training samples (at least one)."""

PROFILE_FORMAT = "mdafx-profile"
PROFILE_VERSION = 3
_HEADER_LIMIT = 100 * 2**20


# --------------------------------------------------------------------------------------------
# sample selection (MDA §1.1)


def default_per_class(n_train_of_class: int, fraction: float = DEFAULT_SAMPLE_FRACTION) -> int:
    """``max(1, round(fraction · n))`` with halves rounded up (exact decimal arithmetic)."""
    if n_train_of_class < 0:
        raise PreconditionError(f"class size must be >= 0, got {n_train_of_class}")
    scaled = Fraction(str(fraction)) * n_train_of_class
    return max(1, math.floor(scaled + Fraction(1, 2)))


@dataclass
class ConfidentSamples:
    """Per class, dataset indices ranked by the true-label probability (highest first).

    ``indices[c][r]`` has log-probability ``log_probs[c][r]`` of its true label ``c``.
    """

    indices: dict[int, list[int]]
    log_probs: dict[int, list[float]]

    def all_indices(self) -> list[int]:
        """Every selected index, sorted."""
        return sorted(i for idx in self.indices.values() for i in idx)


def _quota(per_class: int | Sequence[int] | Mapping[int, int], num_classes: int
           ) -> dict[int, int]:
    if isinstance(per_class, int):
        quota = {c: per_class for c in range(num_classes)}
    elif isinstance(per_class, Mapping):
        quota = {c: int(per_class.get(c, 0)) for c in range(num_classes)}
    else:
        if len(per_class) != num_classes:
            raise PreconditionError(f"per_class has {len(per_class)} entries, expected "
                                    f"{num_classes}")
        quota = {c: int(k) for c, k in enumerate(per_class)}
    if any(k < 0 for k in quota.values()):
        raise PreconditionError("per_class counts must be >= 0")
    return quota


def _labels(y: Any, num_classes: int, device: torch.device) -> Tensor:
    labels = torch.as_tensor(y, device=device).long().reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), got "
                        f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def select_confident_samples(model: nn.Module, batches: Iterable[Sequence[Any]],
                             num_classes: int, per_class: int | Sequence[int] | Mapping[int, int],
                             progress: bool = True, *, total: int | None = None,
                             use_autocast: bool = False) -> ConfidentSamples:
    """MDA §1.1: per class ``c``, the ``per_class`` samples with the highest softmax
    probability of their true label ``c`` (correct prediction not required).

    ``batches`` yields ``(x, y, idx)`` with ``idx`` the dataset indices; the model runs where
    it is (``x`` is moved to its device), under ``torch.autocast`` with ``use_autocast``.
    Scores are the true-label log-softmax in float64 (same order as the probability, but it
    still separates samples whose float32 probability saturates at 1). Streaming: a running
    top-k heap per class. Ties go to the smaller dataset index. ``per_class`` is one count for
    every class, or one per class (sequence or mapping; missing mapping keys mean 0).
    ``total`` (batches) gives the progress report its ETA.
    """
    quota = _quota(per_class, num_classes)
    device = module_device(model)
    # min-heaps of (score, -index): the root is the worst kept sample (lowest score, then the
    # largest index), so a candidate replaces it iff it ranks strictly better
    heaps: dict[int, list[tuple[float, int]]] = {c: [] for c in range(num_classes)}
    with eval_mode(model), torch.no_grad():
        for batch in track(batches, "select samples", total=total, enabled=progress):
            x, y, idx = batch[0], batch[1], batch[2]
            labels = _labels(y, num_classes, device)
            with autocast(device, use_autocast):
                logits = model(x.to(device, non_blocking=True))
            if not isinstance(logits, Tensor) or logits.shape != (labels.shape[0], num_classes):
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
                raise PreconditionError(f"model must return logits [B, {num_classes}], got "
                                        f"{got}")
            scores = logits.double().log_softmax(-1).gather(1, labels[:, None])[:, 0]
            if not bool(torch.isfinite(scores).all()):
                raise DataError("the model gives non-finite logits on the profiling images")
            for label, score, index in zip(labels.tolist(), scores.tolist(),
                                           torch.as_tensor(idx).reshape(-1).tolist()):
                heap, item = heaps[label], (score, -int(index))
                if len(heap) < quota[label]:
                    heapq.heappush(heap, item)
                elif heap and item > heap[0]:
                    heapq.heapreplace(heap, item)
    indices, log_probs = {}, {}
    for c, heap in heaps.items():
        ranked = sorted(heap, reverse=True)
        indices[c] = [-neg for _, neg in ranked]
        log_probs[c] = [score for score, _ in ranked]
    return ConfidentSamples(indices, log_probs)


def merge_confident_samples(parts: Sequence[ConfidentSamples],
                            per_class: int | Sequence[int] | Mapping[int, int],
                            num_classes: int) -> ConfidentSamples:
    """The selection of the union of disjoint shards from each shard's own selection: per
    class the best ``per_class`` by score, ties to the smaller index; exactly what one
    :func:`select_confident_samples` over all of them returns."""
    quota = _quota(per_class, num_classes)
    merged = merge_ranked([{c: list(zip(p.log_probs[c], p.indices[c])) for c in p.indices}
                           for p in parts], quota)
    return ConfidentSamples({c: [i for _, i in v] for c, v in merged.items()},
                            {c: [s for s, _ in v] for c, v in merged.items()})


# --------------------------------------------------------------------------------------------
# fingerprints


def _layer_digest(name: str, layer: WeightedLayer) -> str:
    """sha256 of a weighted layer: name, type (the module's class, or ``F.<function>`` for a
    functional layer), conv configuration, weight and bias (dtype, shape, bytes). A module
    layer digests exactly as it did before functional layers existed."""
    mod = layer.module if layer.module is not None else layer
    h = hashlib.sha256()
    h.update(f"{name}|{layer.type_name if layer.module is not None else 'F.' + layer.type_name}"
             .encode())
    if layer.kind == "conv":
        h.update(repr((mod.stride, mod.padding, mod.dilation, mod.groups,
                       mod.padding_mode)).encode())
    for pname in ("weight", "bias"):
        t = getattr(mod, pname, None)
        if t is None:
            h.update(f"|{pname}:none".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"|{pname}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(gm: nn.Module, layers: Sequence[str] | None = None
                      ) -> tuple[str, dict[str, str]]:
    """sha256 over the weighted layers (name, type, conv config, weight/bias dtype, shape and
    bytes), in order. Returns the model digest and the per-layer digests."""
    layers = resolve_layers(gm, layers)
    found = graph_layers(gm) if isinstance(gm, fx.GraphModule) else {}
    per_layer = {name: _layer_digest(name, found.get(name) or resolve_layer(gm, name))
                 for name in layers}
    h = hashlib.sha256()
    for name, digest in per_layer.items():
        h.update(f"{name}={digest};".encode())
    return h.hexdigest(), per_layer


# --------------------------------------------------------------------------------------------
# the profile


@dataclass
class Profile:
    """Per-class contributions of a model (MDA §1.2), with what is needed to trust them later.

    ``contributions[layer]`` is ``A`` with shape ``[len(class_names), O, I/groups]``: a tensor
    or a ``FactoredContribution``; ``samples_per_class[c]`` samples of class ``c`` were summed
    into it, those at dataset indices ``selected[c]``. ``record`` holds where they came from
    (the model spec, the input format, the data folder, the held-out calibration split), as
    plain JSON.
    """

    layers: list[str]
    contributions: dict[str, Contribution]
    class_names: list[str]
    samples_per_class: list[int]
    weight_shapes: dict[str, list[int]]
    groups: dict[str, int]
    fingerprint: str
    layer_digests: dict[str, str] = field(default_factory=dict)
    selected: dict[int, list[int]] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    # -- file ------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        tensors = {}
        for name, a in self.contributions.items():
            if isinstance(a, FactoredContribution):
                d = a.to_dict()
                for part in ("pos", "neg", "weight"):
                    tensors[f"{name}.{part}"] = d[part].contiguous()
            else:
                tensors[name] = a.detach().cpu().contiguous()
        return tensors

    def _header(self) -> dict[str, Any]:
        kinds = {name: ({"kind": "factored", "groups": a.groups,
                         "dtype": str(a.dtype).removeprefix("torch.")}
                        if isinstance(a, FactoredContribution) else {"kind": "dense"})
                 for name, a in self.contributions.items()}
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "layers": self.layers,
                "kinds": kinds, "class_names": self.class_names,
                "samples_per_class": [int(n) for n in self.samples_per_class],
                "weight_shapes": {k: [int(d) for d in v] for k, v in self.weight_shapes.items()},
                "groups": {k: int(v) for k, v in self.groups.items()},
                "fingerprint": self.fingerprint, "layer_digests": self.layer_digests,
                "selected": {str(c): [int(i) for i in v] for c, v in self.selected.items()},
                "record": self.record}

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the profile file atomically (module docstring)."""
        from safetensors.torch import save_file

        header = json.dumps(self._header(), allow_nan=False)
        with atomic_output(path, overwrite=overwrite) as tmp:
            save_file(self._tensors(), str(tmp), metadata={"format": PROFILE_FORMAT,
                                                           "profile": header})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read and validate a profile file; every problem is a FormatError naming ``path``."""
        path = Path(path)
        header, tensors = _read_safetensors(path)
        try:
            prof = cls._from_parts(header, tensors)
            prof.validate()
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"{path}: malformed profile ({type(e).__name__}: {e})") from e
        except PreconditionError as e:
            raise FormatError(f"{path}: {e}") from e
        return prof

    @classmethod
    def _from_parts(cls, h: dict[str, Any], tensors: dict[str, Tensor]) -> Profile:
        if h.get("format") != PROFILE_FORMAT:
            raise FormatError(f"not an mdafx profile (format {h.get('format')!r})")
        if h.get("version") != PROFILE_VERSION:
            raise FormatError(f"profile version {h.get('version')!r}; this mdafx reads version "
                              f"{PROFILE_VERSION}: run `mdafx analyse` again")
        layers = [str(n) for n in h["layers"]]
        contributions: dict[str, Contribution] = {}
        for name in layers:
            kind = h["kinds"][name]
            if kind["kind"] == "factored":
                dtype = getattr(torch, str(kind["dtype"]), None)
                if dtype not in (torch.float32, torch.float64):
                    raise FormatError(f"layer {name!r}: unsupported dtype {kind['dtype']!r}")
                contributions[name] = FactoredContribution(
                    tensors.pop(f"{name}.pos"), tensors.pop(f"{name}.neg"),
                    tensors.pop(f"{name}.weight"), int(kind["groups"]), dtype)
            elif kind["kind"] == "dense":
                contributions[name] = tensors.pop(name)
            else:
                raise FormatError(f"layer {name!r}: unknown kind {kind['kind']!r}")
        if tensors:
            raise FormatError(f"tensors {sorted(tensors)[:3]} belong to no profiled layer")
        return cls(layers=layers, contributions=contributions,
                   class_names=[str(c) for c in h["class_names"]],
                   samples_per_class=[int(n) for n in h["samples_per_class"]],
                   weight_shapes={str(k): [int(d) for d in v]
                                  for k, v in h["weight_shapes"].items()},
                   groups={str(k): int(v) for k, v in h["groups"].items()},
                   fingerprint=str(h["fingerprint"]),
                   layer_digests={str(k): str(v) for k, v in h["layer_digests"].items()},
                   selected={int(c): [int(i) for i in v] for c, v in h["selected"].items()},
                   record=dict(h["record"]))

    def validate(self) -> None:
        """Check the profile is internally consistent: raises PreconditionError naming the
        first layer or field that is not."""
        k = len(self.class_names)
        if k < 1 or len(set(self.class_names)) != k:
            raise PreconditionError(f"class names must be distinct and non-empty, got "
                                    f"{self.class_names}")
        if len(self.samples_per_class) != k or any(n < 0 for n in self.samples_per_class):
            raise PreconditionError(f"samples_per_class {self.samples_per_class} does not fit "
                                    f"{k} classes")
        if len(set(self.layers)) != len(self.layers):
            raise PreconditionError("a layer is listed twice")
        for what, table in (("contributions", self.contributions),
                            ("weight shapes", self.weight_shapes), ("groups", self.groups),
                            ("layer digests", self.layer_digests or dict.fromkeys(self.layers))):
            if set(table) != set(self.layers):
                odd = sorted(set(self.layers) ^ set(table))
                raise PreconditionError(f"the {what} do not cover the layers exactly: {odd[:3]}")
        if any(not isinstance(g, int) or g < 1 for g in self.groups.values()):
            raise PreconditionError("groups must be positive integers")
        if any(not 0 <= int(c) < k for c in self.selected):
            raise PreconditionError("selected samples name a class the profile does not have")
        for name in self.layers:
            a, shape = self.contributions[name], self.weight_shapes.get(name)
            if shape is None or len(shape) < 2:
                raise PreconditionError(f"layer {name!r}: no recorded weight shape")
            want = (k, shape[0], shape[1])
            if tuple(a.shape) != want:
                raise PreconditionError(f"layer {name!r}: contributions of shape "
                                        f"{tuple(a.shape)}, expected {want}")
            parts = ((a.pos, a.neg, a.weight) if isinstance(a, FactoredContribution) else (a,))
            for t in parts:
                if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise PreconditionError(f"layer {name!r}: contributions are not finite "
                                            "floating-point numbers")
            if isinstance(a, FactoredContribution):
                if bool((a.pos < 0).any()) or bool((a.neg > 0).any()):
                    raise PreconditionError(f"layer {name!r}: factored sums have the wrong sign")
            elif bool((a < 0).any()):
                raise PreconditionError(f"layer {name!r}: negative contributions (A is a sum "
                                        "of ReLUs)")

    # -- use ---------------------------------------------------------------------------------------

    def check_matches(self, gm: nn.Module) -> None:
        """Raise :class:`ProfileMismatchError` naming the first layer where ``gm`` differs."""
        layers = resolve_layers(gm, None if isinstance(gm, fx.GraphModule) else self.layers)
        found = graph_layers(gm) if isinstance(gm, fx.GraphModule) else {}
        for pos, name in enumerate(self.layers):
            if pos >= len(layers) or layers[pos] != name:
                other = layers[pos] if pos < len(layers) else "nothing"
                raise ProfileMismatchError(
                    f"profile layer #{pos} is {name!r} but the model has {other!r} there")
            try:
                mod = found.get(name) or resolve_layer(gm, name)
            except PreconditionError:
                raise ProfileMismatchError(f"profile layer {name!r} is not in the model") from None
            shape = list(mod.weight.shape)
            if shape != self.weight_shapes[name]:
                raise ProfileMismatchError(f"layer {name!r}: weight shape {shape} != profile's "
                                           f"{self.weight_shapes[name]}")
            digest = _layer_digest(name, mod)
            if self.layer_digests and digest != self.layer_digests[name]:
                raise ProfileMismatchError(f"layer {name!r}: weights or configuration differ "
                                           "from the model the profile was computed on")
        if len(layers) > len(self.layers):
            raise ProfileMismatchError(
                f"model layer {layers[len(self.layers)]!r} is not in the profile")
        fingerprint, _ = model_fingerprint(gm, layers)
        if fingerprint != self.fingerprint:
            raise ProfileMismatchError("model fingerprint differs from the profile's")


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The profile header and tensors of ``path``, checked before anything large is read."""
    from safetensors.torch import load_file

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == b"PK\x03\x04":
                raise FormatError(f"{path}: a profile of the previous format (torch.save), which "
                                  "this mdafx no longer reads; run `mdafx analyse` again")
            if len(head) < 8:
                raise FormatError(f"{path}: not an mdafx profile (truncated)")
            n = int.from_bytes(head, "little")
            if n > min(_HEADER_LIMIT, size - 8):
                raise FormatError(f"{path}: not an mdafx profile (bad header length)")
            raw = json.loads(f.read(n).decode("utf-8"))
        meta = raw.get("__metadata__") or {}
        if meta.get("format") != PROFILE_FORMAT or "profile" not in meta:
            raise FormatError(f"{path}: not an mdafx profile")
        header = json.loads(meta["profile"])
        tensors = load_file(str(path))
    except FormatError:
        raise
    except OSError as e:
        raise FormatError(f"{path}: cannot read the profile: {e.strerror or e}") from e
    except Exception as e:  # safetensors' and json's own errors: a corrupt file
        raise FormatError(f"{path}: corrupt or truncated profile ({type(e).__name__}: "
                          f"{str(e)[:200]})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: malformed profile header")
    return header, tensors


# --------------------------------------------------------------------------------------------
# building a profile


def build_profile(gm: nn.Module, batches: Iterable[Sequence[Any]], num_classes: int,
                  class_names: Sequence[str] | None = None,
                  layers: Sequence[str] | None = None, progress: bool = True, *,
                  dtype: torch.dtype = torch.float32, chunk_bytes: int = CHUNK_BYTES,
                  dense: bool = False, forward_batch: int | None = None,
                  total: int | None = None, ranks: Ranks | None = None) -> Profile:
    """The contributions of ``batches`` (factored single-tap layers unless ``dense=True``) plus
    the sample counts and the model fingerprint, computed where the model is.

    With ``ranks`` of several processes (:mod:`mdafx.distributed`), ``batches`` is this rank's
    shard and the per-rank sums are added with all_reduce: the float64 class sums of
    single-tap layers in float64 (as one process keeps them), the float32 ``A`` of ``K > 1``
    layers widened to float64, summed, and rounded once. Every rank returns the whole
    profile. ``total`` (batches) gives the progress report its ETA.
    """
    ranks = ranks or current()
    layers = resolve_layers(gm, layers)
    names = [str(c) for c in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise PreconditionError(f"{len(names)} class names for {num_classes} classes")
    reduce = ranks.world > 1
    result, counts = ranks.step(
        "contributions", accumulate, gm,
        track(batches, "contributions", total=total, enabled=progress), num_classes, layers,
        False, dtype=dtype, chunk_bytes=chunk_bytes, dense=dense and not reduce,
        forward_batch=forward_batch)
    if reduce:
        result, counts = _sum_over_ranks(result, counts, ranks, dense)
    fingerprint, digests = model_fingerprint(gm, layers)
    found = graph_layers(gm) if isinstance(gm, fx.GraphModule) else {}
    mods = {name: found.get(name) or resolve_layer(gm, name) for name in layers}
    return Profile(
        layers=list(layers), contributions=result, class_names=names, samples_per_class=counts,
        weight_shapes={n: list(m.weight.shape) for n, m in mods.items()},
        groups={n: m.groups for n, m in mods.items()},
        fingerprint=fingerprint, layer_digests=digests)


def _sum_over_ranks(result: dict[str, Contribution], counts: list[int], ranks: Ranks,
                    dense: bool) -> tuple[dict[str, Contribution], list[int]]:
    """Every rank's contributions and counts summed (build_profile's docstring)."""
    out: dict[str, Contribution] = {}
    for name, a in result.items():
        if isinstance(a, FactoredContribution):
            a = FactoredContribution(ranks.sum(a.pos), ranks.sum(a.neg), a.weight, a.groups,
                                     a.dtype)
            out[name] = a.dense() if dense else a
        else:
            out[name] = ranks.sum(a.contiguous())
    return out, ranks.sum(torch.as_tensor(counts, dtype=torch.int64)).tolist()


def _batch_count(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def profile(gm: fx.GraphModule, dataset, class_names: Sequence[str] | None = None, *,
            per_class: int | None = None, indices: Sequence[int] | None = None,
            batch_size: int = 128, progress: bool = True, device: str | torch.device | None = None,
            use_autocast: bool = False, ranks: Ranks | None = None) -> Profile:
    """Select the most confident samples per class (MDA §1.1) from ``dataset`` (restricted to
    ``indices``) and accumulate per-class contributions over them (§1.2), streamed.

    ``device`` (default: where ``gm`` is) runs both passes there; ``gm`` is moved back after.
    Contributions need float64 accumulators, which MPS lacks: with ``mps`` only the selection
    runs there (the contributions read 1% of the images). ``use_autocast`` runs the
    selection's forward passes under ``torch.autocast`` (never the contributions').

    Data parallel (``ranks`` of several processes; default: the initialised
    ``torch.distributed`` group, if any): each rank selects from its shard of the pool
    (:meth:`~mdafx.distributed.Ranks.shard`), the per-class candidates are merged exactly
    (the same samples as one process, ties to the smaller index), each rank accumulates the
    contributions of its shard of the selected samples and they are summed
    (:func:`build_profile`). Every rank returns the same profile.
    """
    from .data import batches, labels_at

    ranks = ranks or current()
    labels = labels_at(dataset)
    pool = torch.arange(len(labels)) if indices is None else torch.as_tensor(
        [int(i) for i in indices], dtype=torch.long)
    num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    counts = torch.bincount(labels[pool], minlength=num_classes)
    empty = [c for c in range(num_classes) if counts[c] == 0]
    if empty:
        names = [class_names[c] if class_names else str(c) for c in empty]
        raise DataError(f"no samples of class(es) {names} to profile")
    quota = ([per_class] * num_classes if per_class is not None
             else [default_per_class(int(n)) for n in counts])
    if ranks.world > 1:
        _check_same_data(ranks, dataset, labels, pool)
    with on_device(gm, device) as dev:
        pin = dev.type == "cuda"
        mine = ranks.shard(pool, batch_size)
        chosen = ranks.step(
            "sample selection", select_confident_samples, gm,
            batches(dataset, mine, batch_size, True, pin_memory=pin), num_classes, quota,
            progress=progress, total=_batch_count(len(mine), batch_size),
            use_autocast=use_autocast)
        if ranks.world > 1:
            chosen = merge_confident_samples(ranks.gather(chosen), quota, num_classes)
        picked = ranks.shard(chosen.all_indices(), batch_size)
        with on_device(gm, "cpu" if dev.type == "mps" else None):
            prof = build_profile(gm, batches(dataset, picked, batch_size, pin_memory=pin),
                                 num_classes, class_names=class_names, progress=progress,
                                 total=_batch_count(len(picked), batch_size), ranks=ranks)
    prof.selected = {c: list(v) for c, v in chosen.indices.items()}
    return prof


def _check_same_data(ranks: Ranks, dataset, labels: torch.Tensor, pool: torch.Tensor) -> None:
    """Every rank indexes the same samples: ranks shard by position, so a rank whose folder
    lists other files (a copy that differs on another machine) would silently profile other
    images. Compared: the labels, the pool and, for a streamed folder, the relative file paths
    (not sizes or times, which differ between faithful copies)."""
    h = hashlib.sha256(labels.numpy().tobytes())
    h.update(pool.numpy().tobytes())
    for name in getattr(dataset, "files", ()):
        h.update(bytes(name) + b"\0")
    digests = ranks.gather((len(labels), h.hexdigest()))
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise DistributedError(
            f"the ranks do not see the same data: rank(s) {differ} list other samples than "
            f"rank 0 ({digests[0][0]} samples there, "
            f"{', '.join(str(digests[r][0]) for r in differ)} on them); every rank must read "
            "an identical copy of the folder")


# --------------------------------------------------------------------------------------------
# the analyse command: a model and an image folder -> a profile with its calibration split


def _images_digest(dataset, indices: Sequence[int]) -> tuple[str, str] | None:
    """``(kind, SHA-256)`` of the images at ``indices`` (in that order): of the raw pixels
    (``"pixels"``) for a dataset that holds them, else of the files' paths, sizes and
    modification times (``"files"``) for a streamed folder; None for other datasets."""
    images = getattr(dataset, "images", None)
    if images is not None:
        chosen = images[torch.as_tensor(list(indices), dtype=torch.long)]
        return "pixels", hashlib.sha256(chosen.contiguous().numpy().tobytes()).hexdigest()
    if hasattr(dataset, "files_digest"):
        return "files", dataset.files_digest(indices)
    return None


def _preprocess_record(transform) -> dict[str, Any] | None:
    from .data import Preprocess

    if transform is None or (isinstance(transform, Preprocess) and transform.identity):
        return None
    if isinstance(transform, Preprocess):
        return transform.to_dict()
    return {"custom": repr(transform)[:200]}


def analyse(model: nn.Module, data, input_format=None, *, per_class: int | None = None,
            holdout: float = 0.1, seed: int = 0, batch_size: int = 128,
            source: dict[str, Any] | None = None, progress: bool = False,
            transform=None, workers: int | None = None, device: str | torch.device | None = None,
            use_autocast: bool = False, ranks: Ranks | None = None) -> Profile:
    """Profile ``model`` on ``data`` (an ImageFolder path, or a map-style dataset with
    ``class_names`` or ``classes``), holding out ``holdout`` of every class as the
    *calibration split* that threshold search, norm re-estimation and fine-tuning use later
    (recorded in the profile: indices and a digest of those images). ``source`` is what the
    profile records about the model (its spec, for provenance: nothing in it is ever run).

    A folder is opened with :func:`mdafx.data.open_images` (``transform``: a
    :class:`~mdafx.data.Preprocess` or any callable, ``workers`` DataLoader processes); the
    preprocessing is recorded so that the calibration split is read back the same way.
    A dataset that :func:`~mdafx.data.open_images` opened records its folder too.
    ``device``, ``use_autocast`` and ``ranks`` as in :func:`profile`.
    """
    from .data import InputFormat, class_names_of, labels_at, open_images, split_per_class
    from .ir import trace

    if not 0.0 <= holdout < 1.0:
        raise PreconditionError(f"holdout must lie in [0, 1), got {holdout}")
    fmt = input_format or InputFormat((32, 32))
    is_path = isinstance(data, (str, os.PathLike))
    dataset = open_images(data, fmt, transform=transform, workers=workers) if is_path else data
    names = class_names_of(dataset)
    if not names:
        raise DataError("the profiling data must name its classes (an ImageFolder)")
    gm = model if isinstance(model, fx.GraphModule) else trace(model, fmt.example())
    labels = labels_at(dataset)
    selection, held_out = None, None
    if holdout > 0:
        selection, held_out = split_per_class(labels.numpy(), [1.0 - holdout, holdout],
                                              seed=seed)
        missing = [names[c] for c in range(len(names)) if not (labels[selection] == c).any()]
        if missing:
            raise DataError(f"holdout {holdout} leaves no profiling image of class(es) "
                            f"{', '.join(missing)}; lower --holdout")
    prof = profile(gm, dataset, names, per_class=per_class,
                   indices=None if selection is None else selection.tolist(),
                   batch_size=batch_size, progress=progress, device=device,
                   use_autocast=use_autocast, ranks=ranks)
    from .data import ArrayDataset, ImageFolderStream

    root = (Path(data).resolve() if is_path else getattr(dataset, "root", None)
            if isinstance(dataset, (ArrayDataset, ImageFolderStream)) else None)
    record: dict[str, Any] = {"source": dict(source or {}), "input": fmt.to_dict(),
                              "data": str(root) if root is not None else None}
    preprocess = _preprocess_record(transform if is_path else getattr(dataset, "transform",
                                                                      None))
    if preprocess is not None:
        record["preprocess"] = preprocess
    if held_out is not None:
        # the indices themselves, not only (holdout, seed): they are checked against the
        # folder when it is read again, and stay valid if split_per_class ever changes
        digest = _images_digest(dataset, held_out.tolist())
        record["calibration"] = {"holdout": holdout, "seed": seed, "images": int(len(labels)),
                                 "indices": held_out.tolist(),
                                 "sha256": digest[1] if digest else None}
        if digest and digest[0] != "pixels":
            record["calibration"]["digest"] = digest[0]
    prof.record = json.loads(json.dumps(record))
    return prof


def calibration_split(prof: Profile, data=None, input_format=None, *, transform=None,
                      workers: int | None = None) -> tuple[Any, list[int], str]:
    """``(dataset, indices, description)`` of the calibration images, labelled with the
    profile's class indices: ``data`` (a folder or dataset disjoint from the profiled images)
    when given, else the split ``analyse`` held out, checked unchanged. A folder is read with
    ``transform`` (default: the preprocessing the profile recorded)."""
    from .data import InputFormat, Preprocess, class_names_of, open_images

    fmt = input_format or InputFormat.from_dict(prof.record.get("input") or
                                                {"size": [32, 32], "channels": 3,
                                                 "mean": [0.0] * 3, "std": [1.0] * 3})
    recorded = prof.record.get("preprocess")
    if transform is None and recorded is not None:
        if "custom" in recorded:
            raise DataError(f"the profile was computed with a custom transform "
                            f"({recorded['custom']}); pass it again (transform=...)")
        transform = Preprocess.from_dict(recorded)
    if data is not None:
        is_path = isinstance(data, (str, os.PathLike))
        dataset = open_images(data, fmt, transform=transform, workers=workers) if is_path \
            else data
        folder = class_names_of(dataset) or []
        unknown = [n for n in folder if n not in prof.class_names]
        if unknown:
            raise DataError(f"{data}: class folders {', '.join(unknown)} are not classes of the "
                            f"profile ({', '.join(prof.class_names)})")
        if hasattr(dataset, "labels") and folder != list(prof.class_names):
            import numpy as np

            remap = np.asarray([prof.class_names.index(n) for n in folder], dtype=np.int64)
            dataset.labels = torch.from_numpy(remap[np.asarray(dataset.labels)])
            dataset.class_names = list(prof.class_names)
        return dataset, list(range(len(dataset))), f"{data} ({len(dataset)} images)"
    held = prof.record.get("calibration")
    if not held:
        raise PreconditionError("the profile holds no calibration split (analysed with holdout "
                                "0); give calibration images (--calibrate DIR) that the profile "
                                "did not select from")
    folder = prof.record.get("data")
    if not folder or not Path(folder).is_dir():
        raise DataError(f"the profile's calibration split was held out of {folder}, which is "
                        "not a directory any more; give calibration images (--calibrate DIR)")
    dataset = open_images(folder, fmt, transform=transform, workers=workers)
    indices = [int(i) for i in held["indices"]]
    digest = None
    if len(dataset) == held["images"] and list(dataset.class_names) == list(prof.class_names):
        digest = _images_digest(dataset, indices)
    if digest is None or digest[0] != held.get("digest", "pixels") or digest[1] != held["sha256"]:
        raise DataError(f"{folder} changed since the profile was computed (its held-out "
                        "calibration images differ); analyse again or give --calibrate DIR")
    return (dataset, indices, f"{len(indices)} images held out of {folder} "
                              f"(analyse --holdout {held['holdout']})")
