"""Small helpers shared by the loss terms: labels, CE per sample, maps, reductions, option checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saljax import batch as batch_lib

Batch = batch_lib.Batch


def spatial_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """(h, w) of an NHWC shape (B, h, w, C) or of a map shape (B, h, w)."""
    return int(shape[1]), int(shape[2])


def labels(batch: Batch) -> jax.Array:
    return jnp.asarray(batch[batch_lib.LABEL])


def ce_per_sample(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Softmax CE per sample (B,); bfloat16 logits are upcast, float64 ones stay float64."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return -jnp.take_along_axis(log_p, target[:, None], axis=-1)[:, 0]


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def as_float(values: ArrayLike) -> jax.Array:
    """Float32 at least: float64 maps stay float64 for float64 losses."""
    values = jnp.asarray(values)
    return values.astype(jnp.promote_types(values.dtype, jnp.float32))


def masked_mean(per_sample: jax.Array, weights: jax.Array) -> jax.Array:
    """`sum_n w_n v_n / max(sum_n w_n, 1)`: mean over the samples that carry a map (0 if none)."""
    return jnp.sum(weights * per_sample) / jnp.maximum(jnp.sum(weights), 1.0)


def penalty_reduce(per_sample: jax.Array, weights: jax.Array, reduction: str, elements: int) -> jax.Array:
    """Sum over samples (the authors'), or a scale-free mean over penalised samples and elements."""
    if reduction == "sum":
        return jnp.sum(weights * per_sample)
    return masked_mean(per_sample, weights) / elements


def dilate(maps: jax.Array, radius: int) -> jax.Array:
    """Grows the marked region of maps (B, H, W) by `radius` pixels (square max filter)."""
    if radius <= 0:
        return maps
    size = 2 * radius + 1
    return jax.lax.reduce_window(maps, -jnp.inf, jax.lax.max, (1, size, size), (1, 1, 1), "SAME")


def blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Gaussian blur of maps (B, H, W), separable, `sigma` in pixels, edges padded by replication."""
    if sigma <= 0:
        return maps
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = jnp.asarray(taps / taps.sum(), maps.dtype)
    padded = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    rows = jax.vmap(lambda m: jax.vmap(lambda r: jnp.convolve(r, kernel, mode="valid"))(m))(padded)
    cols = jax.vmap(lambda m: jax.vmap(lambda c: jnp.convolve(c, kernel, mode="valid"))(m.T).T)(rows)
    return jnp.clip(cols, 0.0, 1.0)


def maps(batch: Batch) -> jax.Array:
    """The saliency maps `H` (B, h, w) as floats."""
    return as_float(batch[batch_lib.SALIENCY_MAP])


def map_at(batch: Batch, size: tuple[int, int], antialias: bool = False) -> jax.Array:
    """The saliency map (B, h, w), bilinearly resized to `size` when it has another resolution."""
    values = maps(batch)
    if values.shape[1:] == size:
        return values
    # antialias=False matches torch.nn.functional.interpolate(mode="bilinear", align_corners=False).
    return jax.image.resize(values, (values.shape[0], *size), "bilinear", antialias=antialias)


def outside_mask(batch: Batch, dilation: int = 0, sigma: float = 0.0) -> jax.Array:
    """`A = 1 - H` (B, H, W, 1): where saliency is not allowed."""
    return (1.0 - blur(dilate(maps(batch), dilation), sigma))[..., None]
