"""Layer factories and initialisers shared by saljax's models (and by models users add).

One place for the PyTorch-matching hyperparameters:

- :func:`conv2d`: explicit symmetric padding ``k // 2`` (``padding=k // 2`` in PyTorch; XLA's
  ``'SAME'`` pads a stride-2 convolution on an even-sized input 0 before and 1 after, which
  shifts every downsampled map by one pixel against PyTorch), or ``'VALID'``; the convolution
  implementation chosen by ``conv_impl`` (:mod:`saljax.models.conv`).
- :func:`batch_norm`: momentum 0.9 (flax keeps ``0.9 * old + 0.1 * batch``: PyTorch's
  ``momentum=0.1``), epsilon 1e-5, the two-pass variance, scale 1 and bias 0, built in training
  mode; running statistics float32, or float64 for float64 parameters. Flax uses the BIASED batch
  variance for the running ``var`` where PyTorch's ``running_var`` uses the unbiased one.
- :func:`dense`: ``nnx.Linear`` with a given dtype and initialiser.
- :func:`max_pool`: pads with ``-inf`` like PyTorch.

Initialisers: :data:`he_normal_fan_out` (torchvision's ``kaiming_normal_(mode='fan_out')``,
untruncated), :data:`lecun_normal` (flax's default dense kernel: truncated at 2 std) and
:func:`torch_default_uniform` (PyTorch's default ``nn.Linear``/``nn.Conv2d`` init, used by the models
ported from PyTorch code). Normal samples are drawn as a flat vector of power-of-two length and cut
to size, so building a model compiles one sampler per power of two instead of one per parameter
shape (~1 s each on CPU); same distributions, a different (still deterministic) random stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Initializer

from saljax.models import conv as conv_lib

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "batch_norm",
    "conv2d",
    "dense",
    "he_normal_fan_out",
    "lecun_normal",
    "max_pool",
    "torch_default_uniform",
    "variance_scaling",
]

# PyTorch BatchNorm2d defaults (torch momentum 0.1 == flax momentum 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _flat_sample(key: jax.Array, n: int, dtype: Any, distribution: str) -> jax.Array:
    size = 1 << (n - 1).bit_length()  # next power of two >= n
    if distribution == "truncated_normal":
        # As jax: truncate at +-2 std of the standard normal, rescale to unit std.
        z = jax.random.truncated_normal(key, -2.0, 2.0, (size,), dtype) / 0.87962566103423978
    elif distribution == "normal":
        z = jax.random.normal(key, (size,), dtype)
    else:  # uniform on [-1, 1)
        z = jax.random.uniform(key, (size,), dtype, -1.0, 1.0)
    return z[:n]


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """``jax.nn.initializers.variance_scaling`` for ``'normal'``, ``'truncated_normal'`` and
    ``'uniform'``, sampled through a power-of-two flat vector (see the module docstring).

    Fans follow jax's convention for HWIO / ``(in, out)`` kernels: the last axis is the output,
    the one before it the input, the others the receptive field.
    """
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    if distribution not in ("normal", "truncated_normal", "uniform"):
        raise ValueError(f"distribution must be 'normal', 'truncated_normal' or 'uniform', got {distribution!r}")

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        fan = (shape[-2] if mode == "fan_in" else shape[-1]) * math.prod(shape[:-2])
        std = math.sqrt(scale / fan)
        if distribution == "uniform":
            std *= math.sqrt(3.0)  # the bound of a uniform with that standard deviation
        n = math.prod(shape)
        return (_flat_sample(key, n, dtype, distribution).reshape(shape) * std).astype(dtype)

    return init


#: torchvision's ``nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')``: untruncated
#: normal with std ``sqrt(2 / fan_out)``.
he_normal_fan_out: Initializer = variance_scaling(2.0, "fan_out", "normal")
#: flax's default dense kernel: LeCun normal (fan_in), truncated at 2 std.
lecun_normal: Initializer = variance_scaling(1.0, "fan_in", "truncated_normal")


def torch_default_uniform(fan_in: int) -> Initializer:
    """PyTorch's default ``nn.Linear``/``nn.Conv2d`` init of weights AND biases: ``U(-b, b)``,
    ``b = 1 / sqrt(fan_in)`` (``kaiming_uniform_(a=sqrt(5))`` gives that bound for the weights)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        return (_flat_sample(key, math.prod(shape), dtype, "uniform").reshape(shape) * bound).astype(dtype)

    return init


def conv2d(
    in_features: int,
    out_features: int,
    kernel_size: int,
    stride: int = 1,
    *,
    padding: str = "symmetric",
    use_bias: bool,
    conv_impl: str = "auto",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    kernel_init: Initializer = he_normal_fan_out,
    bias_init: Initializer = nnx.initializers.zeros,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A square ``nnx.Conv`` (NHWC, HWIO kernel).

    Args:
      padding: ``'symmetric'`` (``k // 2`` on every side, PyTorch's ``padding=k // 2``) or
        ``'valid'`` (none).
      conv_impl: ``'auto'``, ``'xla'`` or ``'matmul'`` (see :mod:`saljax.models.conv`).
      kernel_init, bias_init: default He normal (fan_out) kernels and zero biases.
    """
    if padding == "symmetric":
        pad = kernel_size // 2
        pads: Any = ((pad, pad), (pad, pad))
    elif padding == "valid":
        pads = "VALID"
    else:
        raise ValueError(f"padding must be 'symmetric' or 'valid', got {padding!r}")
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=pads,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        conv_general_dilated=conv_lib.resolve(conv_impl),
        rngs=rngs,
    )


def batch_norm(
    num_features: int,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    zero_scale: bool = False,
    rngs: nnx.Rngs,
) -> nnx.BatchNorm:
    """``nnx.BatchNorm`` with PyTorch's hyperparameters, in training mode (see the module docstring).

    ``zero_scale``: initialise the scale to 0 (torchvision's ``zero_init_residual``).
    """
    bn = nnx.BatchNorm(
        num_features,
        use_running_average=False,  # built in training mode, like a torch module
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        # Two-pass variance E[(x - E[x])^2] as PyTorch; the one-pass default loses precision when
        # |mean| >> std.
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
        rngs=rngs,
    )
    # flax makes the running statistics float32 whatever param_dtype is; a float64 model would
    # round them and write float64 updates into float32 arrays (which JAX deprecates).
    stats_dtype = jnp.promote_types(jnp.float32, param_dtype)
    if stats_dtype != jnp.float32:
        bn.mean = nnx.BatchStat(bn.mean[...].astype(stats_dtype))
        bn.var = nnx.BatchStat(bn.var[...].astype(stats_dtype))
    return bn


def dense(
    in_features: int,
    out_features: int,
    *,
    dtype: Any,
    param_dtype: Any = jnp.float32,
    kernel_init: Initializer = lecun_normal,
    bias_init: Initializer = nnx.initializers.zeros,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """``nnx.Linear(in_features, out_features)``, kernel ``(in, out)``; default flax's distribution."""
    return nnx.Linear(
        in_features, out_features, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, bias_init=bias_init, rngs=rngs,
    )


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """Square max-pool of ``(B, H, W, C)``; ``padding`` pixels of ``-inf`` on every side (PyTorch's
    ``MaxPool2d(window, stride, padding)``, floor mode)."""
    return nnx.max_pool(x, window_shape=(window, window), strides=(stride, stride),
                        padding=((padding, padding), (padding, padding)))
