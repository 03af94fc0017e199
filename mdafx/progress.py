"""Progress of long loops: a tqdm bar on a terminal, a periodic one-line status elsewhere.

Every long loop of mdafx (sample selection, contributions, threshold search, calibration,
evaluation, fine-tuning) reports through :func:`track` or :class:`Progress`, so that a run
under a batch scheduler or with ``2> log`` is never silent for an hour:

* stderr is a terminal: a tqdm bar (totals, rate, ETA);
* stderr is not a terminal: one line every :data:`STATUS_INTERVAL` seconds, e.g.
  ``select samples: 1200/3516 batches, 34%, ETA 2m10s``, and a last line when the loop ends,
  if it printed any (a loop shorter than the interval prints nothing);
* ``enabled=False`` (the CLI's ``--quiet``, ``--no-progress``, ``--json``) prints nothing.

Only the main process prints: under ``torch.distributed`` rank 0 (its shard is as long as any
other's, so its ETA is the run's).

>>> import io
>>> out = io.StringIO()
>>> with Progress(4, "demo", stream=out, interval=0.0) as bar:
...     for _ in range(4):
...         bar.update()
>>> out.getvalue().splitlines()[-1].startswith("demo: 4/4 batches, 100%")
True
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

__all__ = ["STATUS_INTERVAL", "Progress", "duration_text", "track"]

STATUS_INTERVAL: float = 30.0
"""Seconds between two status lines when stderr is not a terminal."""

T = TypeVar("T")


def duration_text(seconds: float) -> str:
    """``45s``, ``2m10s``, ``1h05m``: short, for status lines."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Progress:
    """Counts steps of one loop of ``total`` steps (None: unknown) and reports them (module
    docstring). ``update(n)`` adds steps; ``note(text)`` sets a short suffix (the candidate
    being scored, a loss); ``close()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "batch",
                 enabled: bool = True, stream: TextIO | None = None,
                 interval: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.count, self.suffix = 0, ""
        self._stream = stream if stream is not None else sys.stderr
        self._interval = STATUS_INTERVAL if interval is None else interval
        self._start = self._last = time.monotonic()
        self._lines = 0
        self._bar = None
        self._on = bool(enabled) and _is_main_process()
        if self._on and stream is None and _isatty(self._stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self._stream,
                             mininterval=0.5, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self._on:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._print(self.status(now))

    def note(self, text: str) -> None:
        self.suffix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def status(self, now: float | None = None) -> str:
        """``desc: n/total unit, pct%, ETA ...`` (what the periodic line says)."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        units = self.unit + ("es" if self.unit.endswith(("ch", "sh", "x")) else
                             "" if self.unit.endswith("s") else "s")
        if self.total:
            share = self.count / self.total
            eta = (elapsed / self.count * (self.total - self.count)) if self.count else None
            text = (f"{self.desc}: {self.count}/{self.total} {units}, {share:.0%}, "
                    + (f"ETA {duration_text(eta)}" if eta is not None else "ETA ?"))
        else:
            text = f"{self.desc}: {self.count} {units}"
        text += f", {duration_text(elapsed)} elapsed"
        return text + (f" ({self.suffix})" if self.suffix else "")

    def close(self) -> None:
        if not self._on:
            return
        self._on = False
        if self._bar is not None:
            self._bar.close()
        elif self._lines:  # it said it was running: say it finished
            self._print(self.status() + " - done")

    def _print(self, line: str) -> None:
        self._lines += 1
        print(line, file=self._stream, flush=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def track(iterable: Iterable[T], desc: str, *, total: int | None = None, unit: str = "batch",
          enabled: bool = True) -> Iterator[T]:
    """Iterate ``iterable`` while reporting its progress (``total`` defaults to its
    ``len()`` when it has one)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, unit=unit, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update()
