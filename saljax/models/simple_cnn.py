"""The small CNN of GradMask (Simpson, Dutil, Bengio, Cohen, MIDL 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from saljax.models import _checks, layers
from saljax.models import conv as conv_lib
from saljax.models import decomposition as cd
from saljax.models.base import ImageClassifier

__all__ = ["SimpleCNN"]

_HEAD_TYPES = ("gap", "mlp")


def _stride2_out(n: int) -> int:
    # Output size of a 3x3, stride-2, padding-1 convolution.
    return (n - 1) // 2 + 1


class SimpleCNN(ImageClassifier):
    """The small CNN of GradMask: 3x3 stride-2 convs, each + BatchNorm + activation.

    ``features``: ``(B, H, W, in_channels) -> (B, h, w, channels[-1])`` with
    ``h = ceil(H / 2**len(channels))`` (e.g. 32x32 -> 2x2 with four convs).

    Heads:
      * ``'gap'`` (default): global average pooling + ``classifier`` Linear (CAM-exact; any
        input size).
      * ``'mlp'``: the paper's head, flatten -> ``hidden`` Linear(h*w*C', mlp_hidden) ->
        activation -> ``classifier`` Linear(mlp_hidden, K). Needs a fixed ``input_size`` (the
        flattened size is fixed at construction); CAM is not defined for it. The flatten order
        is (h, w, C) (PyTorch flattens NCHW maps in (C, h, w) order).

    State paths: ``convs.<i>.{kernel,bias}``, ``norms.<i>.{scale,bias,mean,var}``,
    ``classifier.{kernel,bias}`` (and ``hidden.{kernel,bias}`` for ``'mlp'``).
    Initialisation: conv kernels He normal (fan_out), conv biases 0, dense layers LeCun normal
    (truncated) with zero bias, BatchNorm scale 1 and bias 0.
    """

    registry_name = "simple_cnn"

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 32, 16, 8),
        activation: _checks.Activation = nnx.relu,
        head_type: str = "gap",
        mlp_hidden: int = 128,
        input_size: int | tuple[int, int] | None = None,
        conv_impl: str = "auto",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        """Builds the model.

        Args:
          num_classes: number of classes ``K`` (>= 1).
          in_channels: channels of the input images (>= 1).
          channels: output channels of the stride-2 convs, in order (non-empty).
          activation: elementwise nonlinearity after every BatchNorm (and after the hidden layer
            of the 'mlp' head); pass a smooth one (``jax.nn.softplus``, ``jnp.tanh``) for
            finite-difference checks of second-order gradients.
          head_type: ``'gap'`` or ``'mlp'``.
          mlp_hidden: hidden width of the ``'mlp'`` head.
          input_size: ``H`` or ``(H, W)`` of the inputs; required for ``'mlp'``, ignored for
            ``'gap'``.
          conv_impl: ``'auto'``, ``'xla'`` or ``'matmul'`` (:mod:`saljax.models.conv`).
          dtype: computation dtype of convs and BatchNorm.
          param_dtype: parameter dtype.
          rngs: parameter initialisation keys.
        """
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.channels = _checks.positive_ints("channels", channels)
        self.activation = _checks.activation(activation)
        self.head_type = _checks.choice("head_type", head_type, _HEAD_TYPES)
        self.conv_impl = _checks.choice("conv_impl", conv_impl, conv_lib.CONV_IMPLS)
        self.dtype = _checks.float_dtype("dtype", dtype)
        self.param_dtype = _checks.float_dtype("param_dtype", param_dtype)
        self.feature_channels = self.channels[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
        head_dtype = jnp.promote_types(self.param_dtype, jnp.float32)

        convs, norms = [], []
        c_in = self.in_channels
        for c_out in self.channels:
            convs.append(layers.conv2d(c_in, c_out, 3, 2, use_bias=True, conv_impl=self.conv_impl, **kw))
            norms.append(layers.batch_norm(c_out, **kw))
            c_in = c_out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

        classifier_in = self.feature_channels
        if self.head_type == "mlp":
            self.mlp_hidden = _checks.positive_int("mlp_hidden", mlp_hidden)
            if input_size is None:
                raise ValueError(
                    "input_size (H or (H, W)) is required for head_type='mlp': the flattened feature size is "
                    "fixed at construction"
                )
            self.input_size = _checks.image_size("input_size", input_size)
            h, w = self.input_size
            for _ in self.channels:
                h, w = _stride2_out(h), _stride2_out(w)
            self.feature_shape = (h, w, self.feature_channels)
            self.hidden = layers.dense(h * w * self.feature_channels, self.mlp_hidden, dtype=head_dtype,
                                       param_dtype=self.param_dtype, rngs=rngs)
            classifier_in = self.mlp_hidden
        self.classifier = layers.dense(classifier_in, self.num_classes, dtype=head_dtype,
                                       param_dtype=self.param_dtype, rngs=rngs)

    def backbone(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms):
            x = self.activation(norm(conv(x)))
        return x

    def decompose_features(self, parts: cd.Parts) -> cd.Parts:
        for conv, norm in zip(self.convs, self.norms):
            parts = cd.activation(self.activation, cd.layer(norm, cd.layer(conv, parts)))
        return parts

    def decompose_head(self, parts: cd.Parts) -> cd.Parts:
        if self.head_type == "gap":
            return super().decompose_head(parts)
        parts = cd.cast(parts, self.classifier.dtype)
        parts = cd.reshape(parts, (parts[0].shape[0], -1))
        return cd.layer(self.classifier, cd.activation(self.activation, cd.layer(self.hidden, parts)))

    def head(self, a: jax.Array) -> jax.Array:
        """``(B, h, w, C') -> (B, num_classes)`` float32 logits.

        ``'gap'``: any ``h, w``. ``'mlp'``: ``(h, w)`` must be the map size of the ``input_size``
        given at construction.
        """
        if self.head_type == "gap":
            return super().head(a)
        a = self._check_feature_map(a)
        if tuple(a.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"feature map A must have shape (B, {', '.join(map(str, self.feature_shape))}) for "
                f"head_type='mlp' with input_size={self.input_size}, got shape {tuple(a.shape)}"
            )
        dtype = self.classifier.dtype
        flat = a.astype(dtype).reshape(a.shape[0], -1)
        hidden = self.activation(self.hidden(flat))
        return self.classifier(hidden).astype(dtype)
