"""Evaluation metrics: accuracy, ROC AUC, and agreement of saliency with human maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

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
    out = {"accuracy": float(np.mean(cat["correct"])), "ce": float(np.mean(cat["ce"])), "count": int(len(cat["ce"]))}
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


# --- agreement of a saliency map with a human map: per image, numpy ---------------------------------
#
# The functions below take a batch of 2-D saliency maps `s` (B, H, W) and human maps `H` (B, H, W)
# in [0, 1] and return one value per image (B,) as float64 numpy arrays. `s` may be signed (CAMs,
# divergence maps); energy-based metrics then use its positive part. Region metrics compare with the
# binarised map `M = H >= threshold` (threshold 0.5). NaN marks an undefined value (e.g. an empty
# map); `aggregate` skips NaN and reports how many values it used.


def _check_pair(saliency: Array, saliency_map: Array) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(saliency, np.float64)
    h = np.asarray(saliency_map, np.float64)
    if s.ndim != 3 or s.shape != h.shape:
        raise ValueError(
            f"saliency and saliency_map must both have shape (B, H, W); got {s.shape} and {h.shape}"
        )
    return s, h


def binarize_map(saliency_map: Array, threshold: float = 0.5) -> np.ndarray:
    """The region a human map marks: `H >= threshold`, bool with the shape of `saliency_map`."""
    return np.asarray(saliency_map) >= threshold


def energy_inside(saliency: Array, saliency_map: Array) -> np.ndarray:
    """Fraction of the POSITIVE saliency energy inside the map: `sum H * s+ / sum s+`, (B,).

    `s+ = max(s, 0)`; for non-negative maps this is `fraction_inside`. 0 where `s+` is all zero.
    """
    s, h = _check_pair(saliency, saliency_map)
    return np.asarray(fraction_inside(np.maximum(s, 0.0), h), np.float64)


def pixel_auc(saliency: Array, saliency_map: Array, *, threshold: float = 0.5) -> np.ndarray:
    """ROC AUC of the pixel values of `s` as a predictor of `M = H >= threshold`, per image: (B,).

    The Mann-Whitney statistic `(sum of ranks of M pixels - P(P+1)/2) / (P N)` with average ranks
    over ties (a tie counts one half), P / N the numbers of pixels inside / outside `M`. 1 when every
    map pixel outscores every other pixel, 0.5 for a constant map; NaN when `M` is empty or full.
    """
    s, h = _check_pair(saliency, saliency_map)
    from scipy.stats import rankdata  # scipy comes with jax

    flat = s.reshape(s.shape[0], -1)
    inside = binarize_map(h, threshold).reshape(s.shape[0], -1)
    ranks = rankdata(flat, method="average", axis=1)
    pos = inside.sum(axis=1).astype(np.float64)
    neg = inside.shape[1] - pos
    rank_sum = np.sum(ranks * inside, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def pointing_game(saliency: Array, saliency_map: Array, *, threshold: float = 0.5) -> np.ndarray:
    """Whether the maximum of `s` lies inside `M = H >= threshold`, per image: (B,) in [0, 1].

    With several pixels at the maximum, the fraction of them inside `M` (the expected hit when a
    tie is broken at random), so a constant map scores the map's area fraction. NaN when `M` is empty.
    """
    s, h = _check_pair(saliency, saliency_map)
    flat = s.reshape(s.shape[0], -1)
    inside = binarize_map(h, threshold).reshape(s.shape[0], -1)
    at_max = flat >= flat.max(axis=1, keepdims=True)
    hits = np.sum(at_max & inside, axis=1) / np.sum(at_max, axis=1)
    return np.where(inside.any(axis=1), hits, np.nan)


def top_q_mask(saliency: Array, q: float = 0.1) -> np.ndarray:
    """The top-q region of each map: pixels among the `ceil(q * H * W)` largest values AND positive.

    Ties at the cut-off value are all included; non-positive pixels never are (a pixel without
    positive saliency is not salient), so the region may be smaller than q, even empty.
    Args: saliency (B, H, W); q in (0, 1]. Returns bool (B, H, W).
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be a fraction in (0, 1]; got {q!r}")
    s = np.asarray(saliency, np.float64)
    if s.ndim != 3:
        raise ValueError(f"saliency must have shape (B, H, W); got {s.shape}")
    flat = s.reshape(s.shape[0], -1)
    k = max(1, int(np.ceil(q * flat.shape[1] - 1e-9)))
    # The k-th largest value of each row, without a full sort.
    kth = -np.partition(-flat, k - 1, axis=1)[:, k - 1 : k]
    return ((flat >= kth) & (flat > 0)).reshape(s.shape)


def iou(first: Array, second: Array) -> np.ndarray:
    """Intersection over union of two boolean masks (B, H, W), per image: (B,); NaN if both are empty."""
    a, b = np.asarray(first, bool), np.asarray(second, bool)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"masks must both have shape (B, H, W); got {a.shape} and {b.shape}")
    inter = np.sum(a & b, axis=(1, 2)).astype(np.float64)
    union = np.sum(a | b, axis=(1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def top_q_iou(saliency: Array, saliency_map: Array, *, q: float = 0.1, threshold: float = 0.5) -> np.ndarray:
    """IoU of the top-q region of `s` (`top_q_mask`) with `M = H >= threshold`, per image: (B,).

    At most `min(q, a) / max(q, a)` for a map covering a fraction `a` of the image.
    """
    s, h = _check_pair(saliency, saliency_map)
    return iou(top_q_mask(s, q), binarize_map(h, threshold))


def top_q_precision(
    saliency: Array, saliency_map: Array, *, q: float = 0.1, threshold: float = 0.5
) -> np.ndarray:
    """Fraction of the top-q region of `s` that lies inside `M`, per image: (B,); NaN if the region is empty."""
    s, h = _check_pair(saliency, saliency_map)
    top = top_q_mask(s, q)
    inside = np.sum(top & binarize_map(h, threshold), axis=(1, 2)).astype(np.float64)
    size = np.sum(top, axis=(1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size > 0, inside / size, np.nan)


def connected_components(mask: Array, *, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Labels the connected components of a 2-D boolean mask (H, W).

    `connectivity` 4 (edge neighbours) or 8 (edges and corners). Returns (labels int32 (H, W), 0
    outside the mask and 1..n for the components in row-major order of their first pixel; n).
    """
    from scipy import ndimage  # scipy comes with jax

    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"mask must have shape (H, W); got {m.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8; got {connectivity!r}")
    structure = np.ones((3, 3), bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    labels, n = ndimage.label(m, structure=structure)
    return labels.astype(np.int32), int(n)


class Region(NamedTuple):
    """One connected region of a map's top-q set (see `top_regions`).

    rank: 1 for the region holding the most energy; area: pixels; energy: sum of the map's
    positive values over the region; energy_fraction: energy / the map's total positive energy;
    overlap: fraction of the region's pixels inside `M` (NaN without a human map); bbox:
    (row0, col0, row1, col1), end-exclusive; centroid: energy-weighted (row, col).
    """

    rank: int
    area: int
    energy: float
    energy_fraction: float
    overlap: float
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]


def top_regions(
    values: Array,
    saliency_map: Array | None = None,
    *,
    q: float = 0.1,
    threshold: float = 0.5,
    connectivity: int = 8,
    max_regions: int | None = None,
) -> tuple[np.ndarray, list[Region]]:
    """The connected regions of a map's top-q positive set, ranked by the energy they hold.

    Args:
      values: one map (H, W), e.g. the divergence map `D = CAM_t - CAM_f`; only positive values count.
      saliency_map: the human map (H, W) in [0, 1], or None.
      q: the top-q region is `top_q_mask(values, q)`.
      threshold: `M = saliency_map >= threshold`.
      connectivity: 4 or 8 (see `connected_components`).
      max_regions: keep at most this many regions (all when None).

    Returns:
      (labels int32 (H, W): 0 outside the kept regions, r for the region of rank r; the regions).
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must have shape (H, W); got {v.shape}")
    if saliency_map is not None and np.shape(saliency_map) != v.shape:
        raise ValueError(f"saliency_map must have the shape of values {v.shape}; got {np.shape(saliency_map)}")
    positive = np.maximum(v, 0.0)
    labels, n = connected_components(top_q_mask(v[None], q)[0], connectivity=connectivity)
    if n == 0:
        return np.zeros(v.shape, np.int32), []
    index = np.arange(1, n + 1)
    from scipy import ndimage

    energy = np.asarray(ndimage.sum_labels(positive, labels, index), np.float64)
    area = np.asarray(ndimage.sum_labels(np.ones_like(v), labels, index), np.float64)
    inside = (
        np.asarray(ndimage.sum_labels(binarize_map(saliency_map, threshold).astype(np.float64), labels, index))
        if saliency_map is not None
        else np.full(n, np.nan)
    )
    total = positive.sum()
    # Highest energy first; ties keep the row-major order of the components.
    order = np.argsort(-energy, kind="stable")
    if max_regions is not None:
        order = order[: max(0, int(max_regions))]
    ranked = np.zeros(v.shape, np.int32)
    rows, cols = np.indices(v.shape)
    regions = []
    for rank, i in enumerate(order, start=1):
        where = labels == i + 1
        ranked[where] = rank
        r, c = rows[where], cols[where]
        weights = positive[where]
        wsum = weights.sum()
        centroid = (float((r * weights).sum() / wsum), float((c * weights).sum() / wsum))
        regions.append(
            Region(
                rank=rank,
                area=int(area[i]),
                energy=float(energy[i]),
                energy_fraction=float(energy[i] / total),
                overlap=float(inside[i] / area[i]),
                bbox=(int(r.min()), int(c.min()), int(r.max()) + 1, int(c.max()) + 1),
                centroid=centroid,
            )
        )
    return ranked, regions


def aggregate(values: Array) -> dict[str, float | int]:
    """Mean, standard deviation (population, ddof 0) and count of the finite entries of `values` (N,).

    NaN (undefined per-image values, samples without a map) are skipped; mean and std are NaN when
    nothing is left.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "count": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "count": int(v.size)}
