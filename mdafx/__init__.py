"""mdafx: Model Disassembling and Assembling (MDA) as a torch.fx graph compiler.

The public API lives in ``mdafx.api`` and is re-exported here lazily (the ``passes`` package
imports ``mdafx`` submodules, so an eager import would be circular).
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = (
    "trace", "channel_groups", "ChannelPlan", "plan_from_votes", "plan_random", "prune",
    "masked_model", "locate", "disassemble", "Component", "assemble", "export_onnx",
    "save_model", "load_model", "profile",
)


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mdafx' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
