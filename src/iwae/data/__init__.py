"""Datasets: MNIST and OMNIGLOT 28x28, or the user's own images from files, as float32
arrays of shape [N, D] in [0, 1] (D = 784 for the built-in sets).

:func:`load_dataset` loads either by name (or path); the test images every evaluation
uses are :func:`test_images` (binarized once, :func:`binarized_test`, and restricted to a
seeded random subset, :func:`test_subset_indices`). The parts live by concept, and their
public names are importable from here too:

- :mod:`iwae.data.dataset`   the :class:`Dataset` type and the built-in sets' names
- :mod:`iwae.data.mnist`     MNIST's IDX files, checked and downloaded (:func:`load_mnist`)
- :mod:`iwae.data.omniglot`  OMNIGLOT: Burda et al.'s file or the split rebuilt from the
  raw images (:func:`load_omniglot`)
- :mod:`iwae.data.files`     the user's own images from files or arrays (:func:`load_files`,
  :func:`from_arrays`)
- :mod:`iwae.data.store`     the data directory, atomic writes, file bytes

To replace a name in a test (``monkeypatch.setattr``), set it in the module that reads it
(``iwae.data.mnist.MNIST_MIRRORS``).

Layout of the data directory (``--data-dir``, else ``$IWAE_DATA``, else
``platformdirs.user_cache_dir("iwae")/data``)::

    DATA_DIR/
      mnist/      train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
                  t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]
      omniglot/   chardata.mat                  (the IWAE 28x28 file), or
                  images_background.npz, images_evaluation.npz, characters.csv
                  (raw Lake et al. 105x105 images, see :mod:`iwae.data.omniglot`)
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iwae.data.dataset import DATASETS, IMAGE_SIDE, Dataset
from iwae.data.files import content_sha256, from_arrays, load_files
from iwae.data.mnist import (
    _MNIST_SPLITS,
    MNIST_MD5,
    MNIST_MIRRORS,
    VALIDATION_SIZE,
    load_mnist,
    read_idx,
)
from iwae.data.omniglot import OMNIGLOT_SPLIT_SEED, OMNIGLOT_TEST_SIZE, load_omniglot
from iwae.data.store import atomic_write, resolve_data_dir
from iwae.errors import DataError, IwaeError

__all__ = [
    "DATASETS",
    "IMAGE_SIDE",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "OMNIGLOT_SPLIT_SEED",
    "TEST_SIZES",
    "TEST_SUBSET_SEED",
    "VALIDATION_SIZE",
    "DataError",
    "Dataset",
    "atomic_write",
    "binarize_fixed",
    "binarized_test",
    "content_sha256",
    "display_shape",
    "from_arrays",
    "load_dataset",
    "load_files",
    "load_mnist",
    "load_omniglot",
    "read_idx",
    "resolve_data_dir",
    "test_images",
    "test_subset_indices",
    "test_subset_record",
    "tile_images",
]

#: the size of each built-in set's test set
TEST_SIZES = {"mnist": _MNIST_SPLITS["test"][2], "omniglot": OMNIGLOT_TEST_SIZE}


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
