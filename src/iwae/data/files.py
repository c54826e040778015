"""The user's own images, from files or arrays in memory, checked and hashed.

Own data (``--dataset PATH``, :func:`load_files`) is either an ``.npz`` file with arrays
``train`` and ``test`` (and optionally ``validation``) of shape [N, H, W] or [N, D], or a
directory with ``train/`` and ``test/`` (optionally ``validation/``) holding PNG images of
one size (pixel value / 255 is the grey value: white = 1, as in MNIST's files; colour is
converted to grey). Values must lie in [0, 1] (for 8-bit data, ``eight_bit``: integer
arrays of the levels 0..255, read as v / 255); training images that are all 0 or 1 are
used as they are, grey ones are binarized dynamically as MNIST's are for a Bernoulli
likelihood (:func:`iwae.data.test_images`: the test images of either kind). A dataset read
from files carries its image shape and a content hash (:func:`content_sha256`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from iwae.data.dataset import DATASETS, Dataset
from iwae.errors import DataError, IwaeError

__all__ = [
    "FILE_SPLITS",
    "content_sha256",
    "from_arrays",
    "load_files",
    "read_npz_images",
    "read_png",
    "read_png_dir",
]

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
