"""Figure helpers shared by saljax's reports (explain, experiment): matplotlib is imported lazily."""

from __future__ import annotations

import os

import numpy as np

from saljax.workdir import atomic_write


def figure(width: float, height: float):
    # A bare Figure on the Agg canvas: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | os.PathLike[str]) -> None:
    """Writes `fig` as a PNG, atomically (`saljax.workdir.atomic_write`): a failed draw keeps the old file."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(H, W, C) in any range -> an array imshow shows in [0, 1], and its colormap."""
    img = image.astype(np.float64)
    img = img[..., :3] if img.shape[-1] >= 3 else img.mean(axis=-1)
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img, (None if img.ndim == 3 else "gray")


def gray(image: np.ndarray) -> np.ndarray:
    img, _ = display_image(image)
    return img.mean(axis=-1) if img.ndim == 3 else img
