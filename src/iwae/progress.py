"""Progress reports: a tqdm bar on a terminal, a plain line now and then elsewhere.

A bar redraws itself with carriage returns several times a second: right on a terminal,
but in a log file (stderr redirected, a batch job) it leaves hundreds of updates on one
line. :func:`progress_bar` gives a tqdm bar when the stream is a terminal and otherwise a
:class:`LineProgress`, which writes at most one line every ``interval`` seconds

    L_5000: 2,400/10,000 ex, 9.8 ex/s, ETA 12:55

and a last line when it is closed. Both have tqdm's ``update``, ``set_postfix``,
``set_postfix_str`` and ``close`` and work as context managers. Every layer may import
this module; it imports nothing of the package.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm.auto import tqdm

#: seconds between two lines of a :class:`LineProgress`
INTERVAL = 30.0


def progress_bar(
    total: int,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    stream: TextIO | None = None,
    interval: float | None = None,
    **tqdm_options,
):
    """A progress report of ``total`` units: nothing if not ``enabled`` (``--quiet``), a tqdm
    bar if ``stream`` (default stderr) is a terminal, else a :class:`LineProgress` writing
    at most one line every ``interval`` seconds (default :data:`INTERVAL`)."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(
            total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, **tqdm_options
        )
    return LineProgress(total, desc, unit, stream, INTERVAL if interval is None else interval)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class LineProgress:
    """Plain progress lines, no carriage returns: ``desc: done/total unit, rate unit/s,
    ETA m:ss`` at most once every ``interval`` seconds (``clock``: a monotonic clock), and
    when closed ``desc: done/total unit in m:ss (rate unit/s)``."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        stream: TextIO | None = None,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.interval, self.clock = (
            total,
            desc,
            unit,
            interval,
            clock,
        )
        self.stream = sys.stderr if stream is None else stream
        self.n, self.postfix, self.closed = 0, "", False
        self.started = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._write(f"{self._count()}, {self._rate(now)}, ETA {self._eta(now)}")

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        self._write(f"{self._count()} in {_clock(now - self.started)} ({self._rate(now)})")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self) -> str:
        return f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"

    def _rate(self, now: float) -> str:
        elapsed = now - self.started
        return f"{self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 else f"? {self.unit}/s"

    def _eta(self, now: float) -> str:
        elapsed = now - self.started
        if not self.total or self.n <= 0 or elapsed <= 0:
            return "?"
        return _clock(max(self.total - self.n, 0) * elapsed / self.n)

    def _write(self, text: str) -> None:
        postfix = f" [{self.postfix}]" if self.postfix else ""
        self.stream.write(f"{self.desc}: {text}{postfix}\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
