"""Batch transforms `(batch, key) -> batch` that modify the images outside (or inside) the map.

Each is pure and jit-able; the randomness is one uniform draw from `key`, and the `*_from` variant
takes that draw explicitly (so that another implementation can reproduce the result exactly).
"Outside" is where `H < threshold` (default 0.5: the zeros of a binary map); samples without a map
(`has_map` 0) are left unchanged.

- `shuffle_outside`: the outside pixels of each image randomly permuted among themselves (all
  channels move together): ActDiff's `x~` and "train on shuffled images" (Viviano, Simpson, Dutil,
  Bengio, Cohen, ICLR 2021).
- `mask_outside`: outside pixels set to zero: "train on masked images" (same paper).
- `counterexamples`: the region `A = 1 - H` replaced by independent uniform noise in the data
  range, same label (Teso and Kersting, AIES 2019, in the XIL framework's form).

Use them through a loss: `combine(cross_entropy(), transform=mask_outside)` trains on the
transformed batch only; `transformed_ce(counterexamples)` adds CE on a transformed copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from saljax import batch as batch_lib
from saljax.losses import _common

Batch = Mapping[str, jax.Array]

__all__ = [
    "outside_region",
    "shuffle_outside",
    "shuffle_outside_from",
    "mask_outside",
    "counterexamples",
    "counterexamples_from",
    "data_range",
]


def _needs_map(batch: Batch) -> None:
    batch_lib.check_batch(batch, needs_map=True, map_sizes=[_common.spatial_size(jnp.shape(batch[batch_lib.IMAGE]))])


def outside_region(batch: Batch, threshold: float = 0.5) -> jax.Array:
    """(B, H, W) bool: `H < threshold`, and False for samples without a map."""
    maps = jnp.asarray(batch[batch_lib.SALIENCY_MAP])
    has = batch_lib.map_weights(batch) > 0
    return (maps < threshold) & has[:, None, None]


def _replace_image(batch: Batch, image: jax.Array) -> dict[str, jax.Array]:
    return {**batch, batch_lib.IMAGE: image}


def shuffle_outside_from(batch: Batch, priorities: jax.Array, *, threshold: float = 0.5) -> dict[str, jax.Array]:
    """`shuffle_outside` with its draw given: `priorities` (B, H*W), distinct values.

    The outside pixels, taken in raster order, receive the outside pixels taken in the order of
    increasing priority; inside pixels stay where they are.
    """
    _needs_map(batch)
    x = jnp.asarray(batch[batch_lib.IMAGE])
    b, h, w, c = x.shape
    outside = outside_region(batch, threshold).reshape(b, h * w)
    position = jnp.arange(h * w)
    by_position = jnp.argsort(jnp.where(outside, position, h * w + position), axis=1, stable=True)
    by_priority = jnp.argsort(jnp.where(outside, priorities, 2.0 + priorities), axis=1, stable=True)
    count = jnp.sum(outside, axis=1, keepdims=True)
    source = jnp.where(position[None] < count, by_priority, by_position)
    rows = jnp.arange(b)[:, None]
    perm = jnp.zeros((b, h * w), jnp.int32).at[rows, by_position].set(source.astype(jnp.int32))
    pixels = x.reshape(b, h * w, c)
    return _replace_image(batch, jnp.take_along_axis(pixels, perm[..., None], axis=1).reshape(x.shape))


def shuffle_outside(batch: Batch, key: jax.Array, *, threshold: float = 0.5) -> dict[str, jax.Array]:
    """Outside pixels permuted among themselves, per image (draw: uniform (B, H*W) priorities)."""
    x = jnp.asarray(batch[batch_lib.IMAGE])
    priorities = jax.random.uniform(key, (x.shape[0], x.shape[1] * x.shape[2]), x.dtype)
    return shuffle_outside_from(batch, priorities, threshold=threshold)


def mask_outside(batch: Batch, key: jax.Array | None = None, *, threshold: float = 0.5) -> dict[str, jax.Array]:
    """Outside pixels set to zero (deterministic; `key` is accepted for the common signature)."""
    del key
    _needs_map(batch)
    x = jnp.asarray(batch[batch_lib.IMAGE])
    return _replace_image(batch, jnp.where(outside_region(batch, threshold)[..., None], jnp.zeros_like(x), x))


def data_range(x: jax.Array, value_range: tuple[float, float] | None = None) -> tuple[jax.Array, jax.Array]:
    """(low, high) of the noise: `value_range`, or the batch's min and max (no gradient)."""
    if value_range is not None:
        return jnp.asarray(value_range[0], x.dtype), jnp.asarray(value_range[1], x.dtype)
    x = jax.lax.stop_gradient(x)
    return jnp.min(x), jnp.max(x)


def counterexamples_from(
    batch: Batch, uniform: jax.Array, *, threshold: float = 0.5, value_range: tuple[float, float] | None = None
) -> dict[str, jax.Array]:
    """`counterexamples` with its draw given: `uniform` (B, H, W, C) in [0, 1)."""
    _needs_map(batch)
    x = jnp.asarray(batch[batch_lib.IMAGE])
    low, high = data_range(x, value_range)
    noise = low + (high - low) * uniform.astype(x.dtype)
    return _replace_image(batch, jnp.where(outside_region(batch, threshold)[..., None], noise, x))


def counterexamples(
    batch: Batch, key: jax.Array, *, threshold: float = 0.5, value_range: tuple[float, float] | None = None
) -> dict[str, jax.Array]:
    """`A = 1 - H` (where `H < threshold`) replaced by uniform noise in the data range; same labels.

    The range is `value_range`, or the batch's min and max. Draw: uniform (B, H, W, C).
    """
    x = jnp.asarray(batch[batch_lib.IMAGE])
    return counterexamples_from(batch, jax.random.uniform(key, x.shape, x.dtype), threshold=threshold,
                                value_range=value_range)
