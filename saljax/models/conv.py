"""Convolution implementations for ``nnx.Conv``, chosen per model by ``conv_impl``.

Every convolution of saljax's models goes through the function that :func:`resolve` returns
for the model's ``conv_impl`` argument (stored as ``nnx.Conv.conv_general_dilated``, a static
attribute, so switching it changes the graph definition, not the parameters):

``'xla'``
    :func:`jax.lax.conv_general_dilated` everywhere.
``'matmul'``
    :func:`matmul_conv_general_dilated` everywhere: every NHWC/HWIO convolution without
    dilation or feature groups and with non-negative padding runs as strided slices + one
    matmul (im2col), on every backend and for every stride; anything else falls back to
    :func:`jax.lax.conv_general_dilated`.
``'auto'`` (default)
    :func:`auto_conv_general_dilated`: the matmul form for convolutions with a stride above 1
    when the step is traced for the CPU backend (``jax.default_backend() == 'cpu'``), XLA's
    convolution otherwise.

Why the matmul form on CPU: double backprop (GradMask, RRR) differentiates the input gradient of
a strided convolution, which XLA expresses as a convolution with a dilated input window; XLA:CPU
runs those far off its fast path (a ResNet-18 GradMask step took 1.4x, a SimpleCNN one 4x, as long
as with the matmul form; ``benchmarks/STEP_TIME.md``). The matmul form's derivatives of every
order are matmuls, pads and slices. Same parameters, same maths; results agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "CONV_IMPLS",
    "ConvFn",
    "auto_conv_general_dilated",
    "matmul_conv_general_dilated",
    "resolve",
    "supports_matmul",
]

ConvFn = Callable[..., jax.Array]

#: Values of the models' ``conv_impl`` argument.
CONV_IMPLS: tuple[str, ...] = ("auto", "xla", "matmul")


def supports_matmul(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, **kwargs: Any
) -> bool:
    """Whether :func:`matmul_conv_general_dilated` computes this convolution as a matmul.

    True for rank-4 NHWC inputs with HWIO kernels, no lhs/rhs dilation, one feature and batch
    group, no ``out_sharding``, and ``'VALID'`` or explicit non-negative ``((top, bottom), (left,
    right))`` padding (``jnp.pad`` cannot crop).
    """
    if lhs.ndim != 4 or rhs.ndim != 4 or len(window_strides) != 2:
        return False
    if kwargs.get("feature_group_count", 1) != 1 or kwargs.get("batch_group_count", 1) != 1:
        return False
    if kwargs.get("out_sharding") is not None:
        return False
    for name in ("lhs_dilation", "rhs_dilation"):
        dilation = kwargs.get(name)
        if dilation is not None and any(d != 1 for d in dilation):
            return False
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    dims = kwargs.get("dimension_numbers")
    if dims is None or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dims) != nhwc:
        return False
    if isinstance(padding, str):
        return padding == "VALID"
    return len(padding) == 2 and all(len(p) == 2 and min(p) >= 0 for p in padding)


def matmul_conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, **kwargs: Any
) -> jax.Array:
    """``lax.conv_general_dilated`` as strided slices + one matmul, where :func:`supports_matmul`.

    ``lhs``: ``(B, H, W, C)``, ``rhs``: HWIO ``(kh, kw, C, O)``, ``padding``: explicit
    ``((top, bottom), (left, right))`` or ``'VALID'``. The output ``(B, h, w, O)`` is
    ``concat_ij(x_pad[:, i::s, j::s, :]) @ rhs.reshape(kh*kw*C, O)``. Anything else goes to
    ``lax.conv_general_dilated`` unchanged.
    """
    if not supports_matmul(lhs, rhs, window_strides, padding, **kwargs):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    kh, kw, c_in, c_out = rhs.shape
    sh, sw = window_strides
    pads = ((0, 0), (0, 0)) if padding == "VALID" else tuple(tuple(p) for p in padding)
    x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
    b, hp, wp, _ = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    # One strided slice per kernel tap, concatenated on channels in (i, j, c) order: the row order
    # of the HWIO kernel reshaped to (kh*kw*C, O).
    cols = jnp.concatenate(
        [
            jax.lax.slice(x, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c_in), (1, sh, sw, 1))
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )
    y = jnp.dot(
        cols.reshape(b * ho * wo, kh * kw * c_in),
        rhs.reshape(kh * kw * c_in, c_out),
        precision=kwargs.get("precision"),
        preferred_element_type=kwargs.get("preferred_element_type"),
    )
    return y.reshape(b, ho, wo, c_out)


def auto_conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, **kwargs: Any
) -> jax.Array:
    """The matmul form for strided convolutions traced for CPU; ``lax.conv_general_dilated`` otherwise."""
    if jax.default_backend() == "cpu" and any(s != 1 for s in window_strides):
        return matmul_conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


_IMPLS: dict[str, ConvFn] = {
    "auto": auto_conv_general_dilated,
    "xla": jax.lax.conv_general_dilated,
    "matmul": matmul_conv_general_dilated,
}


def resolve(conv_impl: str) -> ConvFn:
    """The ``conv_general_dilated`` function of ``conv_impl`` (one of :data:`CONV_IMPLS`)."""
    if not isinstance(conv_impl, str) or conv_impl not in _IMPLS:
        raise ValueError(f"conv_impl must be one of {list(CONV_IMPLS)}, got {conv_impl!r}")
    return _IMPLS[conv_impl]
