"""Localisation metrics: how well a saliency map picks out a ground-truth region, per image, batched.

Every function takes saliency maps `s` (B, H, W) and masks (B, H, W) marking the region `M` that
should matter (an object, a lesion, the pixels a human marked): boolean, or values binarised as
`M = mask >= threshold` (default 0.5). It returns one float per image (B,), NaN where the value is
undefined (an empty `M`, and every sample where the optional `valid` (B,) is False or 0, e.g. the
padding of a last evaluation batch or a sample without a human map). Aggregate with
`finite_sum_count` (under `jit`, per batch) or `aggregate` (NumPy, whole set).

The functions are pure and `jit`/`vmap`-compatible; shapes are checked before tracing. They take
the map as given: pass `jnp.abs(s)` for the absolute-value convention of input gradients.

Names and conventions follow Quantus (Hedstroem et al., "Quantus: An Explainable AI Toolkit for
Responsible Evaluation of Neural Network Explanations and Beyond", JMLR 2023) with `abs=False`;
Quantus's default max-normalisation does not change any of these values (each is invariant to
scaling the map by a positive number). One deliberate difference: where the k-th highest value is
tied, Quantus breaks the tie by its sort order; here the tied pixels share the remaining places in
expectation (the mean over uniformly random tie-breaking), so results do not depend on pixel order
(constant maps score the area fraction of `M`). Both agree whenever the cut-off value is unique.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saljax.metrics._common import apply_valid, as_float, check_maps, check_valid


def _flat(saliency: ArrayLike, mask: ArrayLike, threshold: ArrayLike) -> tuple[jax.Array, jax.Array]:
    s = as_float(saliency)
    m = jnp.asarray(mask)
    m = m if m.dtype == jnp.bool_ else m >= threshold
    return s.reshape(s.shape[0], -1), m.reshape(m.shape[0], -1)


def _check(fn: str, saliency: ArrayLike, mask: ArrayLike, valid: ArrayLike | None) -> None:
    check_maps(fn, saliency, mask)
    check_valid(fn, valid, jnp.shape(saliency)[0])


def _expected_top_k_hits(s: jax.Array, m: jax.Array, k: jax.Array) -> jax.Array:
    """Expected number of mask pixels among the k highest of each row of s (B, P), ties shared; (B,).

    `k` (B,) is clipped to [1, P]. Pixels above the k-th highest value all count; the `k - n_above`
    remaining places go to the tied pixels at that value, each equally likely.
    """
    k = jnp.clip(k, 1, s.shape[1])
    kth = jnp.take_along_axis(-jnp.sort(-s, axis=1), (k - 1)[:, None], axis=1)
    above, tie = s > kth, s == kth
    hits_above = jnp.sum(above & m, axis=1).astype(s.dtype)
    free = (k - jnp.sum(above, axis=1)).astype(s.dtype)
    return hits_above + free * jnp.sum(tie & m, axis=1).astype(s.dtype) / jnp.sum(tie, axis=1).astype(s.dtype)


def _undefined_if_empty(values: jax.Array, m: jax.Array, valid: ArrayLike | None) -> jax.Array:
    return apply_valid(jnp.where(jnp.any(m, axis=1), values, jnp.nan), valid)


@jax.jit
def _pointing_game(saliency: jax.Array, mask: jax.Array, threshold: jax.Array, valid: jax.Array | None) -> jax.Array:
    s, m = _flat(saliency, mask, threshold)
    # The top-1 case of `_expected_top_k_hits` without a sort: the tied maxima share the hit.
    at_max = s == jnp.max(s, axis=1, keepdims=True)
    hit = jnp.sum(at_max & m, axis=1).astype(s.dtype) / jnp.sum(at_max, axis=1).astype(s.dtype)
    return _undefined_if_empty(hit, m, valid)


def pointing_game(
    saliency: ArrayLike, mask: ArrayLike, *, threshold: float = 0.5, valid: ArrayLike | None = None
) -> jax.Array:
    """Whether the maximum of the map lies inside `M`: (B,) in [0, 1] (Zhang et al., IJCV 2018).

    With several pixels at the maximum, the fraction of them inside `M` (a random tie-break's
    expected hit; Quantus counts a hit when any of them is inside), so a constant map scores the
    area fraction of `M`. Values as given (Quantus `PointingGame`, `abs=False`). NaN for an empty `M`.
    Args: saliency (B, H, W); mask (B, H, W); threshold binarises a non-boolean mask; valid (B,).
    """
    _check("pointing_game", saliency, mask, valid)
    return _pointing_game(saliency, mask, threshold, valid)


@jax.jit
def _attribution_localisation(saliency: jax.Array, mask: jax.Array, threshold: jax.Array, valid: jax.Array | None) -> jax.Array:
    s, m = _flat(saliency, mask, threshold)
    positive = jnp.maximum(s, 0.0)
    total = jnp.sum(positive, axis=1)
    inside = jnp.sum(jnp.where(m, positive, 0.0), axis=1)
    return _undefined_if_empty(jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0), m, valid)


def attribution_localisation(
    saliency: ArrayLike, mask: ArrayLike, *, threshold: float = 0.5, valid: ArrayLike | None = None
) -> jax.Array:
    """Share of the POSITIVE attribution that falls inside `M`: `sum_M s+ / sum s+`, (B,) in [0, 1].

    Kohlbrenner et al., "Towards best practice in explaining neural network decisions with LRP",
    IJCNN 2020 (Quantus `AttributionLocalisation` with `abs=False, positive_attributions=True`,
    `weighted=False`; Quantus's default `abs=True` would use |s| instead: pass `jnp.abs(s)`).
    0 for a map without positive values; NaN for an empty `M`.
    Args: saliency (B, H, W); mask (B, H, W); threshold binarises a non-boolean mask; valid (B,).
    """
    _check("attribution_localisation", saliency, mask, valid)
    return _attribution_localisation(saliency, mask, threshold, valid)


@functools.partial(jax.jit, static_argnames="k")
def _top_k_intersection(
    saliency: jax.Array, mask: jax.Array, threshold: jax.Array, valid: jax.Array | None, k: int
) -> jax.Array:
    s, m = _flat(saliency, mask, threshold)
    hits = _expected_top_k_hits(s, m, jnp.full(s.shape[0], k, jnp.int32))
    return _undefined_if_empty(hits / k, m, valid)


def top_k_intersection(
    saliency: ArrayLike, mask: ArrayLike, k: int, *, threshold: float = 0.5, valid: ArrayLike | None = None
) -> jax.Array:
    """Share of the k highest pixels of the map that lie inside `M`: (B,) in [0, 1].

    Theiner et al., "Interpretable semantic photo geolocation", WACV 2022 (Quantus
    `TopKIntersection`, `concept_influence=False`; Quantus's default k is 1000). Ties at the k-th
    value are shared in expectation. NaN for an empty `M`.
    Args: saliency (B, H, W); mask (B, H, W); k a Python int in [1, H * W]; threshold; valid (B,).
    """
    _check("top_k_intersection", saliency, mask, valid)
    pixels = jnp.shape(saliency)[1] * jnp.shape(saliency)[2]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= pixels:
        raise ValueError(f"top_k_intersection: k must be an int in [1, H * W = {pixels}]; got {k!r}")
    return _top_k_intersection(saliency, mask, threshold, valid, k=k)


@jax.jit
def _relevance_rank_accuracy(saliency: jax.Array, mask: jax.Array, threshold: jax.Array, valid: jax.Array | None) -> jax.Array:
    s, m = _flat(saliency, mask, threshold)
    size = jnp.sum(m, axis=1)
    hits = _expected_top_k_hits(s, m, size)
    return _undefined_if_empty(hits / jnp.maximum(size, 1).astype(s.dtype), m, valid)


def relevance_rank_accuracy(
    saliency: ArrayLike, mask: ArrayLike, *, threshold: float = 0.5, valid: ArrayLike | None = None
) -> jax.Array:
    """Share of the |M| highest pixels of the map that lie inside `M`: (B,) in [0, 1].

    Arras, Osman, Samek, "CLEVR-XAI: A benchmark dataset for the ground truth evaluation of neural
    network explanations", Information Fusion 2022 (Quantus `RelevanceRankAccuracy`). Ties at the
    |M|-th value are shared in expectation. NaN for an empty `M`.
    Args: saliency (B, H, W); mask (B, H, W); threshold binarises a non-boolean mask; valid (B,).
    """
    _check("relevance_rank_accuracy", saliency, mask, valid)
    return _relevance_rank_accuracy(saliency, mask, threshold, valid)


@jax.jit
def _relevance_mass_accuracy(saliency: jax.Array, mask: jax.Array, threshold: jax.Array, valid: jax.Array | None) -> jax.Array:
    s, m = _flat(saliency, mask, threshold)
    total = jnp.sum(s, axis=1)
    inside = jnp.sum(jnp.where(m, s, 0.0), axis=1)
    value = jnp.where(total != 0, inside / jnp.where(total != 0, total, 1.0), jnp.nan)
    return _undefined_if_empty(value, m, valid)


def relevance_mass_accuracy(
    saliency: ArrayLike, mask: ArrayLike, *, threshold: float = 0.5, valid: ArrayLike | None = None
) -> jax.Array:
    """Share of the map's total value that lies inside `M`: `sum_M s / sum s`, (B,).

    Arras, Osman, Samek, Information Fusion 2022 (Quantus `RelevanceMassAccuracy`, values as
    given). In [0, 1] for non-negative maps; for signed maps pass `jnp.maximum(s, 0)` (as CLEVR-XAI
    does with positive relevance; then this equals `attribution_localisation`) or `jnp.abs(s)`.
    NaN for an empty `M` or a map summing to 0.
    Args: saliency (B, H, W); mask (B, H, W); threshold binarises a non-boolean mask; valid (B,).
    """
    _check("relevance_mass_accuracy", saliency, mask, valid)
    return _relevance_mass_accuracy(saliency, mask, threshold, valid)


@jax.jit
def _pixel_auc(saliency: jax.Array, mask: jax.Array, threshold: jax.Array, valid: jax.Array | None) -> jax.Array:
    s, m = _flat(saliency, mask, threshold)
    pos = jnp.sum(m, axis=1)
    neg = s.shape[1] - pos
    # For each pixel: how many outside pixels score below it / at most as high (sentinel +inf for inside ones).
    outside_sorted = jnp.sort(jnp.where(m, jnp.inf, s), axis=1)
    below = jax.vmap(functools.partial(jnp.searchsorted, side="left"))(outside_sorted, s)
    at_most = jnp.minimum(jax.vmap(functools.partial(jnp.searchsorted, side="right"))(outside_sorted, s), neg[:, None])
    # Mann-Whitney: each (inside, outside) pair counts 1 when ordered right, 1/2 when tied.
    wins = below.astype(s.dtype) + 0.5 * (at_most - below).astype(s.dtype)
    pairs = (pos * neg).astype(s.dtype)
    auc = jnp.sum(jnp.where(m, wins, 0.0), axis=1) / jnp.maximum(pairs, 1.0)
    return apply_valid(jnp.where((pos > 0) & (neg > 0), auc, jnp.nan), valid)


def pixel_auc(
    saliency: ArrayLike, mask: ArrayLike, *, threshold: float = 0.5, valid: ArrayLike | None = None
) -> jax.Array:
    """ROC AUC of the map's pixel values as a predictor of `M`, per image: (B,) in [0, 1].

    Exact Mann-Whitney statistic: the share of (inside, outside) pixel pairs the map orders right,
    a tie counting one half, which is the trapezoidal ROC area with average ranks over ties (as
    scikit-learn's `roc_auc_score`; Fawcett, Pattern Recognition Letters 2006; Quantus `AUC`).
    1 when every pixel of `M` outscores every other pixel, 0.5 for a constant map, 0 reversed;
    NaN when `M` is empty or covers the whole image.
    Args: saliency (B, H, W); mask (B, H, W); threshold binarises a non-boolean mask; valid (B,).
    """
    _check("pixel_auc", saliency, mask, valid)
    return _pixel_auc(saliency, mask, threshold, valid)


@jax.jit
def _energy_pointing_game(saliency: jax.Array, mask: jax.Array, threshold: jax.Array, valid: jax.Array | None) -> jax.Array:
    s, m = _flat(saliency, mask, threshold)
    positive = jnp.maximum(s, 0.0)
    low, high = jnp.min(positive, axis=1, keepdims=True), jnp.max(positive, axis=1, keepdims=True)
    spread = high - low
    energy = (positive - low) / jnp.where(spread > 0, spread, 1.0)
    value = jnp.sum(jnp.where(m, energy, 0.0), axis=1) / jnp.maximum(jnp.sum(energy, axis=1), jnp.finfo(s.dtype).tiny)
    return _undefined_if_empty(jnp.where(spread[:, 0] > 0, value, jnp.nan), m, valid)


def energy_pointing_game(
    saliency: ArrayLike, mask: ArrayLike, *, threshold: float = 0.5, valid: ArrayLike | None = None
) -> jax.Array:
    """Energy-based pointing game: share of the normalised map's energy inside `M`, (B,) in [0, 1].

    Wang et al., "Score-CAM: Score-weighted visual explanations for convolutional neural networks",
    CVPR Workshops 2020: the map is rectified and min-max normalised per image as Score-CAM does
    (`e = (s+ - min s+) / (max s+ - min s+)`), then `sum_M e / sum e`. Equals
    `attribution_localisation` whenever some pixel is <= 0. NaN for a constant map (Score-CAM gives
    no map then) and for an empty `M`. Not part of Quantus.
    Args: saliency (B, H, W); mask (B, H, W); threshold binarises a non-boolean mask; valid (B,).
    """
    _check("energy_pointing_game", saliency, mask, valid)
    return _energy_pointing_game(saliency, mask, threshold, valid)


@jax.jit
def _saliency_iou(saliency: jax.Array, mask: jax.Array, threshold: jax.Array, valid: jax.Array | None) -> jax.Array:
    s, m = _flat(saliency, mask, threshold)
    size = jnp.sum(m, axis=1)
    inter = _expected_top_k_hits(s, m, size)
    union = 2.0 * size.astype(s.dtype) - inter
    return _undefined_if_empty(inter / jnp.maximum(union, 1.0), m, valid)


def saliency_iou(
    saliency: ArrayLike, mask: ArrayLike, *, threshold: float = 0.5, valid: ArrayLike | None = None
) -> jax.Array:
    """IoU of the map's |M| highest pixels with `M`: `I / (2 |M| - I)`, (B,) in [0, 1].

    As Viviano, Simpson, Dutil, Bengio, Cohen report it ("Saliency is a possible red herring when
    diagnosing poor generalization", ICLR 2021): the saliency map is binarised by keeping as many
    top pixels as the mask has, then compared with the mask. Pass |s| for input gradients. `I`,
    the intersection, shares ties at the |M|-th value in expectation. NaN for an empty `M`.
    Args: saliency (B, H, W); mask (B, H, W); threshold binarises a non-boolean mask; valid (B,).
    """
    _check("saliency_iou", saliency, mask, valid)
    return _saliency_iou(saliency, mask, threshold, valid)
