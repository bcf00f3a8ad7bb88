"""The multilayer perceptron of Right for the Right Reasons (Ross, Hughes, Doshi-Velez, IJCAI 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from saljax.models import _checks, layers
from saljax.models import decomposition as cd
from saljax.models.base import ImageClassifier

__all__ = ["MLP"]


class MLP(ImageClassifier):
    """RRR's MLP: flatten -> ``hidden_sizes`` dense layers, each + activation -> Dense(K).

    Defaults: two hidden layers of 50 ReLU units on 28x28x1 inputs (RRR's DecoyMNIST network).

    It has no convolutional feature map, so the contract reads:

    - ``features(x)``: the LAST HIDDEN LAYER's activations as a 1x1 map
      ``(B, 1, 1, hidden_sizes[-1])`` (the "features before the head" that ActDiff-style terms
      compare);
    - ``head(A)``: the output Dense layer ``classifier`` on it, ``(B, 1, 1, C') -> (B, K)``.

    ``head_type`` is ``'dense'``: class activation maps have no spatial meaning here (one pixel), so
    CAM-based losses and maps (CYBORG, Divisive Decisions, CAM explanations) refuse the model
    (:func:`saljax.models.require_cam_head`). Input-gradient methods (GradMask, RRR) apply as usual.

    The input size is fixed at construction (``input_size``; a training run fills it in from the
    data through :func:`saljax.models.create`); other sizes raise a ``ValueError`` at trace time.
    The flatten order is (H, W, C) (PyTorch flattens NCHW images in (C, H, W) order).

    State paths: ``hidden`` (the layer reading the flattened input), ``deeper.<i>`` (the further
    hidden layers), ``classifier``. Initialisation: PyTorch's default ``nn.Linear`` init (weights
    and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``).

    Args:
      num_classes: number of classes ``K`` (>= 1).
      in_channels: input channels (>= 1).
      input_size: ``H`` or ``(H, W)`` of the inputs.
      hidden_sizes: widths of the hidden layers (non-empty).
      activation: nonlinearity after every hidden layer.
      dtype: computation dtype of the hidden layers (the head runs in float32 at least).
      param_dtype: parameter dtype.
      rngs: parameter initialisation keys.
    """

    registry_name = "mlp"

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = (28, 28),
        hidden_sizes: Sequence[int] = (50, 50),
        activation: _checks.Activation = nnx.relu,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.input_size = _checks.image_size("input_size", input_size)
        self.hidden_sizes = _checks.positive_ints("hidden_sizes", hidden_sizes)
        self.activation = _checks.activation(activation)
        self.dtype = _checks.float_dtype("dtype", dtype)
        self.param_dtype = _checks.float_dtype("param_dtype", param_dtype)
        self.head_type = "dense"
        self.feature_channels = self.hidden_sizes[-1]

        def linear(n_in: int, n_out: int, dtype: Any) -> nnx.Linear:
            init = layers.torch_default_uniform(n_in)
            return layers.dense(n_in, n_out, dtype=dtype, param_dtype=self.param_dtype, kernel_init=init,
                                bias_init=init, rngs=rngs)

        n_in = self.input_size[0] * self.input_size[1] * self.in_channels
        self.hidden = linear(n_in, self.hidden_sizes[0], self.dtype)
        self.deeper = nnx.List([linear(a, b, self.dtype) for a, b in zip(self.hidden_sizes, self.hidden_sizes[1:])])
        self.classifier = linear(self.feature_channels, self.num_classes, jnp.promote_types(self.param_dtype, jnp.float32))

    @property
    def mlp_feature_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``: the shape that ``hidden`` flattens (for weight-layout conversions)."""
        return (*self.input_size, self.in_channels)

    def _check_input(self, x: Any) -> jax.Array:
        x = super()._check_input(x)
        if tuple(x.shape[1:3]) != self.input_size:
            raise ValueError(
                f"x must have shape (B, {self.input_size[0]}, {self.input_size[1]}, {self.in_channels}) for "
                f"{type(self).__name__}(input_size={self.input_size}), got shape {tuple(x.shape)}"
            )
        return x

    def backbone(self, x: jax.Array) -> jax.Array:
        h = self.activation(self.hidden(x.reshape(x.shape[0], -1)))
        for layer in self.deeper:
            h = self.activation(layer(h))
        return h.reshape(h.shape[0], 1, 1, h.shape[-1])

    def decompose_features(self, parts: cd.Parts) -> cd.Parts:
        b = parts[0].shape[0]
        parts = cd.activation(self.activation, cd.layer(self.hidden, cd.reshape(parts, (b, -1))))
        for layer in self.deeper:
            parts = cd.activation(self.activation, cd.layer(layer, parts))
        return cd.reshape(parts, (b, 1, 1, self.feature_channels))

    def decompose_head(self, parts: cd.Parts) -> cd.Parts:
        parts = cd.cast(parts, self.classifier.dtype)
        return cd.layer(self.classifier, cd.reshape(parts, (parts[0].shape[0], -1)))

    def head(self, a: jax.Array) -> jax.Array:
        """The output layer: ``(B, 1, 1, C') -> (B, num_classes)`` float32 logits."""
        a = self._check_feature_map(a)
        if a.shape[1:3] != (1, 1):
            raise ValueError(
                f"feature map A must have shape (B, 1, 1, {self.feature_channels}) for {type(self).__name__} "
                f"(its features are the last hidden layer), got shape {tuple(a.shape)}"
            )
        dtype = self.classifier.dtype
        return self.classifier(a.astype(dtype).reshape(a.shape[0], -1)).astype(dtype)
