"""Argument validation shared by the model constructors (one-line ``ValueError`` messages)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


def positive_int(name: str, value: Any) -> int:
    # bool is an int subclass; reject it so `num_classes=True` is not silently 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_ints(name: str, value: Any, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    values = tuple(value)
    if not values and not allow_empty:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    return values


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def float_dtype(name: str, value: Any) -> jnp.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise ValueError(f"{name} must be a floating dtype, got {value!r}") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {value!r}")
    return dtype


def activation(value: Any) -> Activation:
    if not callable(value):
        raise ValueError(f"activation must be callable (e.g. nnx.relu), got {value!r}")
    return value


def image_size(name: str, value: Any) -> tuple[int, int]:
    """``H`` or ``(H, W)`` -> ``(H, W)`` of positive ints."""
    size = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"{name} must be an int or (H, W), got {value!r}")
    h, w = size
    for n in (h, w):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int or (H, W) of positive ints, got {value!r}")
    return int(h), int(w)
