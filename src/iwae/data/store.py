"""Files on disk, for the data loaders and the run directories alike: where the data
directory is, atomic writes, the user cache directory, and the bytes of a (gzipped) file.

The data directory is ``--data-dir``, else ``$IWAE_DATA``, else
``platformdirs.user_cache_dir("iwae")/data`` (:func:`resolve_data_dir`).
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import platformdirs

from iwae.errors import DataError

__all__ = [
    "atomic_write",
    "fallback_cache_dir",
    "fsync_dir",
    "is_writable_dir",
    "read_file_bytes",
    "resolve_data_dir",
]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$IWAE_DATA``, else the user cache."""
    if data_dir is None:
        data_dir = os.environ.get("IWAE_DATA") or Path(platformdirs.user_cache_dir("iwae")) / "data"
    return Path(data_dir).expanduser().resolve()


def fallback_cache_dir() -> Path:
    """The user cache directory, for caches where the data directory is read-only."""
    return Path(platformdirs.user_cache_dir("iwae"))


def is_writable_dir(path: Path) -> bool:
    """True if ``path`` is a directory we may write to (honours r-x modes even for root)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return path.is_dir() and bool(mode & 0o222) and os.access(path, os.W_OK)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` via ``write(file)`` to a temp file in the same directory, fsync,
    then ``os.replace``: a crash at any moment leaves the old file or the new one, and so
    does a failed write (its temporary file is removed). An ``OSError`` of the write itself
    (ENOSPC, EIO, ...) is raised naming ``path``."""
    try:
        _atomic_write(path, write)
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (where the platform allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_file_bytes(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped if its name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: broken gzip file ({e}); delete it and fetch it again") from e
