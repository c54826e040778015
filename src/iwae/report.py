"""Figures and reports: image grids now; tables against the papers build on this."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from iwae.data import atomic_write


def tile_images(images: np.ndarray, side: int = 28, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """Arrange ``images`` [n, side*side] in a grid with ``pad`` pixels of border."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, side, side)
    n = images.shape[0]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (side + pad) + pad, cols * (side + pad) + pad), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (side + pad), pad + c * (side + pad)
        grid[y : y + side, x : x + side] = img
    return grid


def save_image_grid(images: np.ndarray, path: str | Path, side: int = 28, cols: int | None = None) -> None:
    """Save images (pixel values in [0, 1], ink = 1) as a PNG grid, black ink on white, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = tile_images(images, side, cols)
    atomic_write(Path(path), lambda f: plt.imsave(f, 1.0 - grid, cmap="gray", vmin=0.0, vmax=1.0, format="png"))


def save_snr_plot(curves: list[dict], path: str | Path) -> None:
    """Plot gradient SNR against K on log-log axes, atomically as PNG: one colour per
    estimator, the encoder solid and the decoder dashed, from
    :func:`iwae.evaluate.gradient_snr_curve` results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for i, c in enumerate(curves):
        colour = f"C{i}"
        for net, style in (("encoder", "-o"), ("decoder", "--s")):
            slope = c.get(f"{net}_slope")
            label = f"{c['estimator']} {net}" + (f" (slope {slope:+.2f})" if slope is not None else "")
            ax.plot(c["k"], c[net], style, color=colour, label=label, markersize=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("mean gradient SNR")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
