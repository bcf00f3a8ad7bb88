"""Input checks and reductions shared by the batched map metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def check_maps(
    fn: str, saliency: ArrayLike, mask: ArrayLike, *, names: tuple[str, str] = ("saliency", "mask")
) -> None:
    """Raises a one-line ValueError unless `saliency` is (B, H, W) with pixels and `mask` has its shape."""
    s_shape, m_shape = np.shape(saliency), np.shape(mask)
    if len(s_shape) != 3:
        raise ValueError(f"{fn}: {names[0]} must have shape (B, H, W); got {s_shape}")
    if m_shape != s_shape:
        raise ValueError(f"{fn}: {names[1]} must have the shape of {names[0]} {s_shape}; got {m_shape}")
    if s_shape[1] * s_shape[2] == 0:
        raise ValueError(f"{fn}: {names[0]} must have at least one pixel; got shape {s_shape}")


def check_valid(fn: str, valid: ArrayLike | None, batch: int, name: str = "valid") -> None:
    """Raises unless `valid` is None or has shape (B,)."""
    if valid is not None and np.shape(valid) != (batch,):
        raise ValueError(f"{fn}: {name} must have shape (B,) = ({batch},); got {np.shape(valid)}")


def as_float(x: ArrayLike) -> jax.Array:
    """`x` as a float array of at least single precision (float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def apply_valid(values: jax.Array, valid: ArrayLike | None) -> jax.Array:
    """NaN where `valid` (B,) is False or 0; `values` unchanged when `valid` is None."""
    if valid is None:
        return values
    return jnp.where(jnp.asarray(valid).astype(bool), values, jnp.nan)


def finite_sum_count(values: ArrayLike, valid: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
    """Sum and count of the finite entries of `values` (B,), skipping samples where `valid` is 0.

    For accumulating a per-image metric over padded evaluation batches under `jit`: add the pairs
    of every batch, then divide. NaN (undefined values, samples without a mask) are skipped.
    Returns (sum, count), scalars; count is int32.
    """
    v = as_float(values)
    keep = jnp.isfinite(v)
    if valid is not None:
        if np.shape(valid) != np.shape(v):
            raise ValueError(f"finite_sum_count: valid must have the shape of values {np.shape(v)}; got {np.shape(valid)}")
        keep = keep & jnp.asarray(valid).astype(bool)
    return jnp.sum(jnp.where(keep, v, 0.0)), jnp.sum(keep, dtype=jnp.int32)
