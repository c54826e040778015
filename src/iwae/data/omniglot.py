"""OMNIGLOT 28x28, as float32 [N, 784] in [0, 1]: Burda et al.'s file, or the split rebuilt
from the raw images of Lake et al.

The files live in ``DATA_DIR/omniglot/`` (:func:`iwae.data.store.resolve_data_dir`)::

    chardata.mat                  (the IWAE 28x28 file), or
    images_background.npz, images_evaluation.npz, characters.csv
    (raw Lake et al. 105x105 images, see below)

If ``chardata.mat`` (Burda et al.'s file) is present it is used as is:
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
import hashlib
import logging
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F

from iwae.data.dataset import IMAGE_SIDE, N_PIXELS
from iwae.data.store import (
    atomic_write,
    fallback_cache_dir,
    is_writable_dir,
    read_file_bytes,
    resolve_data_dir,
)
from iwae.errors import DataError

__all__ = ["OMNIGLOT_SPLIT_SEED", "OMNIGLOT_TEST_SIZE", "OMNIGLOT_TRAIN_SIZE", "load_omniglot"]

log = logging.getLogger(__name__)

OMNIGLOT_SPLIT_SEED = 0
OMNIGLOT_TRAIN_SIZE = 24345
OMNIGLOT_TEST_SIZE = 8070
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
        digest = hashlib.sha256(read_file_bytes(omniglot_dir / name)).hexdigest()
        h.update(f"{name} {digest}\n".encode())
    return h.hexdigest()


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
        if not is_writable_dir(path.parent):
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
    cache_paths = [omniglot_dir / name, fallback_cache_dir() / name]
    for path in cache_paths:
        if path.is_file() and (cached := _read_cache(path, fingerprint)) is not None:
            return cached
    log.info("building OMNIGLOT 28x28 split from the raw images in %s", omniglot_dir)
    split = _build_omniglot_from_raw(omniglot_dir, seed)
    _write_cache(cache_paths, fingerprint, split)
    return split
