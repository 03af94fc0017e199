"""mdafx: Model Disassembling and Assembling (MDA) as a torch.fx graph compiler.

The public API lives in ``mdafx.api`` and is re-exported here lazily (the ``passes`` package
imports ``mdafx`` submodules, so an eager import would be circular). ``assemble`` and
``finetune`` are also the names of submodules (``import mdafx.assemble`` rebinds
``mdafx.assemble`` to the module), so import those two from ``mdafx.api``.
"""
from __future__ import annotations

__version__ = "0.1.0"

_SUBMODULE_NAMES = ("assemble", "finetune")


def _api():
    import importlib

    # not ``from . import api``: that looks the name up on this package first, i.e. calls
    # __getattr__ again
    return importlib.import_module("mdafx.api")


def _api_names() -> list[str]:
    api = _api()
    return [n for n in api.__all__ if n not in _SUBMODULE_NAMES]


def __getattr__(name: str):
    if not name.startswith("_") and name not in _SUBMODULE_NAMES:
        api = _api()
        if name in api.__all__:
            return getattr(api, name)
    raise AttributeError(f"module 'mdafx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_api_names()))
