"""Figures of a suite: saliency overlays of each method on the same images, training curves."""
from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from saljax import _figures, data, explain, train
from saljax.experiment.runner import run_dir
from saljax.experiment.suite import Suite
from saljax.workdir import atomic_write
from saljax.writers import read_metrics

OVERLAY_MAPS = ("gradient", "grad_cam")


def plot_overlays(suite: Suite, workdir: str, methods: Sequence[str], path_for: Callable[[str], str],
                  *, num_images: int = 6, split: str | None = None) -> list[str]:
    """Saliency of the same test images under each method's seed-0 model, one PNG per map kind.

    The images come from the dataset most methods train on. Rows: the image with the human map's
    outline, then one row per method: the input gradient (reduced over channels as `saljax explain`
    does) or Grad-CAM of the true class, min-max scaled per image. Returns the paths written.
    """
    split = split or suite.splits[-1]
    models = {m: train.load_model(run_dir(workdir, m, 0), step="latest") for m in methods}
    # The benchmark's dataset is the one most methods train on (not a clean-data reference's).
    datasets = [cfg.dataset for _, cfg in models.values()]
    ds = max(datasets, key=lambda d: sum(d.to_json() == e.to_json() for e in datasets))
    builder = data.from_config(ds)
    batch = next(iter(data.make_loader(builder, split, num_images, shuffle=False, num_epochs=1,
                                       drop_remainder=False, mean=ds.mean, std=ds.std)))
    n = len(batch["label"])
    maps = {m: explain.explain_batch(model, batch["image"], batch["label"], methods=OVERLAY_MAPS)
            for m, (model, _) in models.items()}
    written = []
    for kind in OVERLAY_MAPS:
        fig = _figures.figure(1.6 * n + 1.2, 1.6 * (len(methods) + 1))
        grid = fig.subplots(len(methods) + 1, n, squeeze=False)
        for j in range(n):
            gray = _figures.gray(batch["image"][j])
            mask = batch["saliency_map"][j] >= 0.5
            for i, method in enumerate([None, *methods]):
                ax = grid[i, j]
                ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
                if method is not None:
                    s = maps[method]["maps"][kind][j]
                    s = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.zeros_like(s)
                    ax.imshow(s, cmap="inferno", vmin=0, vmax=1, alpha=0.65)
                    pred = int(np.argmax(maps[method]["logits"][j]))
                    ax.set_title(f"pred {pred}", fontsize=7)
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.7)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel("image" if method is None else method, fontsize=8)
            grid[0, j].set_title(f"label {int(batch['label'][j])}", fontsize=7)
        fig.suptitle(f"{suite.name}: {kind.replace('_', ' ')} saliency on {split} images (seed 0; cyan: human map)",
                     fontsize=9)
        path = path_for(f"overlays_{kind}.png")
        _save_small_png(fig, path)
        written.append(path)
    return written


def _save_small_png(fig, path: str) -> None:
    # Noisy images compress badly as RGBA; a 256-colour palette keeps the committed PNGs small.


    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    with atomic_write(path, "wb") as f:
        Image.open(buffer).convert("RGB").quantize(256).save(f, format="PNG", optimize=True)


def plot_curves(suite: Suite, workdir: str, results: Mapping[str, Sequence[Mapping[str, Any]]], path: str) -> str:
    """Training loss and `suite.curve_metric` against the step: mean over seeds, band = min..max."""
    fig = _figures.figure(10, 3.6)
    ax_loss, ax_eval = fig.subplots(1, 2)
    for method, runs in results.items():
        for ax, key in ((ax_loss, "train/loss"), (ax_eval, suite.curve_metric)):
            series = []
            for r in runs:
                rows = [row for row in read_metrics(run_dir(workdir, method, r["seed"])) if key in row]
                last = {}
                for row in rows:  # a resumed run repeats steps: keep the last value of each
                    last[row["step"]] = float(row[key])
                series.append(last)
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            values = np.array([[s[t] for t in steps] for s in series])
            line, = ax.plot(steps, values.mean(axis=0), label=method, linewidth=1.2)
            if len(series) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss (total)", fontsize=9)
    ax_eval.set_title(suite.curve_metric, fontsize=9)
    for ax in (ax_loss, ax_eval):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_eval.legend(fontsize=7)
    fig.suptitle(f"{suite.name}: mean over seeds, band = min..max", fontsize=9)
    _figures.save(fig, path)
    return path
