"""One writer per directory: an exclusive lock on a run or experiment directory while a
command writes into it.

``iwae train`` (new or ``--resume``), ``iwae reproduce`` (its experiment directory, and
each run's directory in the process training it), ``iwae evaluate`` and ``iwae bdmc`` hold
:func:`locked` on the directory they write. The lock is ``DIR/.lock``, taken with the
:mod:`filelock` library (``flock``): the operating system releases it when the process
ends, however it ends, so a process killed with SIGKILL leaves no stale lock. The holder
then writes who it is into ``DIR/.lock.json`` (atomically): ``pid``, ``host``, ``since``
(UTC, ISO 8601) and ``command``. A second writer stops at once with
:class:`DirectoryLocked` (one line naming the directory and the holder; the CLI exits with
code 2) and writes nothing. Readers (``iwae
report``, ``iwae sample``, TensorBoard) take no lock: every file is written atomically, so
they see the last complete version.

Within one process the lock is re-entrant: a worker of ``iwae reproduce`` holds its run's
directory while training it (:func:`iwae.engine.train` locks it again) and evaluating it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import filelock

from iwae.errors import IwaeError
from iwae.rundir import LOCK_FILE, LOCK_FILES, LOCK_INFO_FILE, read_json, write_json

#: set to 1 to take no locks (a file system that refuses them, and nothing else writes there)
NO_LOCK_ENV = "IWAE_NO_LOCK"

#: directories this process holds: resolved path -> (the lock, how many holds)
_held: dict[Path, list] = {}


class DirectoryLocked(IwaeError):
    """Another process writes into the directory (it holds its lock)."""


def lead_process() -> bool:
    """This process writes its run's files: not a torchrun process of rank > 0 (those
    leave the run directory to rank 0)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def locked(directory: str | Path, enabled: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` while inside; :class:`DirectoryLocked` at
    once if another process holds it. A missing directory is made (with its parents) and,
    should nothing but the lock be written into it, removed again at the end: a command
    that fails leaves no trace. ``enabled=False`` (or ``IWAE_NO_LOCK=1``): take none.
    Yields the directory."""
    directory = Path(directory)
    key = directory.resolve()
    if not enabled or os.environ.get(NO_LOCK_ENV) == "1":
        yield directory
        return
    if key in _held:  # re-entered in this process
        _held[key][1] += 1
        try:
            yield directory
        finally:
            _held[key][1] -= 1
        return
    made = not directory.exists()
    lock = _acquire(directory)
    _held[key] = [lock, 1]
    try:
        write_json(directory / LOCK_INFO_FILE, _holder())
        yield directory
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            (directory / LOCK_INFO_FILE).unlink(missing_ok=True)
        lock.release()
        if made:
            _remove_if_empty(directory)


def _remove_if_empty(directory: Path) -> None:
    """Remove ``directory`` if it holds nothing but its lock file."""
    with contextlib.suppress(OSError):
        if all(p.name in LOCK_FILES for p in directory.iterdir()):
            (directory / LOCK_FILE).unlink(missing_ok=True)
            directory.rmdir()


def _acquire(directory: Path) -> filelock.BaseFileLock:
    """The lock of ``directory``, acquired without waiting."""
    if directory.exists() and not directory.is_dir():
        raise IwaeError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(directory / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise DirectoryLocked(_locked_message(directory)) from None
    except (OSError, NotImplementedError) as e:
        raise IwaeError(
            f"cannot lock {directory} ({e}); if no other process writes there, set "
            f"{NO_LOCK_ENV}=1 to go on without a lock"
        ) from None
    return lock


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:500],
    }


def holder(directory: str | Path) -> dict | None:
    """Who holds (or last held) the lock of ``directory``, as its ``.lock.json`` says."""
    info = read_json(Path(directory) / LOCK_INFO_FILE, required=False)
    return info if isinstance(info, dict) else None


def _locked_message(directory: Path) -> str:
    """One line: the directory, and the holder's PID, host and start (the holder writes its
    ``.lock.json`` right after taking the lock: waited for a moment)."""
    for _ in range(20):
        info = holder(directory)
        if info is not None:
            break
        time.sleep(0.05)
    else:
        info = {}
    who = f"PID {info.get('pid', '?')} on {info.get('host', '?')}"
    since = info.get("since", "an unknown time")
    command = f" ({info['command']})" if info.get("command") else ""
    return (
        f"{directory} is being written by another process: {who} since {since}{command}; "
        "wait for it to end or stop it (nothing was written)"
    )
