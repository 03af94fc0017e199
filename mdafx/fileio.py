"""Files: atomic writes, output-path checks, OS errors as one-line messages.

Every file mdafx writes (model files, profiles, ONNX, dumps, tables, pictures, caches) goes
through :func:`atomic_output`: the bytes go to a temporary file beside the target, are flushed
and fsynced, get the permissions a plain ``open()`` would give (``0o666 & ~umask``), and only
then replace the target. An interrupted or failed write leaves nothing behind, and the target is
either the old file or the complete new one.

``overwrite=True`` only ever replaces a *regular* file: a directory, a device, a FIFO or a
socket at the target path is refused (so ``--force`` can never turn ``/dev/null`` into a file).
Without ``overwrite`` an existing path is refused before writing and again, atomically, at the
end (``os.link`` fails if the path appeared meanwhile).

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_output(d / "a.txt") as tmp:
...     _ = tmp.write_text("hello")
>>> (d / "a.txt").read_text()
'hello'
>>> with atomic_output(d / "a.txt") as tmp:
...     pass
Traceback (most recent call last):
...
mdafx.errors.OutputError: ...a.txt: already exists; pass --force (overwrite=True) to replace it
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError

__all__ = ["atomic_output", "write_text", "check_outputs", "describe_os_error"]


def describe_os_error(e: OSError, path: str | os.PathLike | None = None) -> str:
    """``<path>: <what happened>`` for an OS error, naming full disks and read-only places."""
    where = str(path if path is not None else (e.filename or ""))
    reason = {errno.ENOSPC: "no space left on the device",
              errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted"}.get(e.errno, e.strerror or str(e))
    return f"{where}: {reason}" if where else reason


def _check_replaceable(path: Path, overwrite: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:  # a parent that is a file, a path too long, no permission
        raise OutputError(describe_os_error(e, path)) from e
    if not overwrite:
        raise OutputError(f"{path}: already exists; pass --force (overwrite=True) to replace it")
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OutputError(f"{path}: is {kind}; --force only replaces regular files")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and move it to ``path``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is
    untouched. OS errors (full disk, permissions) become :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    _check_replaceable(path, overwrite)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(describe_os_error(e, path)) from e
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            if overwrite:
                _check_replaceable(path, overwrite)
                os.replace(tmp, path)
            else:
                _link_no_clobber(tmp, path)
            _fsync_dir(parent)
        except OSError as e:
            raise OutputError(describe_os_error(e, path)) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) atomically; returns ``path``."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_outputs(outputs: Iterable[str | os.PathLike | None],
                  inputs: Iterable[str | os.PathLike | None] = (), *, overwrite: bool = False
                  ) -> None:
    """Refuse, before any work, outputs that exist (without ``overwrite``) or are not regular
    files, that name the same file twice, or that are one of the command's inputs."""
    seen: dict[str, Path] = {}
    ins = {_identity(Path(p)): Path(p) for p in inputs if p is not None}
    for out in outputs:
        if out is None:
            continue
        out = Path(out)
        key = _identity(out)
        if key in ins:
            raise OutputError(f"{out}: is also an input of this command ({ins[key]}); "
                              "write the output elsewhere")
        if key in seen:
            raise OutputError(f"{out}: two outputs of this command are the same file")
        seen[key] = out
        _check_replaceable(out, overwrite)


def _identity(path: Path) -> str:
    """The same string for two spellings of one file (symlinks and ``..`` resolved)."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        return f"inode:{st.st_dev}:{st.st_ino}"
    return str(path.resolve())


def _link_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path}: appeared while writing; not replaced") from None
    except OSError as e:  # file systems without hard links
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        if os.path.lexists(path):
            raise OutputError(f"{path}: appeared while writing; not replaced") from None
        os.replace(tmp, path)


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
