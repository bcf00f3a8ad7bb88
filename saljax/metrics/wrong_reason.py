"""WR, the wrong-reason score of explanatory interactive learning (XIL).

Friedrich, Stammer, Schramowski, Kersting, "A typology for exploring the mitigation of shortcut
behaviour", Nature Machine Intelligence 2023. For explanation maps of the test images (e.g.
Grad-CAM of the predicted class, rectified and upsampled; RRR's input gradient summed over
channels) and a region `A` (B, H, W) that must NOT matter (a confounder such as a decoy swatch):

  1. `m = normalize_maps(s)`: negatives set to 0, then min-max scaled per image to [0, 1];
  2. `t` = the mean over the whole test set of the per-image mean of `m`;
  3. `WR_n = sum(A * [m > t]) / sum(A)`, the share of `A` the explanation marks as relevant;
  4. report `100 * mean_n WR_n` (lower is better).

Because `t` is a whole-set statistic, WR takes either one call over the set's maps
(`wrong_reason_score`), or two passes over batches:

  stats = sum over batches of wrong_reason_threshold_stats(maps, valid=valid)   # tree-add the pairs
  t = wrong_reason_threshold(stats)
  per batch: wr = wrong_reason_per_image(maps, region, t, valid=valid); accumulate finite_sum_count(wr)
  WR = 100 * total / count

Every function is pure and `jit`-compatible; shapes are checked before tracing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saljax.metrics._common import apply_valid, as_float, check_maps, check_valid


class ThresholdStats(NamedTuple):
    """Additive statistics of the WR threshold: the sum of per-image map means and their count.

    Add the stats of several batches with `jax.tree.map(jnp.add, a, b)` (not `+`, which would
    concatenate the tuples).
    """

    mean_sum: jax.Array
    num_images: jax.Array


def _check_3d(fn: str, maps: ArrayLike) -> None:
    shape = jnp.shape(maps)
    if len(shape) != 3 or shape[1] * shape[2] == 0:
        raise ValueError(f"{fn}: maps must have shape (B, H, W) with at least one pixel; got {shape}")


@jax.jit
def _normalize(maps: jax.Array) -> jax.Array:
    m = jnp.maximum(as_float(maps), 0.0)
    low = jnp.min(m, axis=(1, 2), keepdims=True)
    spread = jnp.max(m, axis=(1, 2), keepdims=True) - low
    return jnp.where(spread > 0, (m - low) / jnp.where(spread > 0, spread, 1.0), 0.0)


def normalize_maps(maps: ArrayLike) -> jax.Array:
    """Negatives set to 0, then per-image min-max scaling to [0, 1]: (B, H, W) -> (B, H, W).

    A constant map (e.g. all zero after rectification) becomes all zero.
    """
    _check_3d("normalize_maps", maps)
    return _normalize(maps)


@jax.jit
def _threshold_stats(maps: jax.Array, valid: jax.Array | None) -> ThresholdStats:
    means = jnp.mean(_normalize(maps), axis=(1, 2))
    keep = jnp.ones(means.shape, bool) if valid is None else jnp.asarray(valid).astype(bool)
    return ThresholdStats(jnp.sum(jnp.where(keep, means, 0.0)), jnp.sum(keep, dtype=jnp.int32))


def wrong_reason_threshold_stats(maps: ArrayLike, *, valid: ArrayLike | None = None) -> ThresholdStats:
    """First pass of WR over one batch of raw maps (B, H, W): the sum and count of per-image means.

    The means are of `normalize_maps(maps)`; samples where `valid` (B,) is 0 are left out.
    """
    _check_3d("wrong_reason_threshold_stats", maps)
    check_valid("wrong_reason_threshold_stats", valid, jnp.shape(maps)[0])
    return _threshold_stats(maps, valid)


def wrong_reason_threshold(stats: ThresholdStats) -> jax.Array:
    """The WR threshold `t` from the accumulated `ThresholdStats` of the whole set: a scalar (NaN if empty)."""
    return jnp.where(stats.num_images > 0, stats.mean_sum / jnp.maximum(stats.num_images, 1), jnp.nan)


@jax.jit
def _per_image(maps: jax.Array, region: jax.Array, threshold: jax.Array, valid: jax.Array | None) -> jax.Array:
    m = _normalize(maps)
    a = as_float(region)
    area = jnp.sum(a, axis=(1, 2))
    marked = jnp.sum(jnp.where(m > threshold, a, 0.0), axis=(1, 2))
    return apply_valid(jnp.where(area > 0, marked / jnp.where(area > 0, area, 1.0), jnp.nan), valid)


def wrong_reason_per_image(
    maps: ArrayLike, region: ArrayLike, threshold: ArrayLike, *, valid: ArrayLike | None = None
) -> jax.Array:
    """Second pass of WR over one batch: `WR_n = sum(A * [m > t]) / sum(A)`, (B,) in [0, 1].

    Args:
      maps: raw explanation maps (B, H, W); normalised here with `normalize_maps`.
      region: `A` (B, H, W), the region that must not matter: boolean or weights in [0, 1].
      threshold: `t`, a scalar, from `wrong_reason_threshold` over the whole set.
      valid: optional (B,); NaN where it is 0. NaN also where `A` is empty.
    """
    check_maps("wrong_reason_per_image", maps, region, names=("maps", "region"))
    check_valid("wrong_reason_per_image", valid, jnp.shape(maps)[0])
    if jnp.ndim(threshold) != 0:
        raise ValueError(f"wrong_reason_per_image: threshold must be a scalar; got shape {jnp.shape(threshold)}")
    return _per_image(maps, region, threshold, valid)


@jax.jit
def _wrong_reason(maps: jax.Array, region: jax.Array, valid: jax.Array | None) -> jax.Array:
    t = wrong_reason_threshold(_threshold_stats(maps, valid))
    wr = _per_image(maps, region, t, valid)
    keep = jnp.isfinite(wr)
    return 100.0 * jnp.sum(jnp.where(keep, wr, 0.0)) / jnp.sum(keep)


def wrong_reason_score(maps: ArrayLike, region: ArrayLike, *, valid: ArrayLike | None = None) -> jax.Array:
    """WR over a whole test set in one call: `100 * mean_n WR_n`, a scalar in [0, 100] (lower is better).

    Args: maps (N, H, W) raw explanation maps of every test image; region `A` (N, H, W); valid
    optional (N,). The threshold is taken over the valid images; images with an empty `A` are
    left out of the mean (NaN if none is left).
    """
    check_maps("wrong_reason_score", maps, region, names=("maps", "region"))
    check_valid("wrong_reason_score", valid, jnp.shape(maps)[0])
    return _wrong_reason(maps, region, valid)
