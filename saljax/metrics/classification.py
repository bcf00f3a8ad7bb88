"""Classification metrics over an evaluation set: accuracy, ROC AUC and `summarize` of eval outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def fraction_inside(saliency: ArrayLike, saliency_map: ArrayLike, *, eps: float = 1e-12) -> jax.Array:
    """Fraction of non-negative saliency energy (B, H, W) that falls inside the map (B, H, W): (B,).

    `sum H * s / sum s`; a map with soft values weighs each pixel by its value. 0 where `s` is 0.
    """
    if np.shape(saliency) != np.shape(saliency_map):
        raise ValueError(f"saliency {np.shape(saliency)} and saliency_map {np.shape(saliency_map)} must have the same shape")
    s, h = jnp.asarray(saliency), jnp.asarray(saliency_map)
    axes = tuple(range(1, s.ndim))
    return jnp.sum(s * h, axis=axes) / (jnp.sum(s, axis=axes) + eps)


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
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


def summarize(outputs: Sequence[Mapping[str, ArrayLike]]) -> dict[str, float]:
    """Aggregates per-sample eval outputs (see `train.make_eval_step`) over batches.

    Returns `accuracy`, `ce`, `count`, the mean of every `loss/<term>`, `saliency_inside` (mean
    over samples with maps) and, for binary heads, `roc_auc` of the class-1 probability. A `valid`
    entry (B,) drops padding samples.
    """
    if not outputs:
        raise ValueError("summarize needs at least one batch of outputs")
    cat = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
    if "valid" in cat:
        keep = cat.pop("valid").astype(bool)
        cat = {k: v[keep] for k, v in cat.items()}
    if len(cat["ce"]) == 0:
        raise ValueError("summarize got no valid samples")
    out = {"accuracy": float(np.mean(cat["correct"])), "ce": float(np.mean(cat["ce"])), "count": len(cat["ce"])}
    out.update({k: float(np.mean(v)) for k, v in cat.items() if k.startswith("loss/")})
    if "saliency_inside" in cat:
        has_map = cat["has_map"].astype(bool)
        out["saliency_inside"] = float(np.mean(cat["saliency_inside"][has_map])) if has_map.any() else float("nan")
    logits = cat["logits"].astype(np.float64)
    if logits.shape[-1] == 2 and "label" in cat:
        # Any increasing function of z1 - z0 ranks alike; the class-1 probability is the usual one.
        p1 = 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))
        out["roc_auc"] = roc_auc(p1, cat["label"])
    return out
