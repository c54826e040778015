"""The dataset type and what every loader shares: the built-in sets' names and image size.

A :class:`Dataset` holds float32 [N, D] images in [0, 1]; the built-in sets (MNIST and
OMNIGLOT) have 28x28 images, D = 784.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DATASETS", "IMAGE_SIDE", "N_PIXELS", "Dataset"]

DATASETS = ("mnist", "omniglot")
IMAGE_SIDE = 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE


@dataclass(frozen=True)
class Dataset:
    """Images as float32 [N, D] in [0, 1] (read-only arrays, shared between loads).

    ``image_shape`` is the shape of one image (``(H, W)``, or ``(D,)`` for flat data);
    ``binary``: the training images are all 0 or 1, and are used as they are (binarizing
    them again would give the same images); ``path`` and ``sha256``: for a dataset read
    from files, its absolute path and :func:`~iwae.data.files.content_sha256`.
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
