"""Where the work runs: devices, autocast, and data parallelism over ``torch.distributed``.

Devices
-------
:func:`resolve_device` turns ``--device cpu|cuda[:N]|mps`` (or a ``torch.device``) into a
checked ``torch.device``; :func:`on_device` runs a block with a module moved there and moves it
back. :func:`autocast` is the optional mixed precision of the *forward passes that only rank or
score* (sample selection, evaluation, search scoring): bfloat16 on CPU, float16 on CUDA/MPS. It
is never used while contributions are captured (their layer inputs must be float32).

Data parallelism
----------------
A run launched by ``torchrun --nproc-per-node N mdafx analyse ...`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) calls
:func:`init_from_env`: gloo on CPU, NCCL when the device is CUDA (each process takes
``cuda:LOCAL_RANK``). A :class:`Ranks` object is the process's view of the group; the
workflows take one (default :func:`current`: the initialised default group, else one process)
and use only these operations:

* :meth:`Ranks.shard`: the process's part of a list of sample indices. The list is cut into
  batches of ``batch_size`` in order and rank ``r`` of ``R`` takes the contiguous batches
  ``[r·B/R, (r+1)·B/R)`` (``B`` batches): disjoint, covering, deterministic, no padding
  duplicates, balanced to one batch, and every sample is computed in the *same batch* as in a
  one-process run (so its logits are the same numbers, not just close ones).
* :meth:`Ranks.step`: runs one local step and then exchanges every rank's status, so that a
  rank that raises makes *every* rank raise :class:`DistributedError` naming it, at the same
  point, instead of leaving the others waiting in the next collective.
* :meth:`Ranks.gather` (all_gather_object), :meth:`Ranks.sum` (all_reduce SUM in float64 for
  floating tensors, int64 for integers, then rounded once to the tensor's dtype),
  :meth:`Ranks.broadcast`.
* :func:`merge_ranked`: the exact merge of per-rank top-k candidate lists (score descending,
  ties to the smaller index), which gives the same samples as one process.

With one process every operation is the identity and :meth:`Ranks.step` calls the function
directly, so single-process runs behave (and fail) exactly as before.

>>> SINGLE.shard(list(range(10)), 3)
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
>>> [Ranks(r, 3).shard(list(range(10)), 3) for r in range(3)]
[[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
>>> merge_ranked([{0: [(0.9, 4), (0.5, 1)]}, {0: [(0.9, 2), (0.7, 7)]}], {0: 3})
{0: [(0.9, 2), (0.9, 4), (0.7, 7)]}
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import MdafxError, PreconditionError
from .ir import module_device

__all__ = ["DEFAULT_TIMEOUT_S", "DistributedError", "Ranks", "SINGLE", "autocast", "current",
           "init_from_env", "merge_ranked", "on_device", "resolve_device", "session"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S: float = 1800.0
"""How long a rank waits in a collective for the others (torch's default for gloo): it bounds
the imbalance between ranks, not the length of the run."""

_DEVICE_TYPES = ("cpu", "cuda", "mps")


class DistributedError(MdafxError):
    """A rank of a data-parallel run failed (the message names the rank and its error), or the
    process group could not be set up."""


# --------------------------------------------------------------------------------------------
# devices


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``spec`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``; None: ``cpu``) as a ``torch.device``,
    checked to exist here; PreconditionError saying what is missing otherwise."""
    if spec is None or spec == "":
        return torch.device("cpu")
    try:
        device = spec if isinstance(spec, torch.device) else torch.device(str(spec))
    except (RuntimeError, ValueError):
        raise PreconditionError(f"device {spec!r}: expected cpu, cuda, cuda:N or mps") from None
    if device.type not in _DEVICE_TYPES:
        raise PreconditionError(f"device {spec!r}: expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PreconditionError(f"device {spec!r}: no CUDA GPU is available to this torch "
                                    f"(torch {torch.__version__}, CUDA "
                                    f"{torch.version.cuda or 'not built'})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PreconditionError(f"device {spec!r}: there are {count} CUDA device(s), "
                                    f"cuda:0 .. cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PreconditionError(f"device {spec!r}: MPS (Apple GPU) is not available here")
    return device


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device | str | None
              ) -> Iterator[torch.device]:
    """Run the block with ``module`` on ``device`` (None: where it is) and move it back after;
    yields the device."""
    before = module_device(module)
    target = before if device is None else resolve_device(device)
    if target == before:
        yield target
        return
    module.to(target)
    try:
        yield target
    finally:
        module.to(before)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` (bfloat16 on CPU, float16 on CUDA and MPS) when
    ``enabled``, else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# ranks


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run: ``rank`` of ``world`` processes, the
    collective ``backend`` (None for one process) and the device collectives run on."""

    rank: int = 0
    world: int = 1
    backend: str | None = None
    comm_device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    def shard(self, items: Sequence[T], batch_size: int) -> list[T]:
        """This rank's contiguous run of whole batches of ``items`` (module docstring)."""
        items = list(items)
        if self.world == 1:
            return items
        n_batches = -(-len(items) // max(1, batch_size))
        lo = self.rank * n_batches // self.world
        hi = (self.rank + 1) * n_batches // self.world
        return items[lo * batch_size:hi * batch_size]

    def step(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on this rank; then every rank learns whether any failed,
        and if one did, all raise :class:`DistributedError` naming the first failed rank."""
        if self.world == 1:
            return fn(*args, **kwargs)
        error: BaseException | None = None
        result = None
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # every kind: the other ranks must hear of it
            error = e
        status = None if error is None else (
            str(error) if isinstance(error, MdafxError) else f"{type(error).__name__}: {error}")
        statuses = self.gather(status)
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            r, message = failed[0]
            raise DistributedError(f"{what} failed on rank {r} of {self.world}: "
                                   f"{message}") from error
        return result  # type: ignore[return-value]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``tensor`` (same shape on all), on every rank: floating
        tensors are summed in float64 and rounded once to their dtype, integers in int64."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        wide = torch.float64 if tensor.is_floating_point() else torch.int64
        buf = tensor.detach().to(device=self.comm_device, dtype=wide, copy=True).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(device=tensor.device, dtype=tensor.dtype)

    def barrier(self) -> None:
        if self.world > 1:
            self.gather(None)


SINGLE = Ranks()
"""One process: every operation is the identity."""


def current() -> Ranks:
    """The default process group of ``torch.distributed`` when it is initialised, else
    :data:`SINGLE`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    backend = str(dist.get_backend())
    comm = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    return Ranks(dist.get_rank(), dist.get_world_size(), backend, comm)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"${name}={raw!r} is not an integer (set by the launcher: "
                               "torchrun)") from None


def init_from_env(device: str | torch.device | None = None, *,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Ranks, torch.device]:
    """Join the data-parallel run the launcher started (``WORLD_SIZE > 1``; torchrun sets
    it), or stay one process. Returns this process's :class:`Ranks` and its device: ``cuda``
    without an index becomes ``cuda:LOCAL_RANK``. Backend: NCCL for CUDA, gloo otherwise."""
    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        return current(), resolve_device(device)
    if world <= 1:
        return SINGLE, resolve_device(device)
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = resolve_device(f"cuda:{local}")
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but ${', $'.join(missing)} not set: launch "
                               "with torchrun --nproc-per-node N (or set the rendezvous "
                               "variables)")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:
        raise DistributedError(f"rank {rank} of {world} could not join the process group "
                               f"({backend}): {type(e).__name__}: {e}") from e
    return current(), dev


@contextlib.contextmanager
def session(device: str | torch.device | None = None, *,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[Ranks, torch.device]]:
    """:func:`init_from_env` for the block; the process group it created is destroyed after."""
    import torch.distributed as dist

    created = not (dist.is_available() and dist.is_initialized())
    ranks, dev = init_from_env(device, timeout_s=timeout_s)
    try:
        yield ranks, dev
    finally:
        if created and ranks.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def merge_ranked(per_rank: Sequence[Mapping[int, Sequence[tuple[float, int]]]],
                 quota: Mapping[int, int]) -> dict[int, list[tuple[float, int]]]:
    """Per key (a class), the best ``quota[key]`` of all ranks' ``(score, index)`` candidates:
    highest score first, ties to the smaller index. Exact when each rank sent its own best
    ``quota[key]``: a sample of the overall top-k is in its rank's top-k."""
    merged: dict[int, list[tuple[float, int]]] = {}
    for key, k in quota.items():
        pool = [(float(s), int(i)) for part in per_rank for s, i in part.get(key, ())]
        pool.sort(key=lambda item: (-item[0], item[1]))
        merged[key] = pool[:k]
    return merged
