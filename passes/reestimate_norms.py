"""ReestimateNorms (transform, training-free): recompute BatchNorm running statistics on data.

Pruning removes channels a BatchNorm's *input* depended on, so the pruned component's norms see
activations whose mean and variance differ from the ones they were trained with; its
``running_mean``/``running_var`` are stale (MDA.md §1.4's component is exact only with respect to
the masked model, not to the unpruned source). This pass replaces them with statistics measured
on calibration images of the task, with no gradient and no other parameter touched.

What it computes, for every ``nn.BatchNorm{1,2,3}d`` with ``track_running_stats=True``: the
statistics are reset (``running_mean = 0``, ``running_var = 1``, ``num_batches_tracked = 0``),
then every batch ``x_1 .. x_B`` is forwarded once under ``no_grad`` with the norms in training
mode and ``momentum=None`` (every other module stays in eval mode, so dropout is off), which makes
PyTorch keep the *cumulative average* of the per-batch statistics::

    running_mean = (1/B) · Σ_b mean_b(z)            mean over (N, H, W) of the norm's input z
    running_var  = (1/B) · Σ_b var_b(z)             unbiased, over the same axes
    num_batches_tracked = B

where ``z`` is the norm's input with every *earlier* norm normalising by its batch statistics
(the norms are estimated together in one pass, as ``torch.optim.swa_utils.update_bn`` does).
For one batch these are exactly that batch's mean and unbiased variance; for equal-sized batches
the mean is exactly the mean over all images (give equal-sized batches: a short last batch
counts as much as a full one). Afterwards each norm's momentum and every module's
training flag are restored. Weights, biases and every other buffer are unchanged, and so is the
graph (the pass returns ``modified=True`` when it re-estimated at least one norm, because the
module's state changed).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from mdafx.errors import PreconditionError
from mdafx.passmanager import AnalysisManager, Pass
from mdafx.passes.channel_groups import ChannelGroups

__all__ = ["ReestimateNorms", "reestimate_batch_norms"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _inputs(batch: Any) -> torch.Tensor:
    """The model input of a batch: a tensor, or the first item of ``(x, y[, ...])``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise PreconditionError(f"a calibration batch must be a tensor or (x, y, ...), got "
                            f"{type(batch).__name__}")


@torch.no_grad()
def reestimate_batch_norms(module: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Re-estimate, in place, the running statistics of every BatchNorm of ``module`` from
    ``batches`` (tensors or ``(x, y, ...)`` tuples) as described in the module docstring.
    Returns ``module``. Raises PreconditionError (and leaves the statistics as they were) when
    ``batches`` is empty. A module without tracking norms is returned unchanged."""
    norms = _norms(module)
    if not norms:
        return module
    saved_stats = [{k: getattr(bn, k).clone() for k in _STATS} for bn in norms]
    saved_momentum = [bn.momentum for bn in norms]
    saved_training = {m: m.training for m in module.modules()}
    seen = 0
    try:
        module.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None          # cumulative average instead of an exponential one
            bn.train()
        for batch in batches:
            module(_inputs(batch))
            seen += 1
        if seen == 0:
            raise PreconditionError("reestimate-norms got no calibration batches")
    except BaseException:
        for bn, stats in zip(norms, saved_stats):
            for k, v in stats.items():
                getattr(bn, k).copy_(v)
        raise
    finally:
        for bn, momentum in zip(norms, saved_momentum):
            bn.momentum = momentum
        for m, training in saved_training.items():
            m.training = training
    return module


class ReestimateNorms(Pass):
    """Re-estimate every BatchNorm's running statistics on ``batches`` (module docstring).

    ``batches`` is iterated once per run; pass a list to run the pass more than once.

    >>> import torch, torch.nn as nn
    >>> from mdafx.api import trace
    >>> from mdafx.passmanager import PassManager
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), torch.zeros(1, 3, 4, 4))
    >>> x = torch.randn(8, 3, 4, 4)
    >>> PassManager([ReestimateNorms([x])]).run(gm).modified
    True
    >>> bn = gm.get_submodule("1")
    >>> z = gm.get_submodule("0")(x)
    >>> torch.allclose(bn.running_mean, z.mean((0, 2, 3)), atol=1e-6), int(bn.num_batches_tracked)
    (True, 1)
    """

    name = "reestimate-norms"
    # only buffer values change: channel ids and coupled groups depend on the graph and shapes
    preserves = (ChannelGroups,)

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> bool:
        if not _norms(gm):
            return False
        reestimate_batch_norms(gm, self.batches)
        return True
