"""SIGINT and SIGTERM as requests to stop: recorded, then honoured where the work can stop
cleanly.

Inside :func:`deferred` (the training loop, :func:`iwae.engine.train_group`) a signal only
records that it came (:func:`received`): the loop finishes the step in progress, writes a
checkpoint there and raises :class:`iwae.errors.Interrupted`, and a second signal while the
checkpoint is written changes nothing. Inside :func:`catching` alone (a worker's task of
``iwae reproduce``, outside its training loop) a signal raises
:class:`~iwae.errors.Interrupted` at once: an evaluation is not resumable anyway, and every
file is written atomically. The previous handlers are restored when the outermost context
ends. Handlers can be set in the main thread only; elsewhere both contexts change nothing
(the signal keeps its previous effect).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from iwae.errors import Interrupted

#: the signals that ask a command to stop
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None  # the first stop signal since the outermost context began
_installed = 0  # depth of nested contexts (the outermost installs and restores handlers)
_deferring = 0  # depth of nested deferred() contexts
_previous: dict[int, object] = {}


def received() -> int | None:
    """The first stop signal received since the outermost context began, or None."""
    return _received


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    return signal.Signals(signum).name


def _handler(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signum
    if not _deferring:
        raise Interrupted(signum, f"interrupted by {signal_name(signum)}")


@contextlib.contextmanager
def _handlers() -> Iterator[None]:
    """Our handler for :data:`STOP_SIGNALS` while inside (the outermost call installs it and
    forgets earlier signals; the previous handlers come back when it ends)."""
    global _installed, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _installed == 0:
        _received = None
        for s in STOP_SIGNALS:
            _previous[s] = signal.signal(s, _handler)
    _installed += 1
    try:
        yield
    finally:
        _installed -= 1
        if _installed == 0:
            for s in STOP_SIGNALS:
                signal.signal(s, _previous.pop(s))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a stop signal is only recorded (:func:`received`)."""
    global _deferring
    with _handlers():
        _deferring += 1
        try:
            yield
        finally:
            _deferring -= 1


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Inside, a stop signal raises :class:`~iwae.errors.Interrupted`, except within
    :func:`deferred`, where it is recorded."""
    with _handlers():
        yield
