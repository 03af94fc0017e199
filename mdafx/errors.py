"""Exceptions raised by mdafx.

Every failure a user can meet is an :class:`MdafxError`, so callers catch one type and the CLI
prints it as one ``mdafx: error: <message>`` line. Messages name what is at fault: the file, the
node (``node.format_node()``), the class, the flag. A failed internal invariant is an
:class:`InternalError`, which is deliberately *not* an MdafxError: it is a bug in mdafx, and the
CLI shows its traceback.
"""

from __future__ import annotations

__all__ = [
    "MdafxError", "FormatError", "ExportError", "TraceError", "UnsupportedOpError",
    "PreconditionError", "PassError", "DataError", "ProfileMismatchError", "OutputError",
    "InternalError",
]


class MdafxError(Exception):
    """Base class of every error mdafx raises on purpose."""


class FormatError(MdafxError):
    """A file is corrupt, truncated, unsafe, of an old format, or written by a newer mdafx."""


class ExportError(MdafxError):
    """A model could not be exported (torch.export / ONNX / model file), or its export is wrong."""


class TraceError(MdafxError):
    """torch.fx could not trace the model; names the submodule and source line."""


class UnsupportedOpError(MdafxError):
    """Strict mode met a node with no exact channel rule."""


class PreconditionError(MdafxError):
    """A pass or API was handed a graph or argument it cannot work on."""


class PassError(MdafxError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class DataError(MdafxError, ValueError):
    """A data set is malformed or does not fit the model (no classes, a bad image, ...)."""


class ProfileMismatchError(MdafxError):
    """A contribution profile was computed on another model than the one it is applied to."""


class OutputError(MdafxError):
    """An output cannot be written: it exists, it collides with an input, the disk is full."""


class InternalError(Exception):
    """An invariant of mdafx itself failed: a bug, reported with its traceback."""
