"""Channel identities: the vocabulary every channel rule speaks.

Every tensor in a traced graph gets an *id tensor*: an int64 tensor with the tensor's number of
dimensions whose entry at a position names the channel that lives there. It is kept *compressed*:
a dimension along which all ids are equal has size 1 (so a conv activation ``[B, C, H, W]`` carries
ids of shape ``[1, C, 1, 1]``).

Two kinds of facts are recorded about ids:

* **Where a channel moves.** Data-movement ops (view, permute, cat, split, getitem, ...) are run on
  the id tensors themselves, so the position of every channel in every tensor is known exactly.
* **Which channels are coupled.** Ops that require two channels to be kept or dropped together
  (the operands of an ``add``, the in/out channels of a depthwise conv, ...) *union* their ids in a
  union-find forest. The representative of a set is its smallest id, and id ``FROZEN = 0`` is the
  set of channels that can never be dropped (model inputs, barriers): a channel is frozen iff its
  root is 0.

A *coupled group* is one union-find set; pruning keeps or drops whole groups.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

FROZEN = 0


class ChannelForest:
    """Union-find over channel ids, vectorised over tensors of ids.

    >>> f = ChannelForest()
    >>> a, b = f.fresh((1, 3)), f.fresh((1, 3))
    >>> f.union(a, b)
    >>> bool((f.find(a) == f.find(b)).all())
    True
    >>> f.freeze(a[:, :1]); f.find(b).tolist()
    [[0, 2, 3]]
    """

    def __init__(self) -> None:
        self.parent = torch.zeros(1, dtype=torch.int64)  # id 0 is FROZEN, its own root
        self.size = 1

    def fresh(self, shape: Iterable[int]) -> torch.Tensor:
        """New, mutually independent ids laid out in ``shape``."""
        shape = tuple(shape)
        n = 1
        for s in shape:
            n *= s
        if self.size + n > self.parent.numel():
            grown = torch.arange(max(2 * self.parent.numel(), self.size + n), dtype=torch.int64)
            grown[: self.size] = self.parent[: self.size]
            self.parent = grown
        ids = torch.arange(self.size, self.size + n, dtype=torch.int64)
        self.parent[self.size : self.size + n] = ids
        self.size += n
        return ids.reshape(shape)

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Roots of ``ids`` (same shape); compresses paths of the ids it visits."""
        parent = self.parent
        roots = parent[ids]
        while True:
            up = parent[roots]
            if torch.equal(up, roots):
                break
            roots = up
        parent[ids] = roots
        return roots

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Couple ``a`` and ``b`` position by position (broadcasting)."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not bool(differ.any()):
                return
            ra, rb = ra[differ], rb[differ]
            hi, lo = torch.maximum(ra, rb), torch.minimum(ra, rb)
            # Several pairs may share `hi`; amin keeps one link per round and the loop
            # re-finds the rest, so every pair ends up in one set.
            self.parent.scatter_reduce_(0, hi, lo, reduce="amin")
            a, b = a[differ], b[differ]

    def freeze(self, ids: torch.Tensor) -> None:
        """Mark every channel in ``ids`` as never-droppable."""
        self.union(ids, torch.zeros((), dtype=torch.int64))

    def is_frozen(self, ids: torch.Tensor) -> torch.Tensor:
        return self.find(ids) == FROZEN


def compress(ids: torch.Tensor) -> torch.Tensor:
    """Shrink every dimension along which all ids are equal to size 1."""
    for d in range(ids.dim()):
        if ids.shape[d] > 1:
            first = ids.narrow(d, 0, 1)
            if torch.equal(ids, first.expand_as(ids)):
                ids = first
    return ids.contiguous()


def varying_dims(values: torch.Tensor) -> list[int]:
    """Dimensions along which ``values`` are not all equal."""
    out = []
    for d in range(values.dim()):
        if values.shape[d] > 1:
            first = values.narrow(d, 0, 1)
            if not torch.equal(values, first.expand_as(values)):
                out.append(d)
    return out


def couple_except(forest: ChannelForest, ids: torch.Tensor, keep: int | Iterable[int] = ()
                  ) -> torch.Tensor:
    """Couple ``ids`` along every dim not in ``keep``, so that afterwards their roots vary at
    most along ``keep``; returns ``ids`` (whose roots changed, not its values).

    >>> f = ChannelForest(); ids = f.fresh((2, 3))
    >>> couple_except(f, ids, 1) is ids, f.find(ids).tolist()
    (True, [[1, 2, 3], [1, 2, 3]])
    """
    keep = {keep} if isinstance(keep, int) else set(keep)
    keep = {k % ids.dim() for k in keep} if ids.dim() else set()
    for d in range(ids.dim()):
        if d not in keep and ids.shape[d] > 1:
            forest.union(ids, ids.narrow(d, 0, 1))
    return ids


def one_channel_dim(forest: ChannelForest, ids: torch.Tensor) -> bool:
    """Couple ``ids`` along every dim but the last along which their roots vary, so that a
    pruned tensor is a sub-grid of the original; returns whether anything was coupled."""
    dims = varying_dims(forest.find(ids))
    for d in dims[:-1]:
        forest.union(ids, ids.narrow(d, 0, 1))
    return len(dims) > 1


def along(values: torch.Tensor, dim: int, size: int | None = None) -> torch.Tensor:
    """The 1-D profile of ``values`` along ``dim`` (index 0 on every other dim), broadcast to
    ``size`` entries when ``values`` is compressed along ``dim``."""
    dim = dim % values.dim()
    index = [0] * values.dim()
    index[dim] = slice(None)
    profile = values[tuple(index)]
    if size is not None and profile.numel() != size:
        profile = profile.expand(size)
    return profile


def expand_to(ids: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A full-size (materialised) id tensor for a real tensor of ``shape``."""
    return ids.expand(tuple(shape)).contiguous()
