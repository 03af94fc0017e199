"""Exceptions raised by mdafx.

Every mdafx failure is an :class:`MdafxError`, so callers can catch one type. Messages name
what is at fault: the file for :class:`FormatError`, the model / node / file for
:class:`ExportError`.
"""

from __future__ import annotations

__all__ = [
    "MdafxError", "FormatError", "ExportError", "TraceError", "UnsupportedOpError",
    "PreconditionError", "PassError",
]


class MdafxError(Exception):
    """Base class of every error mdafx raises on purpose."""


class FormatError(MdafxError):
    """A model file is corrupt, truncated, unsafe, or written by a newer mdafx."""


class ExportError(MdafxError):
    """A model could not be exported (torch.export / ONNX), or its export is wrong."""


class TraceError(MdafxError):
    """torch.fx could not trace the model; names the submodule and source line."""


class UnsupportedOpError(MdafxError):
    """Strict mode met a node with no exact channel rule."""


class PreconditionError(MdafxError):
    """A pass or API was handed a graph or argument it cannot work on."""


class PassError(MdafxError):
    """A pass failed; the message names the pass and the passes that ran before it."""
