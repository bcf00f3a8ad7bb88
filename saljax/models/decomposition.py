"""Contextual decomposition (CD) of a forward pass, as CDEP uses it.

Contextual decomposition (Murdoch, Liu, Yu, ICLR 2018; Singh, Murdoch, Yu, ICLR 2019) carries two
parts through the network: ``beta``, the contribution of an input region, and ``gamma``, that of
the rest, with ``beta + gamma`` equal to the ordinary activation at every layer. CDEP (Rieger,
Singh, Murdoch, Yu, ICML 2020) penalises the share of the logits that ``beta`` explains. Here:

- input: ``beta = region * x``, ``gamma = (1 - region) * x``;
- convolution and dense layers (every ``conv_impl``): the weights act on both parts; the bias is
  split in proportion to ``|W beta|`` and ``|W gamma|`` (each plus 1e-20, as the authors' code):
  ``beta' = W beta + b |W beta| / (|W beta| + |W gamma|)``; its derivative takes ``|x|' = 0`` at 0 (as
  PyTorch) and stays finite in float32 where both parts are 0;
- BatchNorm as the affine map ``y = m x + c`` (``m = scale / sqrt(var + eps)``,
  ``c = bias - m mean``), ``c`` split like a bias. Eval mode (``use_running_average=True``) uses the
  running statistics. Train mode uses the batch statistics of ``beta + gamma`` (the ordinary
  activation, so the parts still add up to the forward pass), computed and differentiated as the
  forward pass (``use_fast_variance`` as the layer's). The running statistics are updated only when
  :func:`decompose` is called with ``update_stats=True``, then exactly as ``nnx.BatchNorm`` updates
  them from the ordinary activation (so the decomposition can serve as the forward pass of a train
  step). Cross-device statistics (``axis_name``) are refused;
- elementwise activations ``f``: CDEP's ReLU rule, ``beta' = f(beta)``,
  ``gamma' = f(beta + gamma) - f(beta)`` (for ``f(0) != 0``, e.g. softplus or sigmoid, the constant
  ``f(0)`` lands in ``beta``). Known: ReLU, softplus, tanh, sigmoid, SiLU, GELU, ELU, leaky ReLU;
  :func:`register_activation` adds one;
- max-pool: both parts are taken at the argmax of ``beta + gamma`` in each window;
- average and global average pooling, residual additions, flattening and reshapes: applied to
  both parts (they are linear without bias).

Each model declares its decomposition next to its forward pass (``decompose_features`` and
``decompose_head`` of :class:`saljax.models.ImageClassifier`), built from the rules here
(:func:`layer`, :func:`activation`, :func:`max_pool`, ...). :func:`layer` refuses a module it has no
rule for, naming it; a model that declares no decomposition is refused by :func:`decompose`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from saljax.models import conv as conv_lib

__all__ = [
    "Parts",
    "activation",
    "add",
    "avg_pool",
    "cast",
    "decompose",
    "global_avg_pool",
    "layer",
    "max_pool",
    "register_activation",
    "reshape",
]

#: ``(beta, gamma)``: the region's part and the rest's part of one activation.
Parts = tuple[jax.Array, jax.Array]

_EPS = 1e-20  # as the authors' code: the bias share of two zero parts is 1/2 each

# Set by `decompose(..., update_stats=True)` while it runs: the layer rules are called from the models'
# own `decompose_features`, which pass only the parts along.
_UPDATE_STATS: contextvars.ContextVar[bool] = contextvars.ContextVar("saljax_cd_update_stats", default=False)

_ACTIVATIONS: dict[Any, str] = {
    jax.nn.relu: "relu",
    jax.nn.softplus: "softplus",
    jnp.tanh: "tanh",
    jax.nn.tanh: "tanh",
    jax.nn.sigmoid: "sigmoid",
    jax.nn.silu: "silu",
    jax.nn.gelu: "gelu",
    jax.nn.elu: "elu",
    jax.nn.leaky_relu: "leaky_relu",
}


def register_activation(fn: Callable[[jax.Array], jax.Array], name: str | None = None) -> None:
    """Declares ``fn`` elementwise, so :func:`activation` decomposes it with CDEP's rule."""
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {fn!r}")
    _ACTIVATIONS[fn] = name or str(getattr(fn, "__name__", repr(fn)))


@jax.custom_jvp
def _share(beta: jax.Array, gamma: jax.Array) -> jax.Array:
    """``beta``'s share of a bias: ``(|beta| + eps) / (|beta| + |gamma| + 2 eps)``."""
    pb, pg = jnp.abs(beta) + _EPS, jnp.abs(gamma) + _EPS
    return pb / (pb + pg)


@_share.defjvp
def _share_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    # d share = ((1 - share) sign(beta) d beta - share sign(gamma) d gamma) / (|beta| + |gamma| + 2 eps),
    # with |x|' = sign(x), 0 at 0 (as PyTorch, the authors' framework). Written out because autodiff
    # of the quotient gives 1 / (pb + pg)^2 = 1 / 4e-40 where both parts are 0: subnormal in float32,
    # flushed to 0 on CPU (inf, then NaN gradients wherever a whole window of an activation is 0, as
    # after ReLU in a ResNet); and JAX's |x|' = 1 at 0 would carry that 2.5e19 factor on, layer
    # after layer, where PyTorch's stops it.
    beta, gamma = primals
    d_beta, d_gamma = tangents
    pb, pg = jnp.abs(beta) + _EPS, jnp.abs(gamma) + _EPS
    total = pb + pg
    share = pb / total
    d_share = (jnp.sign(beta) * d_beta * (1 - share) - jnp.sign(gamma) * d_gamma * share) / total
    return share, d_share


def _split_bias(beta: jax.Array, gamma: jax.Array, bias: jax.Array) -> Parts:
    """``(beta + share_b * bias, gamma + share_g * bias)``, shares proportional to ``|beta|``, ``|gamma|``."""
    share = _share(beta, gamma)
    return beta + share * bias, gamma + (1 - share) * bias


def _both(fn: Callable[[jax.Array], jax.Array], parts: Parts) -> Parts:
    """``fn`` (linear, no bias) on both parts in one call, stacked on the batch axis."""
    beta, gamma = parts
    out = fn(jnp.concatenate([beta, gamma], axis=0))
    return out[: beta.shape[0]], out[beta.shape[0] :]


def _conv(conv: nnx.Conv, parts: Parts) -> Parts:
    if conv.mask is not None or conv.feature_group_count != 1:
        raise ValueError("contextual decomposition supports nnx.Conv without mask and with feature_group_count=1")
    for name in ("input_dilation", "kernel_dilation"):
        dilation = getattr(conv, name)
        if dilation is not None and any(d != 1 for d in ((dilation,) if isinstance(dilation, int) else dilation)):
            raise ValueError(f"contextual decomposition supports nnx.Conv without {name}")
    padding: Any = conv.padding
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"contextual decomposition supports 'SAME', 'VALID' or explicit conv padding, got {padding!r}")
    elif isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    else:
        padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    strides: Any = conv.strides
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    kernel = conv.kernel[...]
    dtype = conv.dtype or jnp.result_type(parts[0], kernel)

    # The module's own convolution function, except for conv_impl 'auto': its matmul form of strided
    # convolutions on CPU pays off in double backprop, while the decomposition is differentiated
    # once, where XLA's convolution is faster (a SimpleCNN CDEP step took 1.4x as long with the
    # matmul form). Same maths either way.
    conv_fn = conv.conv_general_dilated
    if conv_fn is conv_lib.auto_conv_general_dilated:
        conv_fn = jax.lax.conv_general_dilated

    def apply(x: jax.Array) -> jax.Array:
        dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
        return conv_fn(x.astype(dtype), kernel.astype(dtype), strides, padding, dimension_numbers=dims,
                       precision=conv.precision)

    beta, gamma = _both(apply, parts)
    if conv.bias is None:
        return beta, gamma
    return _split_bias(beta, gamma, conv.bias[...].astype(dtype))


def _dense(linear: nnx.Linear, parts: Parts) -> Parts:
    kernel = linear.kernel[...]
    dtype = linear.dtype or jnp.result_type(parts[0], kernel)
    beta, gamma = _both(lambda x: jnp.matmul(x.astype(dtype), kernel.astype(dtype), precision=linear.precision), parts)
    if linear.bias is None:
        return beta, gamma
    return _split_bias(beta, gamma, linear.bias[...].astype(dtype))


def _batch_norm(bn: nnx.BatchNorm, parts: Parts) -> Parts:
    if bn.axis_name is not None:
        raise ValueError("contextual decomposition does not support BatchNorm with cross-device statistics (axis_name)")
    if bn.use_running_average is None:
        raise ValueError("BatchNorm.use_running_average must be True or False for contextual decomposition")
    beta, gamma = parts
    axes = tuple(a % beta.ndim for a in ((bn.axis,) if isinstance(bn.axis, int) else bn.axis))
    reduce = tuple(i for i in range(beta.ndim) if i not in axes)
    dtype = bn.dtype or jnp.result_type(beta, bn.mean[...])
    beta, gamma = beta.astype(dtype), gamma.astype(dtype)
    if bn.use_running_average:
        mean, var = bn.mean[...].astype(dtype), bn.var[...].astype(dtype)
    else:  # the batch statistics of the ordinary activation (biased), as nnx.BatchNorm computes them
        x = (beta + gamma).astype(jnp.promote_types(dtype, jnp.float32))
        mean = jnp.mean(x, axis=reduce)
        if bn.use_fast_variance:
            var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axis=reduce) - jnp.square(mean))
        else:
            var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, reduce)), axis=reduce)
        if _UPDATE_STATS.get():  # nnx.BatchNorm's running update (a constant for the gradient)
            bn.mean[...] = jax.lax.stop_gradient(bn.momentum * bn.mean[...] + (1 - bn.momentum) * mean)
            bn.var[...] = jax.lax.stop_gradient(bn.momentum * bn.var[...] + (1 - bn.momentum) * var)
        mean, var = mean.astype(dtype), var.astype(dtype)
    mul = jax.lax.rsqrt(var + bn.epsilon)
    if bn.scale is not None:
        mul = mul * bn.scale[...].astype(dtype)
    offset = -mean * mul
    if bn.bias is not None:
        offset = offset + bn.bias[...].astype(dtype)
    shape = [1] * beta.ndim
    for a in axes:
        shape[a] = beta.shape[a]
    mul, offset = mul.reshape(shape), offset.reshape(shape)
    return _split_bias(beta * mul, gamma * mul, offset)


_LAYERS: dict[type, Callable[[Any, Parts], Parts]] = {
    nnx.Conv: _conv,
    nnx.Linear: _dense,
    nnx.BatchNorm: _batch_norm,
}


def layer(module: nnx.Module, parts: Parts) -> Parts:
    """The decomposition through ``module`` (``nnx.Conv``, ``nnx.Linear``, ``nnx.BatchNorm``).

    Raises:
      ValueError: for any other module, naming its type.
    """
    rule = _LAYERS.get(type(module))
    if rule is None:
        raise ValueError(
            f"no contextual decomposition for layer {type(module).__name__}; known layers: "
            f"{sorted(t.__name__ for t in _LAYERS)}"
        )
    return rule(module, parts)


def activation(fn: Callable[[jax.Array], jax.Array], parts: Parts) -> Parts:
    """CDEP's rule for an elementwise activation: ``(f(beta), f(beta + gamma) - f(beta))``.

    Raises:
      ValueError: if ``fn`` is not a known (or registered) elementwise activation, naming it.
    """
    try:
        known = fn in _ACTIVATIONS
    except TypeError:  # unhashable callable
        known = False
    if not known:
        raise ValueError(
            f"no contextual decomposition for activation {getattr(fn, '__name__', fn)!r}; known: "
            f"{sorted(set(_ACTIVATIONS.values()))} (register an elementwise one with register_activation)"
        )
    beta, gamma = parts
    f_beta = fn(beta)
    return f_beta, fn(beta + gamma) - f_beta


def _windows(x: jax.Array, window: int, stride: int, padding: int, fill: float) -> jax.Array:
    """``(B, H, W, C) -> (B, h, w, C, window**2)``: every pooling window's values."""
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=fill)
    b, hp, wp, c = x.shape
    ho, wo = (hp - window) // stride + 1, (wp - window) // stride + 1
    taps = [
        jax.lax.slice(x, (0, i, j, 0), (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c), (1, stride, stride, 1))
        for i in range(window)
        for j in range(window)
    ]
    return jnp.stack(taps, axis=-1)


def max_pool(parts: Parts, window: int, stride: int, padding: int = 0) -> Parts:
    """Square max-pool (``-inf`` padding): both parts at the argmax of ``beta + gamma`` per window."""
    beta, gamma = parts
    total = _windows(beta + gamma, window, stride, padding, -jnp.inf)
    index = jnp.argmax(total, axis=-1)[..., None]
    pick = lambda v: jnp.take_along_axis(_windows(v, window, stride, padding, 0.0), index, axis=-1)[..., 0]
    return pick(beta), pick(gamma)


def avg_pool(parts: Parts, window: int, stride: int, padding: int = 0) -> Parts:
    """Square average pool (zero padding counted, as ``nnx.avg_pool``) on both parts."""
    pool = lambda v: nnx.avg_pool(v, (window, window), (stride, stride), ((padding, padding), (padding, padding)))
    return pool(parts[0]), pool(parts[1])


def global_avg_pool(parts: Parts) -> Parts:
    """``(B, h, w, C) -> (B, C)`` spatial means of both parts."""
    return jnp.mean(parts[0], axis=(1, 2)), jnp.mean(parts[1], axis=(1, 2))


def add(p: Parts, q: Parts) -> Parts:
    """A residual addition: parts add up part by part."""
    return p[0] + q[0], p[1] + q[1]


def reshape(parts: Parts, shape: Sequence[int]) -> Parts:
    """Both parts reshaped (e.g. flattened to ``(B, -1)``)."""
    return parts[0].reshape(shape), parts[1].reshape(shape)


def cast(parts: Parts, dtype: Any) -> Parts:
    """Both parts cast to ``dtype``."""
    return parts[0].astype(dtype), parts[1].astype(dtype)


def decompose(model: Any, x: jax.typing.ArrayLike, region: jax.typing.ArrayLike, *, at: str = "logits",
              update_stats: bool = False) -> Parts:
    """Contextual decomposition of ``model``'s logits (or feature map) into region and rest.

    Args:
      model: a :class:`saljax.models.ImageClassifier` (its BatchNorm mode decides which statistics
        are used; see the module docstring).
      x: ``(B, H, W, C)`` float images.
      region: the region whose contribution is ``beta``, ``(B, H, W)`` or ``(B, H, W, C)`` (or
        anything that broadcasts to ``x``), usually 0/1; CDEP passes the region that must NOT matter.
      at: ``'logits'`` (``(B, K)``) or ``'features'`` (the feature map ``(B, h, w, C')``).
      update_stats: in train mode, write new running statistics into ``model``'s BatchNorm layers,
        as its forward pass on ``x`` would (from the batch statistics of ``beta + gamma``). Default
        False: ``model`` is left unchanged. Pass a copy when the original must stay as it is
        (:func:`saljax.classifier.from_nnx` does).

    Returns:
      ``(beta, gamma)``, each shaped like the logits (or the feature map), with ``beta + gamma``
      the ordinary forward pass to rounding.

    Raises:
      ValueError: bad shapes, an unknown ``at``, or a model (layer, activation) without a
        decomposition, naming it.
    """
    if at not in ("logits", "features"):
        raise ValueError(f"at must be 'logits' or 'features', got {at!r}")
    if not callable(getattr(model, "decompose_features", None)):
        raise ValueError(f"model {type(model).__name__} declares no contextual decomposition (decompose_features)")
    check = getattr(model, "_check_input", None)
    x = check(x) if callable(check) else jnp.asarray(x)
    region = jnp.asarray(region)
    if region.ndim == 3:
        region = region[..., None]
    try:
        region = jnp.broadcast_to(region, x.shape)
    except ValueError as err:
        raise ValueError(
            f"region must have shape (B, H, W) or (B, H, W, C) matching x {tuple(x.shape)}, got {tuple(jnp.shape(region))}"
        ) from err
    region = region.astype(x.dtype)
    token = _UPDATE_STATS.set(bool(update_stats))
    try:
        parts = model.decompose_features((region * x, (1 - region) * x))
        return parts if at == "features" else model.decompose_head(parts)
    finally:
        _UPDATE_STATS.reset(token)
