"""Image classifiers for saliency-guided training (Flax NNX).

Every model in this module is an :class:`flax.nnx.Module` with the same three-part
interface, which the saliency and loss code of saljax relies on:

``features(x) -> A``
    ``x``: float array ``(B, H, W, in_channels)`` (NHWC). Returns the last feature
    map ``A`` of shape ``(B, h, w, C')`` in the computation dtype (``dtype``).
    ``C'`` is available as ``model.feature_channels``.
``head(A) -> logits``
    ``A``: ``(B, h', w', C')``. Returns float32 logits ``(B, num_classes)``.
    The default head (``head_type == 'gap'``) is global average pooling over the
    spatial axes followed by ONE ``nnx.Linear(C', K)`` stored as
    ``model.classifier`` (``model.classifier.kernel``: ``(C', K)``,
    ``model.classifier.bias``: ``(K,)``). It accepts feature maps of any spatial
    size, including 1x1, so for every class ``c``::

        z_c = b_c + mean_ij CAM_c(i, j),   CAM_c = sum_k W[k, c] * A[..., k]

    and ``model.head(A[:, i:i+1, j:j+1, :]) - b`` is the class activation map at
    pixel ``(i, j)``. The head runs in float32 at least (the features are cast up
    first): it is one small matmul, and it makes the CAM identity hold to float32
    precision even with bfloat16 compute.
``__call__(x) = head(features(x))``

Models: :class:`SimpleCNN` (the small CNN of GradMask), :class:`ResNet18`
(BasicBlock ``[2, 2, 2, 2]``) and :class:`ResNet50` (Bottleneck ``[3, 4, 6, 3]``,
torchvision v1.5). :func:`create` builds one by name. Every model exposes
``in_channels``, ``num_classes``, ``feature_channels`` and ``head_type``. Only
``SimpleCNN(head_type='mlp')`` has a head other than ``'gap'``: it flattens the conv
map and applies two dense layers, so it needs a fixed input size and CAM methods
are not defined for it (CAM-based saliency must check ``head_type == 'gap'``).

Train / eval mode (flax 0.12)
-----------------------------
``nnx.BatchNorm`` reads its ``use_running_average`` attribute at call time. Models
are built in training mode (batch statistics are used and the running averages
updated on every forward pass), as in PyTorch. Switch in place with the inherited
``model.eval()`` / ``model.train()`` (they set ``use_running_average`` on every
BatchNorm), or take a mode view without mutating the model::

    eval_model = nnx.view(model, use_running_average=True)
    train_model = nnx.view(model, use_running_average=False)

A view shares its Variables with ``model``: parameters are the same arrays, and a
forward pass of ``train_model`` updates ``model``'s running statistics. Running
statistics are ``nnx.BatchStat`` Variables named ``mean`` and ``var`` (float32, float64
with float64 parameters); parameters are ``nnx.Param``. For functional code::

    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

In training mode every forward pass (also one made only to compute a saliency map)
moves the running statistics, and an output depends on the other batch members;
compute saliency maps for evaluation in eval mode.

BatchNorm hyperparameters
-------------------------
``momentum=0.9`` (flax keeps ``0.9 * old + 0.1 * batch``, which is PyTorch's
``momentum=0.1``), ``epsilon=1e-5`` and the two-pass variance
(``use_fast_variance=False``), as PyTorch computes it. Scale is initialised to 1
and bias to 0. One difference remains, on purpose: flax 0.12 uses the BIASED batch
variance (divide by ``N = B*h*w``) both to normalise and to update the running
``var``; PyTorch normalises with the biased variance but updates ``running_var``
with the UNBIASED one (``N / (N - 1)`` times larger). Training-mode outputs agree,
the running variances (and so eval-mode outputs) drift apart, most for small
``N``. A PyTorch baseline that must match must account for this (e.g. compare
after rescaling, or update its running_var itself with the biased variance).

Padding
-------
Convolutions and the max-pool use explicit symmetric padding ``k // 2`` on each
side (``((1, 1), (1, 1))`` for 3x3, ``((3, 3), (3, 3))`` for the 7x7 stem), like
PyTorch's ``padding=k // 2``. XLA's ``'SAME'`` pads a stride-2 convolution on an
even-sized input asymmetrically (0 before, 1 after), which shifts every
downsampled feature map by one pixel relative to PyTorch and would make ported
weights give different numbers. The max-pool pads with ``-inf``, like PyTorch.

Strided convolutions on CPU
---------------------------
On the CPU backend every convolution with a stride above 1 (the stride-2 3x3 convs, the
1x1 downsampling shortcuts, the 7x7 stem) runs as strided slices + one matmul
(``_conv_general_dilated``); other backends and stride-1 convolutions use
``lax.conv_general_dilated``. Same parameters, same maths, float rounding aside. Why:
double backprop (GradMask, RRR) differentiates the data gradient of a strided conv,
which XLA expresses as a convolution with a dilated input window; XLA:CPU runs those
far off its fast path (a ResNet-18 GradMask step took 1.4x, a SimpleCNN one 4x, as long
as with the matmul form; ``benchmarks/STEP_TIME.md``). The matmul form's derivatives of
every order are matmuls, pads and slices. The choice is made when the step is traced,
from ``jax.default_backend()``.

Initialisation
--------------
Convolution kernels: He/Kaiming normal with ``fan_out`` (untruncated normal, std
``sqrt(2 / (k*k*C_out))``), as torchvision's ResNets. Convolution biases
(``SimpleCNN`` only): zeros. Dense layers: flax's default distribution (LeCun
normal kernel, truncated at 2 std; zero bias). BatchNorm: scale 1, bias 0
(``zero_init_residual=True`` on the ResNets sets the last BatchNorm scale of every
residual branch to 0, as torchvision's option of the same name). The normal
samples are drawn through a flat vector of power-of-two length (see
``_variance_scaling``) so that building a model compiles few XLA programs; the
distributions are the ones named above.

dtypes
------
``param_dtype`` (default float32) is the dtype of the parameters; ``dtype``
(default float32) is the computation dtype of convolutions and BatchNorm, e.g.
``dtype=jnp.bfloat16`` for bfloat16 compute with float32 parameters. BatchNorm
computes batch statistics in float32 at least and keeps its running statistics in
float32, or float64 when ``param_dtype`` is float64 (flax alone would keep them float32).
Logits are float32, float64 for float64 parameters.

Porting weights from PyTorch: conv kernels are HWIO here (``torch_weight.permute(2,
3, 1, 0)``), dense kernels are ``(in, out)`` (``torch_weight.T``), and the
``'mlp'`` head flattens in (h, w, C) order where PyTorch flattens NCHW in (C, h, w)
order.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Initializer

__all__ = [
    "Activation",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "MODEL_NAMES",
    "ResNet18",
    "ResNet50",
    "SimpleCNN",
    "create",
]

Activation = Callable[[jax.Array], jax.Array]

# PyTorch BatchNorm2d defaults (torch momentum 0.1 == flax momentum 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

_STEMS = ("cifar", "imagenet")
_HEAD_TYPES = ("gap", "mlp")


def _variance_scaling(scale: float, mode: str, truncated: bool) -> Initializer:
    """``jax.nn.initializers.variance_scaling`` with ``'normal'``/``'truncated_normal'``,
    sampled so that XLA compiles the sampler once per power of two, not per shape.

    ``jax.random.normal`` is compiled separately for every parameter shape, and on CPU
    that compilation (~1 s each) dominated building a ResNet. Here the standard
    normal samples are drawn as a flat vector of the next power-of-two length, then
    cut to size. Same distribution, a different (still deterministic) random stream.
    Fans follow jax's convention for HWIO / (in, out) kernels: the last axis is the
    output, the one before it the input, the others the receptive field.
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        receptive = math.prod(shape[:-2])
        fan = (shape[-2] if mode == "fan_in" else shape[-1]) * receptive
        n = math.prod(shape)
        size = 1 << (n - 1).bit_length()  # next power of two >= n
        if truncated:
            # As jax: truncate at +-2 std of the standard normal, rescale to unit std.
            z = jax.random.truncated_normal(key, -2.0, 2.0, (size,), dtype) / 0.87962566103423978
        else:
            z = jax.random.normal(key, (size,), dtype)
        return (z[:n].reshape(shape) * math.sqrt(scale / fan)).astype(dtype)

    return init


# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), an
# untruncated normal with std sqrt(2 / fan_out).
_conv_kernel_init = _variance_scaling(2.0, "fan_out", truncated=False)
# Dense layers: flax's default distribution, LeCun normal (fan_in, truncated at 2 std).
_dense_kernel_init = _variance_scaling(1.0, "fan_in", truncated=True)


# --------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
    # bool is an int subclass; reject it so `num_classes=True` is not silently 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_float_dtype(name: str, value: Any) -> jnp.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise ValueError(f"{name} must be a floating dtype, got {value!r}") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {value!r}")
    return dtype


def _check_activation(value: Any) -> Activation:
    if not callable(value):
        raise ValueError(f"activation must be callable (e.g. nnx.relu), got {value!r}")
    return value


# --------------------------------------------------------------------------------------
# Layer factories (one place for the PyTorch-matching hyperparameters)
# --------------------------------------------------------------------------------------


def _conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    stride: int,
    *,
    use_bias: bool,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    pad = kernel_size // 2  # symmetric, like PyTorch's padding=k // 2 (see module doc)
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_conv_kernel_init,
        bias_init=nnx.initializers.zeros,
        conv_general_dilated=_conv_general_dilated,
        rngs=rngs,
    )


def _conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated`` for ``nnx.Conv``; strided NHWC convs on CPU as a matmul.

    ``lhs``: ``(B, H, W, C)``, ``rhs``: HWIO ``(kh, kw, C, O)``, ``padding``: explicit
    ``((top, bottom), (left, right))`` or ``'VALID'``. The output, ``(B, h, w, O)``, is
    ``concat_ij(x_pad[:, i::s, j::s, :]) @ rhs.reshape(kh*kw*C, O)`` (see "Strided
    convolutions on CPU" in the module docstring). Anything else (stride 1, dilation,
    groups, other layouts or backends) goes to ``lax.conv_general_dilated`` unchanged.
    """
    if not _use_strided_matmul(lhs, rhs, window_strides, padding, kwargs):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    kh, kw, c_in, c_out = rhs.shape
    sh, sw = window_strides
    pads = ((0, 0), (0, 0)) if padding == "VALID" else tuple(tuple(p) for p in padding)
    x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
    b, hp, wp, _ = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    # One strided slice per kernel tap, concatenated on channels in (i, j, c) order: the
    # row order of the HWIO kernel reshaped to (kh*kw*C, O).
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


def _use_strided_matmul(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int], padding: Any, kwargs: dict) -> bool:
    if jax.default_backend() != "cpu" or lhs.ndim != 4 or rhs.ndim != 4:
        return False
    if all(s == 1 for s in strides):
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
    if padding == "VALID":
        return True
    return (
        not isinstance(padding, str)
        and len(padding) == 2
        and all(len(p) == 2 and min(p) >= 0 for p in padding)  # lax also accepts negative pads
    )


def _batch_norm(
    num_features: int,
    *,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
    zero_scale: bool = False,
) -> nnx.BatchNorm:
    bn = nnx.BatchNorm(
        num_features,
        use_running_average=False,  # built in training mode, like a torch module
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        # Two-pass variance E[(x - E[x])^2] as PyTorch; the one-pass default loses
        # precision when |mean| >> std. Flax divides by N (biased) for the running
        # `var` too, where torch's running_var uses N - 1 (see "BatchNorm
        # hyperparameters" in the module docstring); left as flax does it.
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
        rngs=rngs,
    )
    # flax makes the running statistics float32 whatever param_dtype is; a float64 model
    # would round them and write float64 updates into float32 arrays (which JAX deprecates).
    stats_dtype = jnp.promote_types(jnp.float32, param_dtype)
    if stats_dtype != jnp.float32:
        bn.mean = nnx.BatchStat(bn.mean[...].astype(stats_dtype))
        bn.var = nnx.BatchStat(bn.var[...].astype(stats_dtype))
    return bn


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    # torchvision stem: MaxPool2d(kernel_size=3, stride=2, padding=1); flax pads with -inf.
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


# --------------------------------------------------------------------------------------
# Shared interface
# --------------------------------------------------------------------------------------


class _Classifier(nnx.Module):
    """Shared input checks and the GAP + Dense head.

    Subclasses set ``in_channels``, ``num_classes``, ``feature_channels``,
    ``head_type``, ``dtype`` and ``classifier`` and implement ``_features``.
    """

    in_channels: int
    num_classes: int
    feature_channels: int
    head_type: str
    dtype: jnp.dtype
    classifier: nnx.Linear

    def _features(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _check_input(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, H, W, in_channels={self.in_channels}) (NHWC), "
                f"got shape {tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
        return x

    def _check_feature_map(self, a: Any) -> jax.Array:
        a = jnp.asarray(a)
        if a.ndim != 4 or a.shape[-1] != self.feature_channels:
            raise ValueError(
                f"feature map A must have shape (B, h, w, C'={self.feature_channels}), "
                f"got shape {tuple(a.shape)}"
            )
        return a

    def features(self, x: jax.Array) -> jax.Array:
        """Last feature map.

        Args:
          x: float ``(B, H, W, in_channels)`` images, NHWC.

        Returns:
          ``(B, h, w, feature_channels)`` in the computation dtype.

        Raises:
          ValueError: at trace time, if ``x`` is not a rank-4 float array with
            ``in_channels`` channels.
        """
        return self._features(self._check_input(x))

    def head(self, a: jax.Array) -> jax.Array:
        """GAP + Dense head: ``(B, h, w, C') -> (B, num_classes)`` float32 logits.

        Works for any spatial size ``h, w >= 1``; on a ``(B, 1, 1, C')`` map it is
        exactly ``model.classifier`` applied to that vector.
        """
        dtype = self.classifier.dtype  # at least float32 (see module doc)
        a = self._check_feature_map(a).astype(dtype)
        pooled = jnp.mean(a, axis=(1, 2))  # (B, C')
        return self.classifier(pooled).astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``head(features(x))``: ``(B, H, W, in_channels) -> (B, num_classes)`` float32."""
        return self.head(self.features(x))


def _classifier_linear(
    in_features: int, num_classes: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs
) -> nnx.Linear:
    # Runs in float32, or float64 for float64 parameters, whatever the compute dtype (see module
    # doc). Default flax init.
    return nnx.Linear(
        in_features, num_classes, dtype=jnp.promote_types(param_dtype, jnp.float32), param_dtype=param_dtype,
        kernel_init=_dense_kernel_init, bias_init=nnx.initializers.zeros, rngs=rngs,
    )


# --------------------------------------------------------------------------------------
# SimpleCNN
# --------------------------------------------------------------------------------------


def _stride2_out(n: int) -> int:
    # Output size of a 3x3, stride-2, padding-1 convolution.
    return (n - 1) // 2 + 1


class SimpleCNN(_Classifier):
    """The small CNN of GradMask: 3x3 stride-2 convs, each + BatchNorm + activation.

    ``features``: ``(B, H, W, in_channels) -> (B, h, w, channels[-1])`` with
    ``h = ceil(H / 2**len(channels))`` (e.g. 32x32 -> 2x2 with four convs).

    Heads:
      * ``'gap'`` (default): global average pooling + ``classifier`` Linear
        (CAM-exact; any input size).
      * ``'mlp'``: the paper's head, flatten -> ``hidden`` Linear(h*w*C', mlp_hidden)
        -> activation -> ``classifier`` Linear(mlp_hidden, K). Needs a fixed
        ``input_size`` (the flattened size is fixed at construction); CAM is not
        defined for it. The flatten order is (h, w, C).

    State paths: ``convs.<i>.{kernel,bias}``, ``norms.<i>.{scale,bias,mean,var}``,
    ``classifier.{kernel,bias}`` (and ``hidden.{kernel,bias}`` for ``'mlp'``).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 32, 16, 8),
        activation: Activation = nnx.relu,
        head_type: str = "gap",
        mlp_hidden: int = 128,
        input_size: int | tuple[int, int] | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        """Builds the model.

        Args:
          num_classes: number of classes ``K`` (>= 1).
          in_channels: channels of the input images (>= 1).
          channels: output channels of the stride-2 convs, in order (non-empty).
          activation: elementwise nonlinearity after every BatchNorm (and after the
            hidden layer of the 'mlp' head); pass a smooth one (``jax.nn.softplus``,
            ``jnp.tanh``) for finite-difference checks of second-order gradients.
          head_type: ``'gap'`` or ``'mlp'``.
          mlp_hidden: hidden width of the ``'mlp'`` head.
          input_size: ``H`` or ``(H, W)`` of the inputs; required for ``'mlp'``,
            ignored for ``'gap'``.
          dtype: computation dtype of convs and BatchNorm.
          param_dtype: parameter dtype.
          rngs: parameter initialisation keys.
        """
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.in_channels = _check_positive_int("in_channels", in_channels)
        channels = tuple(channels)
        if not channels:
            raise ValueError("channels must be a non-empty sequence of positive ints")
        for c in channels:
            _check_positive_int("channels", c)
        self.channels = channels
        self.activation = _check_activation(activation)
        self.head_type = _check_choice("head_type", head_type, _HEAD_TYPES)
        self.dtype = _check_float_dtype("dtype", dtype)
        self.param_dtype = _check_float_dtype("param_dtype", param_dtype)
        self.feature_channels = channels[-1]

        convs, norms = [], []
        c_in = self.in_channels
        for c_out in channels:
            convs.append(
                _conv(c_in, c_out, 3, 2, use_bias=True, dtype=self.dtype,
                      param_dtype=self.param_dtype, rngs=rngs)
            )
            norms.append(
                _batch_norm(c_out, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
            )
            c_in = c_out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

        if self.head_type == "mlp":
            self.mlp_hidden = _check_positive_int("mlp_hidden", mlp_hidden)
            if input_size is None:
                raise ValueError(
                    "input_size (H or (H, W)) is required for head_type='mlp': the "
                    "flattened feature size is fixed at construction"
                )
            size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            if len(size) != 2:
                raise ValueError(f"input_size must be an int or (H, W), got {input_size!r}")
            for n in size:
                _check_positive_int("input_size", n)
            h, w = size
            for _ in channels:
                h, w = _stride2_out(h), _stride2_out(w)
            self.input_size = size
            self.feature_shape = (h, w, self.feature_channels)
            self.hidden = nnx.Linear(
                h * w * self.feature_channels, self.mlp_hidden,
                dtype=jnp.promote_types(self.param_dtype, jnp.float32),
                param_dtype=self.param_dtype, kernel_init=_dense_kernel_init,
                bias_init=nnx.initializers.zeros, rngs=rngs,
            )
            self.classifier = _classifier_linear(
                self.mlp_hidden, self.num_classes, param_dtype=self.param_dtype, rngs=rngs
            )
        else:
            self.classifier = _classifier_linear(
                self.feature_channels, self.num_classes, param_dtype=self.param_dtype, rngs=rngs
            )

    def _features(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms):
            x = self.activation(norm(conv(x)))
        return x

    def head(self, a: jax.Array) -> jax.Array:
        """``(B, h, w, C') -> (B, num_classes)`` float32 logits.

        ``'gap'``: any ``h, w``. ``'mlp'``: ``(h, w)`` must be the map size of the
        ``input_size`` given at construction.
        """
        if self.head_type == "gap":
            return super().head(a)
        a = self._check_feature_map(a)
        if tuple(a.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"feature map A must have shape (B, {', '.join(map(str, self.feature_shape))}) for "
                f"head_type='mlp' with input_size={self.input_size}, got shape "
                f"{tuple(a.shape)}"
            )
        dtype = self.classifier.dtype
        flat = a.astype(dtype).reshape(a.shape[0], -1)
        hidden = self.activation(self.hidden(flat))
        return self.classifier(hidden).astype(dtype)


# --------------------------------------------------------------------------------------
# ResNets
# --------------------------------------------------------------------------------------


class _BasicBlock(nnx.Module):
    """conv3x3(s) -> BN -> act -> conv3x3 -> BN, + shortcut, -> act (expansion 1)."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int, *, activation: Activation,
        zero_init_residual: bool, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs,
    ) -> None:
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.conv1 = _conv(in_planes, planes, 3, stride, use_bias=False, **kw)
        self.bn1 = _batch_norm(planes, **kw)
        self.conv2 = _conv(planes, planes, 3, 1, use_bias=False, **kw)
        self.bn2 = _batch_norm(planes, zero_scale=zero_init_residual, **kw)
        self.downsample_conv, self.downsample_bn = _downsample(
            in_planes, planes * self.expansion, stride, **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.activation(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.activation(y + _shortcut(self, x))


class _Bottleneck(nnx.Module):
    """1x1 -> BN -> act -> 3x3(s) -> BN -> act -> 1x1 (x4) -> BN, + shortcut, -> act.

    The stride sits on the 3x3 conv (torchvision's ResNet v1.5).
    """

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int, *, activation: Activation,
        zero_init_residual: bool, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs,
    ) -> None:
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        out_planes = planes * self.expansion
        self.activation = activation
        self.conv1 = _conv(in_planes, planes, 1, 1, use_bias=False, **kw)
        self.bn1 = _batch_norm(planes, **kw)
        self.conv2 = _conv(planes, planes, 3, stride, use_bias=False, **kw)
        self.bn2 = _batch_norm(planes, **kw)
        self.conv3 = _conv(planes, out_planes, 1, 1, use_bias=False, **kw)
        self.bn3 = _batch_norm(out_planes, zero_scale=zero_init_residual, **kw)
        self.downsample_conv, self.downsample_bn = _downsample(in_planes, out_planes, stride, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.activation(self.bn1(self.conv1(x)))
        y = self.activation(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.activation(y + _shortcut(self, x))


def _downsample(
    in_planes: int, out_planes: int, stride: int, *, dtype: jnp.dtype,
    param_dtype: jnp.dtype, rngs: nnx.Rngs,
) -> tuple[nnx.Conv | None, nnx.BatchNorm | None]:
    # torchvision: 1x1 conv stride s (no bias) + BN when the shape changes.
    if stride == 1 and in_planes == out_planes:
        return None, None
    conv = _conv(in_planes, out_planes, 1, stride, use_bias=False, dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs)
    return conv, _batch_norm(out_planes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _shortcut(block: _BasicBlock | _Bottleneck, x: jax.Array) -> jax.Array:
    if block.downsample_conv is None:
        return x
    return block.downsample_bn(block.downsample_conv(x))


class _ResNet(_Classifier):
    """ResNet backbone + GAP + Dense head (shared by ResNet18 and ResNet50)."""

    _block: type[_BasicBlock] | type[_Bottleneck]
    _stage_sizes: tuple[int, int, int, int]

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "imagenet",
        activation: Activation = nnx.relu,
        zero_init_residual: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.width = _check_positive_int("width", width)
        self.stem = _check_choice("stem", stem, _STEMS)
        self.activation = _check_activation(activation)
        self.dtype = _check_float_dtype("dtype", dtype)
        self.param_dtype = _check_float_dtype("param_dtype", param_dtype)
        self.head_type = "gap"
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

        if self.stem == "imagenet":  # 7x7 stride 2 (+ max-pool in _features)
            self.conv1 = _conv(self.in_channels, width, 7, 2, use_bias=False, **kw)
        else:  # 'cifar': 3x3 stride 1, no max-pool
            self.conv1 = _conv(self.in_channels, width, 3, 1, use_bias=False, **kw)
        self.bn1 = _batch_norm(width, **kw)

        # Stages layer1..layer4 (torchvision's names), widths w, 2w, 4w, 8w.
        in_planes = width
        for i, n_blocks in enumerate(self._stage_sizes):
            planes = width * 2**i
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    self._block(in_planes, planes, stride, activation=self.activation,
                                zero_init_residual=zero_init_residual, **kw)
                )
                in_planes = planes * self._block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))

        self.feature_channels = in_planes
        self.classifier = _classifier_linear(
            in_planes, self.num_classes, param_dtype=self.param_dtype, rngs=rngs
        )

    def _features(self, x: jax.Array) -> jax.Array:
        x = self.activation(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = _max_pool_3x3_s2(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return x


class ResNet18(_ResNet):
    """ResNet-18: BasicBlock ``[2, 2, 2, 2]``, stage widths ``w, 2w, 4w, 8w``.

    ``features``: ``(B, H, W, in_channels) -> (B, h, w, 8*width)`` with
    ``h = ceil(H / 8)`` for ``stem='cifar'`` (3x3 stride-1 stem, no max-pool) and
    ``h = ceil(H / 32)`` for ``stem='imagenet'`` (7x7 stride-2 conv + 3x3 stride-2
    max-pool, as torchvision). Head: GAP + ``classifier`` Linear(8*width, K).

    State paths (torchvision-like): ``conv1``, ``bn1``, ``layer{1..4}.<j>.{conv1,
    bn1, conv2, bn2, downsample_conv, downsample_bn}``, ``classifier.{kernel,bias}``.

    Args:
      num_classes: number of classes ``K`` (>= 1).
      in_channels: input channels (>= 1).
      width: base width (64 for the standard network).
      stem: ``'cifar'`` (default here, the GradMask follow-up) or ``'imagenet'``.
      activation: nonlinearity used everywhere ReLU would be.
      zero_init_residual: zero-init the last BN scale of each residual branch.
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: parameter initialisation keys.
    """

    _block = _BasicBlock
    _stage_sizes = (2, 2, 2, 2)

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "cifar",
        activation: Activation = nnx.relu,
        zero_init_residual: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            num_classes=num_classes, in_channels=in_channels, width=width, stem=stem,
            activation=activation, zero_init_residual=zero_init_residual, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )


class ResNet50(_ResNet):
    """ResNet-50 (v1.5): Bottleneck ``[3, 4, 6, 3]``, expansion 4, stride on the 3x3.

    ``features``: ``(B, H, W, in_channels) -> (B, h, w, 32*width)`` (2048 for
    ``width=64``), ``h = ceil(H / 32)`` for ``stem='imagenet'`` (default, CYBORG's
    backbone) and ``ceil(H / 8)`` for ``stem='cifar'``. Head: GAP + ``classifier``
    Linear(32*width, K).

    State paths: as :class:`ResNet18`, blocks also have ``conv3``/``bn3``.

    Args: as :class:`ResNet18` (``stem`` defaults to ``'imagenet'``).
    """

    _block = _Bottleneck
    _stage_sizes = (3, 4, 6, 3)

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "imagenet",
        activation: Activation = nnx.relu,
        zero_init_residual: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        super().__init__(
            num_classes=num_classes, in_channels=in_channels, width=width, stem=stem,
            activation=activation, zero_init_residual=zero_init_residual, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )


# --------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[_Classifier]] = {
    "simple_cnn": SimpleCNN,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
}

#: Names accepted by :func:`create`.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def create(
    name: str, *, num_classes: int, in_channels: int, rngs: nnx.Rngs, **kwargs: Any
) -> nnx.Module:
    """Builds a model by name.

    Args:
      name: one of :data:`MODEL_NAMES` (``'simple_cnn'``, ``'resnet18'``,
        ``'resnet50'``).
      num_classes: number of classes.
      in_channels: input channels.
      rngs: parameter initialisation keys.
      **kwargs: further constructor arguments of the model (e.g. ``width``,
        ``stem``, ``head_type``, ``activation``, ``dtype``).

    Raises:
      ValueError: for an unknown ``name`` or invalid constructor arguments.
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"name must be one of {list(MODEL_NAMES)}, got {name!r}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for model {name!r}; it accepts "
            f"{sorted(accepted)}"
        )
    return cls(num_classes=num_classes, in_channels=in_channels, rngs=rngs, **kwargs)
