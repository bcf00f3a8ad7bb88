"""Evaluation metrics: accuracy, ROC AUC, and agreement of saliency with human maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any


def fraction_inside(saliency: Array, saliency_map: Array, *, eps: float = 1e-12) -> Array:
    """Fraction of non-negative saliency energy (B, H, W) that falls inside the map (B, H, W): (B,).

    `sum H * s / sum s`; a map with soft values weighs each pixel by its value. 0 where `s` is 0.
    """
    if saliency.shape != saliency_map.shape:
        raise ValueError(f"saliency {saliency.shape} and saliency_map {saliency_map.shape} must have the same shape")
    axes = tuple(range(1, saliency.ndim))
    return jnp.sum(saliency * saliency_map, axis=axes) / (jnp.sum(saliency, axis=axes) + eps)


def roc_auc(scores: Array, labels: Array) -> float:
    """Area under the ROC curve of `scores` (N,) for binary `labels` (N,) in {0, 1}.

    The Mann-Whitney statistic with tied scores counted one half; NaN when a class is absent.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must both have shape (N,); got {scores.shape} and {labels.shape}")
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties (1-based).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start:start + count]] = start + (count + 1) / 2.0
    rank_sum = ranks[labels == 1].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def summarize(outputs: Sequence[Mapping[str, Array]]) -> dict[str, float]:
    """Aggregates per-sample eval outputs (see `train.make_eval_step`) over batches.

    Returns `accuracy`, `ce`, `saliency_inside` (mean over samples with maps) and, for binary
    heads, `roc_auc` of the class-1 probability.
    """
    if not outputs:
        raise ValueError("summarize needs at least one batch of outputs")
    cat = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
    out = {"accuracy": float(np.mean(cat["correct"])), "ce": float(np.mean(cat["ce"])), "count": int(len(cat["ce"]))}
    if "saliency_inside" in cat:
        has_map = cat["has_map"].astype(bool)
        out["saliency_inside"] = float(np.mean(cat["saliency_inside"][has_map])) if has_map.any() else float("nan")
    logits = cat["logits"].astype(np.float64)
    if logits.shape[-1] == 2 and "label" in cat:
        # Any increasing function of z1 - z0 ranks alike; the class-1 probability is the usual one.
        p1 = 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))
        out["roc_auc"] = roc_auc(p1, cat["label"])
    return out
