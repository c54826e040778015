"""MNIST: its IDX files, checked and downloaded, as float32 [N, 784] in [0, 1].

The files live in ``DATA_DIR/mnist/`` (:func:`iwae.data.store.resolve_data_dir`)::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

MNIST files may be gzipped or not; each is checked against the MD5 of its
*uncompressed* bytes (``.gz`` bytes differ between copies).  Missing files are
downloaded from :data:`MNIST_MIRRORS` unless ``download=False``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iwae.data.dataset import IMAGE_SIDE, N_PIXELS
from iwae.data.store import atomic_write, read_file_bytes, resolve_data_dir
from iwae.errors import DataError

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "VALIDATION_SIZE",
    "load_mnist",
    "read_idx",
]

log = logging.getLogger(__name__)

VALIDATION_SIZE = 400  # Burda et al.: the last 400 MNIST training images

MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
DOWNLOAD_TIMEOUT_S = 10.0

# file name (uncompressed) -> MD5 of the uncompressed bytes
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
_MNIST_SPLITS = {  # split -> (images file, labels file, number of images)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_IDX_UBYTE = 0x08


def _parse_idx(data: bytes, path: Path, ndim: int | None = None) -> np.ndarray:
    """Parse IDX bytes of unsigned bytes (magic 0x000008NN, NN = ndim) into an array."""
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file: only {len(data)} bytes")
    magic = int.from_bytes(data[:4], "big")
    expected_magic = (
        f"0x{(_IDX_UBYTE << 8) + ndim:08x}"
        if ndim
        else "0x000008NN (unsigned bytes, NN dimensions)"
    )
    if magic >> 8 != _IDX_UBYTE or magic & 0xFF == 0 or (ndim is not None and magic & 0xFF != ndim):
        raise DataError(
            f"{path}: wrong IDX magic number 0x{magic:08x}, expected {expected_magic}; "
            "the file is corrupted or not MNIST"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX header: {len(data)} bytes, expected at least {header}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX file {what}: {len(data)} bytes (uncompressed), expected {expected} "
            f"for dimensions {dims}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped if named ``*.gz``) into a uint8 array.

    Raises :class:`DataError` naming the file on a bad gzip stream, a wrong magic
    number (0x000008NN, with NN = ``ndim`` if given: 3 for images, 1 for labels), or
    a payload that is not exactly the size the header announces.
    """
    path = Path(path)
    return _parse_idx(read_file_bytes(path), path, ndim)


def _find_mnist_file(mnist_dir: Path, name: str) -> Path | None:
    for candidate in (mnist_dir / name, mnist_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _md5_problem(data: bytes, name: str) -> str | None:
    """None if ``data`` has the expected MD5 for MNIST file ``name``, else what is wrong."""
    digest = hashlib.md5(data).hexdigest()
    if digest == MNIST_MD5[name]:
        return None
    return f"MD5 of the uncompressed bytes is {digest}, expected {MNIST_MD5[name]}"


def _download_mnist_file(
    name: str, mnist_dir: Path, mirrors: Sequence[str], dead: set[str]
) -> list[str] | None:
    """Fetch ``name.gz`` from the first mirror that serves it with the right MD5.

    The verified ``.gz`` is placed atomically in ``mnist_dir``.  Returns None on
    success, else what went wrong with each mirror tried.  Mirrors that cannot be
    reached at all are added to ``dead`` and skipped for later files.
    """
    problems = []
    for mirror in mirrors:
        if mirror in dead:
            continue
        url = mirror if mirror.endswith("/") else mirror + "/"
        url += f"{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            problems.append(f"{url}: HTTP {e.code}")
            continue
        except (OSError, ValueError, http.client.HTTPException) as e:
            dead.add(mirror)
            problems.append(f"{url}: {getattr(e, 'reason', None) or e}")
            continue
        try:
            data = gzip.decompress(payload)
        except (OSError, EOFError, zlib.error) as e:
            problems.append(f"{url}: broken gzip ({e})")
            continue
        problem = _md5_problem(data, name)
        if problem:
            problems.append(f"{url}: {problem}")
            continue
        try:
            mnist_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(mnist_dir / f"{name}.gz", lambda f, payload=payload: f.write(payload))
        except OSError as e:
            raise DataError(
                f"{mnist_dir / name}.gz: cannot save the downloaded file: {e.strerror or e}"
            ) from e
        log.info("downloaded %s to %s", url, mnist_dir)
        return None
    return problems


def _read_mnist_file(path: Path, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read and verify one MNIST file: IDX structure, then shape, then MD5."""
    data = read_file_bytes(path)
    array = _parse_idx(data, path, ndim=len(shape))
    if array.shape != shape:
        raise DataError(f"{path}: IDX dimensions are {array.shape}, expected {shape}")
    problem = _md5_problem(data, name)
    if problem:
        raise DataError(
            f"{path}: {problem}; the file is corrupted or not the standard MNIST file, "
            "delete it and fetch it again"
        )
    return array


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    validation: bool = False,
    mirrors: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """MNIST images as float32 [N, 784] in [0, 1]: ``"train"`` (60,000) and ``"test"`` (10,000).

    With ``validation=True`` the last :data:`VALIDATION_SIZE` training images become
    ``"validation"`` (train 59,600).  Missing files are downloaded from ``mirrors``
    (default :data:`MNIST_MIRRORS`) unless ``download=False``; every file, local or
    downloaded, must match the MD5 of the standard uncompressed file.
    """
    mnist_dir = resolve_data_dir(data_dir) / "mnist"
    paths = {name: _find_mnist_file(mnist_dir, name) for name in MNIST_MD5}
    missing = [name for name, path in paths.items() if path is None]
    failure = ""
    if missing and download:
        dead: set[str] = set()
        mirrors = MNIST_MIRRORS if mirrors is None else mirrors
        problems = {name: _download_mnist_file(name, mnist_dir, mirrors, dead) for name in missing}
        paths.update(
            {
                name: mnist_dir / f"{name}.gz"
                for name, problem in problems.items()
                if problem is None
            }
        )
        missing = [name for name, problem in problems.items() if problem is not None]
        if missing:
            reasons = dict.fromkeys(
                reason for name in missing for reason in problems[name]
            )  # unique, in order
            failure = f" (download failed: {'; '.join(reasons) or 'no mirrors given'})"
    if missing:
        files = ", ".join(f"{name}.gz" for name in missing)
        raise DataError(
            f"MNIST not found in {mnist_dir}: place {files} there (gzipped or not), "
            f"or pass --data-dir / set IWAE_DATA{failure}"
        )

    out = {}
    for split, (images_name, labels_name, n) in _MNIST_SPLITS.items():
        images = _read_mnist_file(paths[images_name], images_name, (n, IMAGE_SIDE, IMAGE_SIDE))
        _read_mnist_file(paths[labels_name], labels_name, (n,))  # verified, not returned
        out[split] = images.reshape(n, N_PIXELS).astype(np.float32) / np.float32(255.0)
    if validation:
        out["train"], out["validation"] = (
            out["train"][:-VALIDATION_SIZE],
            out["train"][-VALIDATION_SIZE:],
        )
    return out
