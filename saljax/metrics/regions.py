"""Agreement of a saliency map with a human map, per image in NumPy, and the regions of a map.

Region metrics compare with the binarised map `M = H >= threshold`; `top_regions` describes the
connected regions of a map's top-q set; `aggregate` summarises per-image values that may be NaN.
The batched, jit-compatible localisation metrics live in `saljax.metrics.localisation`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jax.typing import ArrayLike
from scipy import ndimage

from saljax.metrics.classification import fraction_inside

# --- agreement of a saliency map with a human map: per image, numpy ---------------------------------
#
# The functions below take a batch of 2-D saliency maps `s` (B, H, W) and human maps `H` (B, H, W)
# in [0, 1] and return one value per image (B,) as float64 numpy arrays. `s` may be signed (CAMs,
# divergence maps); energy-based metrics then use its positive part. Region metrics compare with the
# binarised map `M = H >= threshold` (threshold 0.5). NaN marks an undefined value (e.g. an empty
# map); `aggregate` skips NaN and reports how many values it used.


def _check_pair(saliency: ArrayLike, saliency_map: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(saliency, np.float64)
    h = np.asarray(saliency_map, np.float64)
    if s.ndim != 3 or s.shape != h.shape:
        raise ValueError(
            f"saliency and saliency_map must both have shape (B, H, W); got {s.shape} and {h.shape}"
        )
    return s, h


def binarize_map(saliency_map: ArrayLike, threshold: float = 0.5) -> np.ndarray:
    """The region a human map marks: `H >= threshold`, bool with the shape of `saliency_map`."""
    return np.asarray(saliency_map) >= threshold


def energy_inside(saliency: ArrayLike, saliency_map: ArrayLike) -> np.ndarray:
    """Fraction of the POSITIVE saliency energy inside the map: `sum H * s+ / sum s+`, (B,).

    `s+ = max(s, 0)`; for non-negative maps this is `fraction_inside`. 0 where `s+` is all zero.
    """
    s, h = _check_pair(saliency, saliency_map)
    return np.asarray(fraction_inside(np.maximum(s, 0.0), h), np.float64)


def top_q_mask(saliency: ArrayLike, q: float = 0.1) -> np.ndarray:
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


def iou(first: ArrayLike, second: ArrayLike) -> np.ndarray:
    """Intersection over union of two boolean masks (B, H, W), per image: (B,); NaN if both are empty."""
    a, b = np.asarray(first, bool), np.asarray(second, bool)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"masks must both have shape (B, H, W); got {a.shape} and {b.shape}")
    inter = np.sum(a & b, axis=(1, 2)).astype(np.float64)
    union = np.sum(a | b, axis=(1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def top_q_iou(saliency: ArrayLike, saliency_map: ArrayLike, *, q: float = 0.1, threshold: float = 0.5) -> np.ndarray:
    """IoU of the top-q region of `s` (`top_q_mask`) with `M = H >= threshold`, per image: (B,).

    At most `min(q, a) / max(q, a)` for a map covering a fraction `a` of the image.
    """
    s, h = _check_pair(saliency, saliency_map)
    return iou(top_q_mask(s, q), binarize_map(h, threshold))


def top_q_precision(
    saliency: ArrayLike, saliency_map: ArrayLike, *, q: float = 0.1, threshold: float = 0.5
) -> np.ndarray:
    """Fraction of the top-q region of `s` that lies inside `M`, per image: (B,); NaN if the region is empty."""
    s, h = _check_pair(saliency, saliency_map)
    top = top_q_mask(s, q)
    inside = np.sum(top & binarize_map(h, threshold), axis=(1, 2)).astype(np.float64)
    size = np.sum(top, axis=(1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size > 0, inside / size, np.nan)


def connected_components(mask: ArrayLike, *, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Labels the connected components of a 2-D boolean mask (H, W).

    `connectivity` 4 (edge neighbours) or 8 (edges and corners). Returns (labels int32 (H, W), 0
    outside the mask and 1..n for the components in row-major order of their first pixel; n).
    """
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
    values: ArrayLike,
    saliency_map: ArrayLike | None = None,
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


def aggregate(values: ArrayLike) -> dict[str, float | int]:
    """Mean, standard deviation (population, ddof 0) and count of the finite entries of `values` (N,).

    NaN (undefined per-image values, samples without a map) are skipped; mean and std are NaN when
    nothing is left.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "count": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "count": int(v.size)}
