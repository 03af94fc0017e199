"""Debug switches, read from the environment in one place (read at call time, not at import).

* ``MDAFX_DUMP=<dir>``: dump the graph before and after every pass into ``<dir>/<model>/``
  (``mdafx.instrument.DumpIR``).
* ``MDAFX_VERIFY=1``: lint and run the graph after every pass that changed it (``VerifyEach``).
* ``MDAFX_ACCEPT=1``: golden-dump tests rewrite their expected files instead of comparing.

Boolean flags accept ``1/true/yes/on`` and ``0/false/no/off/''`` (any case); anything else is an
error, so a typo never silently turns a check off.
"""
from __future__ import annotations

import os

from .errors import PreconditionError

__all__ = ["dump_dir", "verify", "accept"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise PreconditionError(f"{name}={os.environ[name]!r}: expected 1/true/yes/on or "
                            "0/false/no/off")


def dump_dir() -> str | None:
    """``MDAFX_DUMP``: the directory per-pass dumps go to, or None."""
    return os.environ.get("MDAFX_DUMP") or None


def verify() -> bool:
    """``MDAFX_VERIFY``: verify the graph after each modifying pass."""
    return _flag("MDAFX_VERIFY")


def accept() -> bool:
    """``MDAFX_ACCEPT``: golden tests rewrite their expected output."""
    return _flag("MDAFX_ACCEPT")
