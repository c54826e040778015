"""Datasets: MNIST and OMNIGLOT 28x28, or the user's own images from files, as float32
arrays of shape [N, D] in [0, 1] (D = 784 for the built-in sets).

Own data (``--dataset PATH``, :func:`load_files`) is either an ``.npz`` file with arrays
``train`` and ``test`` (and optionally ``validation``) of shape [N, H, W] or [N, D], or a
directory with ``train/`` and ``test/`` (optionally ``validation/``) holding PNG images of
one size (pixel value / 255 is the grey value: white = 1, as in MNIST's files; colour is
converted to grey). Values must lie in [0, 1] (for 8-bit data, ``eight_bit``: integer
arrays of the levels 0..255, read as v / 255); training images that are all 0 or 1 are
used as they are, grey ones are binarized dynamically as MNIST's are for a Bernoulli
likelihood (:func:`test_images`: the test images of either kind). A dataset read from
files carries its image shape and a content hash (:func:`content_sha256`).

Layout of the data directory (``--data-dir``, else ``$IWAE_DATA``, else
``platformdirs.user_cache_dir("iwae")/data``)::

    DATA_DIR/
      mnist/      train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
                  t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]
      omniglot/   chardata.mat                  (the IWAE 28x28 file), or
                  images_background.npz, images_evaluation.npz, characters.csv
                  (raw Lake et al. 105x105 images, see below)

MNIST files may be gzipped or not; each is checked against the MD5 of its
*uncompressed* bytes (``.gz`` bytes differ between copies).  Missing files are
downloaded from :data:`MNIST_MIRRORS` unless ``download=False``.

OMNIGLOT: if ``chardata.mat`` (Burda et al.'s file) is present it is used as is:
24,345 training and 8,070 test images.  Otherwise an approximation is rebuilt
from the raw images (``images`` is bool [C, 20, 105, 105], True = background):

* characters in ``char_id`` order (background 1..964, then evaluation 965..1623);
* ink = 1 - image, resized 105x105 -> 28x28 with
  ``torch.nn.functional.interpolate(mode="area")`` (box average: anti-aliased
  grey values in [0, 1]);
* one ``numpy.random.default_rng(OMNIGLOT_SPLIT_SEED)`` draws, for each
  character in turn, a permutation ``p`` of its 20 drawers: drawers ``p[:15]``
  go to train and ``p[15:]`` to test, in that order; for the 45 Glagolitic
  characters the last test drawer ``p[19]`` is dropped.  This gives
  1623 * 15 = 24,345 train and 1623 * 5 - 45 = 8,070 test images, the sizes of
  chardata.mat, but not its pixels (its resize method and drawer split are
  unknown).

The rebuilt arrays are cached as ``omniglot28_split<seed>.npz`` in
``DATA_DIR/omniglot/`` (or in the user cache directory if that is read-only),
together with a fingerprint (sha256 of the source files, seed, and method); a
cache that is stale or unreadable is rebuilt.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import http.client
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import platformdirs
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

from iwae.errors import DataError, IwaeError

__all__ = [
    "DATASETS",
    "MNIST_MIRRORS",
    "OMNIGLOT_SPLIT_SEED",
    "VALIDATION_SIZE",
    "Dataset",
    "binarize_fixed",
    "content_sha256",
    "display_shape",
    "load_files",
    "binarized_test",
    "test_images",
    "test_subset_indices",
    "test_subset_record",
    "load_dataset",
    "load_mnist",
    "load_omniglot",
    "read_idx",
    "resolve_data_dir",
]

log = logging.getLogger(__name__)

DATASETS = ("mnist", "omniglot")
VALIDATION_SIZE = 400  # Burda et al.: the last 400 MNIST training images
IMAGE_SIDE = 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE

# --------------------------------------------------------------------------- paths


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$IWAE_DATA``, else the user cache."""
    if data_dir is None:
        data_dir = os.environ.get("IWAE_DATA") or Path(platformdirs.user_cache_dir("iwae")) / "data"
    return Path(data_dir).expanduser().resolve()


def _is_writable_dir(path: Path) -> bool:
    """True if ``path`` is a directory we may write to (honours r-x modes even for root)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return path.is_dir() and bool(mode & 0o222) and os.access(path, os.W_OK)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` via ``write(file)`` to a temp file in the same directory, fsync,
    then ``os.replace``: a crash at any moment leaves the old file or the new one."""
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
    try:  # make the rename itself durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------- MNIST

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


def _read_file_bytes(path: Path) -> bytes:
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
    return _parse_idx(_read_file_bytes(path), path, ndim)


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
    data = _read_file_bytes(path)
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


# --------------------------------------------------------------------------- OMNIGLOT

OMNIGLOT_SPLIT_SEED = 0
OMNIGLOT_TRAIN_SIZE = 24345
OMNIGLOT_TEST_SIZE = 8070
TEST_SIZES = {"mnist": _MNIST_SPLITS["test"][2], "omniglot": OMNIGLOT_TEST_SIZE}
_OMNIGLOT_RAW = {  # file -> number of characters (char_id 1..964, then 965..1623)
    "images_background.npz": 964,
    "images_evaluation.npz": 659,
}
_OMNIGLOT_CSV = "characters.csv"
_OMNIGLOT_DRAWERS = 20
_OMNIGLOT_TRAIN_DRAWERS = 15
_OMNIGLOT_RAW_SIDE = 105
_OMNIGLOT_SHORT_ALPHABET = "Glagolitic"  # its characters have only 19 drawings in chardata.mat
_OMNIGLOT_SHORT_COUNT = 45
# Bump when the construction changes, so that old caches are rebuilt.
_OMNIGLOT_METHOD = "v1 ink=1-image resize=interpolate(area) perm20 15/5 glagolitic-drop-last"


def _check_split(path: Path, name: str, array: np.ndarray, n: int) -> np.ndarray:
    """Validate one [n, 784] split of images with values in [0, 1]."""
    if array.shape != (n, N_PIXELS):
        raise DataError(f"{path}: {name} has shape {array.shape}, expected {(n, N_PIXELS)}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{path}: {name} has dtype {array.dtype}, expected real numbers")
    if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise DataError(f"{path}: {name} has values outside [0, 1]")
    return array.astype(np.float32, copy=False)


def _load_chardata(
    path: Path, sizes: tuple[int, int] = (OMNIGLOT_TRAIN_SIZE, OMNIGLOT_TEST_SIZE)
) -> dict[str, np.ndarray]:
    """Burda et al.'s ``chardata.mat``: ``data`` [784 x 24345], ``testdata`` [784 x 8070]
    (other ``sizes`` for tests).

    scipy's MAT parser can crash the interpreter on a corrupted file (a segmentation
    fault, found by fuzzing), so the file is parsed in a child process: a crash there
    becomes a DataError here.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with tempfile.TemporaryDirectory(prefix="iwae-mat-") as tmp:
        result, error = Path(tmp) / "arrays.npz", Path(tmp) / "error.txt"
        child = context.Process(target=_parse_chardata_child, args=(path, sizes, result, error))
        child.start()
        child.join()
        if child.exitcode != 0:
            message = (
                error.read_text()
                if error.exists()
                else (
                    f"{path}: the MATLAB file parser crashed (exit code {child.exitcode}); "
                    "the file is corrupted"
                )
            )
            raise DataError(message)
        with np.load(result, allow_pickle=False) as npz:
            return {"train": npz["train"], "test": npz["test"]}


def _parse_chardata_child(path: Path, sizes: tuple[int, int], result: Path, error: Path) -> None:
    try:
        np.savez(result, **_parse_chardata(path, sizes))
    except BaseException as e:
        error.write_text(
            str(e) if isinstance(e, DataError) else f"{path}: cannot read MATLAB file: {e}"
        )
        sys.exit(3)


def _parse_chardata(path: Path, sizes: tuple[int, int]) -> dict[str, np.ndarray]:
    try:
        mat = scipy.io.loadmat(path, variable_names=["data", "testdata"])
    except Exception as e:  # scipy raises a variety of types on corrupted files
        raise DataError(f"{path}: cannot read MATLAB file: {e}") from e
    out = {}
    for key, split, n in (("data", "train", sizes[0]), ("testdata", "test", sizes[1])):
        if key not in mat:
            raise DataError(
                f"{path}: variable '{key}' missing, expected '{key}' of shape {(N_PIXELS, n)}"
            )
        data = mat[key]
        if data.shape != (N_PIXELS, n):
            raise DataError(f"{path}: '{key}' has shape {data.shape}, expected {(N_PIXELS, n)}")
        # As in yburda/iwae: MATLAB stores each image column-major.
        images = data.T.reshape((-1, IMAGE_SIDE, IMAGE_SIDE)).reshape((-1, N_PIXELS), order="F")
        out[split] = np.ascontiguousarray(_check_split(path, f"'{key}'", images, n))
    return out


def _read_characters_csv(path: Path) -> np.ndarray:
    """Bool array over char_id 1..1623: is the character in the short (Glagolitic) alphabet."""
    n_chars = sum(_OMNIGLOT_RAW.values())
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV file: {e}") from e
    try:
        ids = sorted((int(row["char_id"]), row["alphabet"]) for row in rows)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: expected columns char_id (integer) and alphabet: {e!r}") from e
    if [char_id for char_id, _ in ids] != list(range(1, n_chars + 1)):
        raise DataError(f"{path}: expected one row for each char_id 1..{n_chars}")
    short = np.array([alphabet == _OMNIGLOT_SHORT_ALPHABET for _, alphabet in ids])
    if short.sum() != _OMNIGLOT_SHORT_COUNT:
        raise DataError(
            f"{path}: {short.sum()} characters of alphabet {_OMNIGLOT_SHORT_ALPHABET}, "
            f"expected {_OMNIGLOT_SHORT_COUNT}"
        )
    return short


def _read_raw_images(path: Path, n_chars: int) -> np.ndarray:
    """The bool [n_chars, 20, 105, 105] ``images`` array of a raw OMNIGLOT npz."""
    shape = (n_chars, _OMNIGLOT_DRAWERS, _OMNIGLOT_RAW_SIDE, _OMNIGLOT_RAW_SIDE)
    try:
        with (
            path.open("rb") as f,
            np.load(f, allow_pickle=False) as npz,
        ):  # own file: closed on errors too
            if "images" not in npz.files:
                raise DataError(
                    f"{path}: no 'images' array (found {sorted(npz.files)}), expected bool {shape}"
                )
            images = npz["images"]
    except DataError:
        raise
    except (
        Exception
    ) as e:  # numpy's header parser can raise SyntaxError, TokenError, ... (found by fuzzing)
        raise DataError(
            f"{path}: cannot read npz file (truncated or corrupted?): {type(e).__name__}: {e}"
        ) from e
    if images.dtype != np.bool_ or images.shape != shape:
        raise DataError(f"{path}: 'images' is {images.dtype} {images.shape}, expected bool {shape}")
    return images


def _resize_ink(images: np.ndarray, batch: int = 2048) -> np.ndarray:
    """Bool [..., 105, 105] (True = background) -> float32 ink [..., 784] by area averaging."""
    flat = images.reshape(-1, 1, _OMNIGLOT_RAW_SIDE, _OMNIGLOT_RAW_SIDE)
    out = np.empty((flat.shape[0], N_PIXELS), dtype=np.float32)
    for start in range(0, flat.shape[0], batch):
        ink = torch.from_numpy(~flat[start : start + batch]).float()
        small = F.interpolate(ink, size=(IMAGE_SIDE, IMAGE_SIDE), mode="area")
        out[start : start + batch] = small.reshape(-1, N_PIXELS).numpy()
    return out.reshape(*images.shape[:-2], N_PIXELS)


def _build_omniglot_from_raw(omniglot_dir: Path, seed: int) -> dict[str, np.ndarray]:
    """Rebuild the 28x28 train/test split from the raw images (see the module docstring)."""
    short = _read_characters_csv(omniglot_dir / _OMNIGLOT_CSV)
    raw = [_read_raw_images(omniglot_dir / name, n) for name, n in _OMNIGLOT_RAW.items()]
    ink = _resize_ink(np.concatenate(raw))  # [1623, 20, 784], char_id order
    rng = np.random.default_rng(seed)
    train, test = [], []
    for char, drawers in enumerate(ink):
        perm = rng.permutation(_OMNIGLOT_DRAWERS)
        n_test = _OMNIGLOT_DRAWERS - _OMNIGLOT_TRAIN_DRAWERS - int(short[char])
        train.append(drawers[perm[:_OMNIGLOT_TRAIN_DRAWERS]])
        test.append(drawers[perm[_OMNIGLOT_TRAIN_DRAWERS : _OMNIGLOT_TRAIN_DRAWERS + n_test]])
    out = {"train": np.concatenate(train), "test": np.concatenate(test)}
    for split, n in (("train", OMNIGLOT_TRAIN_SIZE), ("test", OMNIGLOT_TEST_SIZE)):
        _check_split(omniglot_dir, split, out[split], n)  # a bug here is ours, but fail loudly
    return out


def _omniglot_fingerprint(omniglot_dir: Path, seed: int) -> str:
    """sha256 over the raw source files, the seed and the construction method."""
    h = hashlib.sha256(f"{_OMNIGLOT_METHOD} seed={seed}\n".encode())
    for name in [*_OMNIGLOT_RAW, _OMNIGLOT_CSV]:
        path = omniglot_dir / name
        try:
            h.update(f"{name} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
        except OSError as e:
            raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e
    return h.hexdigest()


def _fallback_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("iwae"))


def _read_cache(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The cached split if ``path`` holds a valid one for ``fingerprint``, else None."""
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            if str(npz["fingerprint"]) != fingerprint:
                log.info("OMNIGLOT cache %s is stale; rebuilding", path)
                return None
            out = {"train": npz["train"], "test": npz["test"]}
        for split, n in (("train", OMNIGLOT_TRAIN_SIZE), ("test", OMNIGLOT_TEST_SIZE)):
            if out[split].dtype != np.float32:
                raise DataError(f"{path}: {split} has dtype {out[split].dtype}, expected float32")
            _check_split(path, split, out[split], n)
    except Exception as e:  # anything wrong with a cache means: rebuild it
        log.warning("ignoring unreadable OMNIGLOT cache %s (%s); rebuilding", path, e)
        return None
    return out


def _write_cache(paths: Sequence[Path], fingerprint: str, split: dict[str, np.ndarray]) -> None:
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if not _is_writable_dir(path.parent):
            continue
        try:
            atomic_write(
                path, lambda f: np.savez_compressed(f, fingerprint=np.array(fingerprint), **split)
            )
        except OSError as e:
            log.warning("cannot write OMNIGLOT cache %s: %s", path, e)
            continue
        log.info("cached OMNIGLOT 28x28 split in %s", path)
        return
    log.warning("OMNIGLOT 28x28 split not cached: no writable cache directory")


def load_omniglot(data_dir: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """OMNIGLOT 28x28 as float32 [N, 784] in [0, 1]: ``"train"`` (24,345) and ``"test"`` (8,070).

    Uses ``DATA_DIR/omniglot/chardata.mat`` if present, else rebuilds the split from
    the raw images with seed :data:`OMNIGLOT_SPLIT_SEED` (cached on disk).
    """
    omniglot_dir = resolve_data_dir(data_dir) / "omniglot"
    chardata = omniglot_dir / "chardata.mat"
    if chardata.is_file():
        return _load_chardata(chardata)

    sources = [*_OMNIGLOT_RAW, _OMNIGLOT_CSV]
    missing = [name for name in sources if not (omniglot_dir / name).is_file()]
    if missing:
        raise DataError(
            f"OMNIGLOT not found in {omniglot_dir}: place chardata.mat, or "
            f"{', '.join(sources)} there (missing: {', '.join(missing)}), "
            "or pass --data-dir / set IWAE_DATA"
        )
    seed = OMNIGLOT_SPLIT_SEED
    fingerprint = _omniglot_fingerprint(omniglot_dir, seed)
    name = f"omniglot28_split{seed}.npz"
    cache_paths = [omniglot_dir / name, _fallback_cache_dir() / name]
    for path in cache_paths:
        if path.is_file() and (cached := _read_cache(path, fingerprint)) is not None:
            return cached
    log.info("building OMNIGLOT 28x28 split from the raw images in %s", omniglot_dir)
    split = _build_omniglot_from_raw(omniglot_dir, seed)
    _write_cache(cache_paths, fingerprint, split)
    return split


# --------------------------------------------------------------------------- common API


@dataclass(frozen=True)
class Dataset:
    """Images as float32 [N, D] in [0, 1] (read-only arrays, shared between loads).

    ``image_shape`` is the shape of one image (``(H, W)``, or ``(D,)`` for flat data);
    ``binary``: the training images are all 0 or 1, and are used as they are (binarizing
    them again would give the same images); ``path`` and ``sha256``: for a dataset read
    from files, its absolute path and :func:`content_sha256`.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    validation: np.ndarray | None = None
    image_shape: tuple[int, ...] = (IMAGE_SIDE, IMAGE_SIDE)
    binary: bool = False
    path: str | None = None
    sha256: str | None = None

    @property
    def x_dim(self) -> int:
        """Pixels per image, D."""
        return int(self.train.shape[1])


@functools.lru_cache(maxsize=4)
def _load_dataset_cached(name: str, data_dir: Path, validation: bool) -> Dataset:
    if name == "mnist":
        arrays = load_mnist(data_dir, validation=validation)
    else:
        if validation:
            raise IwaeError(
                "a validation split is only defined for mnist (the last 400 training images)"
            )
        arrays = load_omniglot(data_dir)
    for array in arrays.values():
        array.flags.writeable = False
    return Dataset(name=name, **arrays)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    validation: bool = False,
    eight_bit: bool = False,
) -> Dataset:
    """Load ``"mnist"`` or ``"omniglot"`` (cached in-process per resolved data dir), or
    anything else as the path of the user's own data (:func:`load_files`, not cached;
    ``validation`` does not apply: a ``validation`` split in the files is always held out;
    ``eight_bit``: integer arrays hold 8-bit levels). The built-in sets are v / 255 of
    their files' bytes already (MNIST: the 256 levels of its 8-bit images)."""
    key = name.lower()
    if key in DATASETS:
        return _load_dataset_cached(key, resolve_data_dir(data_dir), bool(validation))
    if validation:
        raise IwaeError(
            "--validation holds out MNIST's last 400 training images; a dataset read from files "
            "keeps its own validation split apart instead"
        )
    return load_files(name, eight_bit=eight_bit)


# --------------------------------------------------------------------------- own data from files

#: the splits of a dataset read from files; ``validation`` is optional
FILE_SPLITS = ("train", "validation", "test")
_REQUIRED_SPLITS = ("train", "test")


def load_files(path: str | os.PathLike[str], eight_bit: bool = False) -> Dataset:
    """The user's own images: an ``.npz`` file (:func:`read_npz_images`) or a directory of
    PNG images (:func:`read_png_dir`), checked (:func:`_checked_splits`) and hashed.

    With ``eight_bit`` (the logistic-256 likelihood), arrays of integers (``uint8``) hold
    the levels v = 0..255 of 8-bit images and are read as v / 255 (8-bit PNGs are v / 255
    in any case); otherwise, and for arrays of floats, values must lie in [0, 1].

    Raises :class:`DataError` naming the file and what is wrong: not found, unreadable, a
    missing or empty split, images of different sizes, values outside [0, 1].
    """
    given = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise IwaeError(
            f"--dataset {given}: neither a built-in dataset ({', '.join(DATASETS)}) "
            "nor an existing .npz file or directory"
        )
    path = path.resolve()
    if path.is_dir():
        arrays = read_png_dir(path)
    elif path.suffix.lower() == ".npz":
        arrays = read_npz_images(path)
    else:
        raise DataError(
            f"{path}: expected an .npz file or a directory with train/ and test/ of PNG images"
        )
    splits, image_shape = _checked_splits(path, arrays, eight_bit)
    binary = _is_binary(splits["train"])  # what training uses as it is (validation is held out)
    for array in splits.values():
        array.flags.writeable = False
    return Dataset(
        name=str(path),
        image_shape=image_shape,
        binary=binary,
        path=str(path),
        sha256=content_sha256(splits, image_shape),
        **splits,
    )


def from_arrays(
    train,
    test,
    validation=None,
    name: str = "arrays",
    image_shape: Sequence[int] | None = None,
    eight_bit: bool = False,
) -> Dataset:
    """Images given in memory (NumPy arrays, torch tensors or anything ``np.asarray`` takes)
    as a :class:`Dataset`, checked as files are (:func:`_checked_splits`: [N, H, W] or
    [N, D], values in [0, 1]) and hashed (:func:`content_sha256`), so that a resumed run
    is checked to continue on the same images. ``image_shape``: the shape of one image for
    flat [N, D] arrays (e.g. ``(28, 28)``; default ``(D,)``). ``eight_bit``: integer arrays
    hold the levels 0..255 of 8-bit images, read as v / 255 (:func:`load_files`)."""
    given = {"train": train, "test": test, "validation": validation}
    arrays = {}
    for split, value in given.items():
        if value is None:
            continue
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        arrays[split] = np.asarray(value)
    splits, shape = _checked_splits(Path(f"<{name}>"), arrays, eight_bit)
    if image_shape is not None:
        if int(np.prod(image_shape)) != splits["train"].shape[1]:
            raise DataError(
                f"image_shape {list(image_shape)} does not hold the {splits['train'].shape[1]} "
                "values of each image"
            )
        shape = tuple(int(d) for d in image_shape)
    for array in splits.values():
        array.flags.writeable = False
    return Dataset(
        name=name,
        image_shape=shape,
        binary=_is_binary(splits["train"]),
        sha256=content_sha256(splits, shape),
        **splits,
    )


def read_npz_images(path: Path) -> dict[str, np.ndarray]:
    """The arrays ``train``, ``test`` and (if present) ``validation`` of an ``.npz`` file,
    as stored (other arrays in the file are ignored)."""
    try:
        with (
            path.open("rb") as f,
            np.load(f, allow_pickle=False) as npz,
        ):  # own file: closed on errors too
            missing = [s for s in _REQUIRED_SPLITS if s not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing split {', '.join(repr(m) for m in missing)} (found arrays "
                    f"{sorted(npz.files)}; expected 'train' and 'test', optionally 'validation')"
                )
            return {s: npz[s] for s in FILE_SPLITS if s in npz.files}
    except DataError:
        raise
    except (
        Exception
    ) as e:  # numpy and zipfile raise many types on corrupted files (found by fuzzing)
        raise DataError(
            f"{path}: cannot read npz file (not an .npz, truncated or corrupted?): "
            f"{type(e).__name__}: {e}"
        ) from e


def read_png_dir(path: Path) -> dict[str, np.ndarray]:
    """The PNG images (``*.png``, in the order of their names) of ``path/train``,
    ``path/test`` and, if present, ``path/validation``, as float32 [N, H, W] grey values
    (:func:`read_png`); other files are ignored."""
    missing = [s for s in _REQUIRED_SPLITS if not (path / s).is_dir()]
    if missing:
        raise DataError(
            f"{path}: missing split {', '.join(f'{m}/' for m in missing)} "
            "(expected train/ and test/ of PNG images, optionally validation/)"
        )
    out = {}
    for split in FILE_SPLITS:
        folder = path / split
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
        if not files:
            raise DataError(f"{folder}: empty split: no .png images")
        images = [read_png(f) for f in files]
        for f, image in zip(files, images):
            if image.shape != images[0].shape:
                raise DataError(
                    f"{f}: image of size {_size(image.shape)}, but {files[0].name} is "
                    f"{_size(images[0].shape)}: all images must have one size"
                )
        out[split] = np.stack(images)
    return out


def _size(shape: tuple[int, ...]) -> str:
    """``(H, W)`` as ``WxH`` (width first, as image viewers say it), ``(D,)`` as ``D``."""
    return f"{shape[1]}x{shape[0]}" if len(shape) == 2 else "x".join(map(str, shape))


def read_png(path: Path) -> np.ndarray:
    """One PNG image as float32 [H, W] grey values in [0, 1]: 8-bit pixels / 255, 16-bit
    ones / 65535, 1-bit ones 0 or 1; colour (and palette) images converted to grey
    (luminance), transparency ignored."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise DataError(f"{path}: not a PNG image (found {image.format})")
            image.load()
            if image.mode == "1":
                return np.asarray(image, dtype=np.float32)
            if image.mode.startswith("I"):  # 16-bit grey
                return (np.asarray(image, dtype=np.float64) / 65535.0).astype(np.float32)
            return np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255.0)
    except DataError:
        raise
    except Exception as e:  # Pillow raises many types on corrupted files
        raise DataError(
            f"{path}: cannot read PNG image (truncated or corrupted?): {type(e).__name__}: {e}"
        ) from e


def _checked_splits(
    path: Path, arrays: dict[str, np.ndarray], eight_bit: bool = False
) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Each split as float32 [N, D] (:func:`_checked_images`; ``eight_bit``: integer arrays
    are 8-bit levels, :func:`_eight_bit_levels`), and the shape of one image, the same in
    every split: ``(H, W)`` from [N, H, W] arrays, ``(D,)`` from [N, D] ones."""
    if eight_bit:
        arrays = {split: _eight_bit_levels(path, split, a) for split, a in arrays.items()}
    splits = {split: _checked_images(path, split, array) for split, array in arrays.items()}
    shapes = {split: array.shape[1:] for split, array in splits.items()}
    if len(set(shapes.values())) > 1:
        sizes = ", ".join(f"{split} {list(shape)}" for split, shape in shapes.items())
        raise DataError(
            f"{path}: the splits hold images of different sizes ({sizes}); all must have one size"
        )
    image_shape = tuple(int(d) for d in shapes["train"])
    return {
        split: np.ascontiguousarray(a.reshape(a.shape[0], -1)) for split, a in splits.items()
    }, image_shape


def _checked_images(path: Path, split: str, array: np.ndarray) -> np.ndarray:
    """One split as float32, checked: real numbers, shape [N, H, W] or [N, D] with N >= 1
    and no empty dimension, every value finite and in [0, 1]."""
    if array.dtype != np.bool_ and not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise DataError(
            f"{path}: '{split}' has dtype {array.dtype}, expected real numbers in [0, 1]"
        )
    if array.ndim not in (2, 3):
        raise DataError(
            f"{path}: '{split}' has shape {list(array.shape)}, expected [N, H, W] or [N, D]"
        )
    if array.shape[0] == 0:
        raise DataError(
            f"{path}: empty split: '{split}' holds no images (shape {list(array.shape)})"
        )
    if 0 in array.shape[1:]:
        raise DataError(f"{path}: '{split}' has images of size 0 (shape {list(array.shape)})")
    if array.dtype != np.bool_:
        finite = bool(np.isfinite(array).all()) if np.issubdtype(array.dtype, np.floating) else True
        if not finite or array.min() < 0 or array.max() > 1:
            found = (
                "NaN or infinite values"
                if not finite
                else f"values from {array.min()} to {array.max()}"
            )
            raise DataError(
                f"{path}: '{split}' has values outside [0, 1] ({found}); grey images must be "
                "scaled to [0, 1] (8-bit pixels: divide by 255)"
            )
    return array.astype(np.float32)


def _eight_bit_levels(path: Path, split: str, array: np.ndarray) -> np.ndarray:
    """An integer array of 8-bit levels 0..255 as float32 v / 255 (the grid of MNIST's
    values); any other array as it is."""
    if not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return array
    if array.min() < 0 or array.max() > 255:
        raise DataError(
            f"{path}: '{split}' holds integers from {array.min()} to {array.max()}; 8-bit "
            "images (logistic-256) hold the levels 0 to 255"
        )
    return array.astype(np.float32) / np.float32(255.0)


def _is_binary(x: np.ndarray) -> bool:
    """Every value is 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def content_sha256(splits: dict[str, np.ndarray], image_shape: Sequence[int]) -> str:
    """sha256 of a dataset's content: for each split present, in the order train,
    validation, test, a line ``"<split> <N> <image shape>"`` then its images as
    little-endian float32 bytes. It depends on the values and shapes only, not on the
    file: an ``.npz`` saved again (another dtype, compression, array order in the file)
    with the same images has the same hash."""
    h = hashlib.sha256(b"iwae dataset v1\n")
    for split in FILE_SPLITS:
        if split in splits:
            images = np.ascontiguousarray(splits[split], dtype="<f4")
            h.update(f"{split} {images.shape[0]} {list(image_shape)}\n".encode())
            h.update(images.tobytes())
    return h.hexdigest()


def display_shape(image_shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D shape in which images of ``image_shape`` are drawn: ``(H, W)`` itself; flat
    ``(D,)`` data as a square if D is one, else as one row of D pixels."""
    if len(image_shape) == 2:
        return int(image_shape[0]), int(image_shape[1])
    d = int(np.prod(image_shape))
    side = math.isqrt(d)
    return (side, side) if side * side == d else (1, d)


def binarize_fixed(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """One fixed Bernoulli sample of ``x`` (values in [0, 1]) as float32 0/1.

    Used to binarize test sets once, as in Burda et al.; the same ``seed`` gives the
    same sample on every call (numpy ``default_rng``/PCG64).
    """
    x = np.asarray(x)
    if x.size and not (x.min() >= 0.0 and x.max() <= 1.0):
        raise ValueError("binarize_fixed expects probabilities in [0, 1]")
    u = np.random.default_rng(seed).random(x.shape, dtype=np.float32)
    return (u < x).astype(np.float32)


#: seed of the random test subsets (``--n-test N``, the test bounds logged in training)
TEST_SUBSET_SEED = 0


def test_subset_indices(
    size: int, n: int | None = None, seed: int = TEST_SUBSET_SEED
) -> np.ndarray:
    """Indices (sorted) of a seeded random subset of ``n`` of ``size`` test images; all of
    them when ``n`` is None or >= ``size``.

    The subset is the first ``n`` entries of one fixed permutation, so subsets of one test
    set are nested (the 1,000-image subset lies inside the 2,000-image one) and drawn
    across the whole set: test sets may be ordered (OMNIGLOT's is, by alphabet), so the
    first ``n`` images are not a fair sample.
    """
    if n is None or n >= size:
        return np.arange(size)
    if n < 1:
        raise IwaeError(f"a test subset needs at least 1 image, got {n}")
    return np.sort(np.random.default_rng(seed).permutation(size)[:n])


def test_subset_record(size: int, n: int | None = None) -> dict:
    """What ``evaluation.json`` says of the test images used: the test set's size and,
    for a random subset, its seed (None when the whole set was used)."""
    subset = n is not None and n < size
    return {"test_set_size": int(size), "test_subset_seed": TEST_SUBSET_SEED if subset else None}


test_subset_indices.__test__ = test_subset_record.__test__ = (
    False  # not tests, for pytest's collection
)


def binarized_test(dataset: Dataset, n: int | None = None) -> np.ndarray:
    """The test set of ``dataset`` binarized once with the fixed seed 0 (every image gets
    the same 0/1 pixels on every call, whatever ``n``), then the seeded random subset of
    ``n`` images (:func:`test_subset_indices`; default all): the test images every
    evaluation and every logged test bound uses."""
    return binarize_fixed(dataset.test, seed=0)[test_subset_indices(dataset.test.shape[0], n)]


def test_images(dataset: Dataset, n: int | None = None, binarize: bool = True) -> np.ndarray:
    """The test images every evaluation uses: :func:`binarized_test` for a likelihood of
    binary pixels (``binarize``, Bernoulli), else the test set as it is (grey or 8-bit
    values), restricted alike to the seeded random subset of ``n`` images."""
    if binarize:
        return binarized_test(dataset, n)
    index = test_subset_indices(dataset.test.shape[0], n)
    return np.ascontiguousarray(dataset.test[index], dtype=np.float32)


test_images.__test__ = False  # not a test, for pytest's collection


def tile_images(
    images: np.ndarray,
    side: int = 28,
    cols: int | None = None,
    pad: int = 1,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Arrange ``images`` [n, H*W] in a grid with ``pad`` pixels of border: tiles of
    ``shape`` (an image shape, drawn as :func:`display_shape` says), else side x side."""
    h, w = display_shape(shape) if shape is not None else (side, side)
    images = np.asarray(images, dtype=np.float32).reshape(-1, h, w)
    n = images.shape[0]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid
