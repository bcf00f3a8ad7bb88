"""The CNN of the XIL typology (Friedrich, Stammer, Schramowski, Kersting, Nature Machine
Intelligence 2023) for DecoyMNIST."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from saljax.models import _checks, layers
from saljax.models import conv as conv_lib
from saljax.models import decomposition as cd
from saljax.models.base import ImageClassifier

__all__ = ["XILCNN"]


def _map_size(n: int, kernel: int) -> int:
    # VALID conv (n - k + 1), then a 2x2 stride-2 max-pool (floor, as PyTorch).
    return (n - kernel + 1) // 2


class XILCNN(ImageClassifier):
    """conv 5x5 (20) + ReLU + 2x2 max-pool, conv 5x5 (50) + ReLU + 2x2 max-pool, flatten, Dense(256)
    + ReLU, Dense(K). Convolutions are VALID (no padding) with bias: 28x28 -> 24 -> 12 -> 8 -> 4,
    so the flattened map has ``4 * 4 * 50 = 800`` entries.

    - ``features(x)``: the last conv map after its ReLU and max-pool, ``(B, h, w, channels[1])``
      (``(B, 4, 4, 50)`` on 28x28 inputs);
    - ``head(A)``: flatten (h, w, C order) -> ``hidden`` Dense(h*w*C, 256) -> ReLU ->
      ``classifier`` Dense(256, K), ``head_type == 'mlp'``.

    The head is not global average pooling + Dense, so CAMs are NOT exact (no
    ``z_c = b_c + mean_ij CAM_c`` identity): CAM-based losses and maps refuse the model
    (:func:`saljax.models.require_cam_head`); Grad-CAM (the RRR-G and HINT terms) is defined on
    ``features`` as for any model. The input size is fixed at construction (``input_size``).

    State paths: ``convs.<i>.{kernel,bias}``, ``hidden``, ``classifier``. Initialisation:
    PyTorch's defaults (weights and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), as the
    reference PyTorch code.

    Args:
      num_classes: number of classes ``K`` (>= 1; 10 for digits).
      in_channels: input channels (>= 1).
      input_size: ``H`` or ``(H, W)`` of the inputs (>= 16 on each side).
      channels: output channels of the two convolutions.
      kernel_size: their kernel size.
      mlp_hidden: width of the hidden dense layer.
      activation: nonlinearity after the convolutions and the hidden dense layer.
      conv_impl: ``'auto'``, ``'xla'`` or ``'matmul'`` (:mod:`saljax.models.conv`).
      dtype: computation dtype of the convolutions (the head runs in float32 at least).
      param_dtype: parameter dtype.
      rngs: parameter initialisation keys.
    """

    registry_name = "xil_cnn"

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = (28, 28),
        channels: tuple[int, int] = (20, 50),
        kernel_size: int = 5,
        mlp_hidden: int = 256,
        activation: _checks.Activation = nnx.relu,
        conv_impl: str = "auto",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.input_size = _checks.image_size("input_size", input_size)
        self.channels = _checks.positive_ints("channels", channels)
        if len(self.channels) != 2:
            raise ValueError(f"channels must be two positive ints (one per conv), got {channels!r}")
        self.kernel_size = _checks.positive_int("kernel_size", kernel_size)
        self.mlp_hidden = _checks.positive_int("mlp_hidden", mlp_hidden)
        self.activation = _checks.activation(activation)
        self.conv_impl = _checks.choice("conv_impl", conv_impl, conv_lib.CONV_IMPLS)
        self.dtype = _checks.float_dtype("dtype", dtype)
        self.param_dtype = _checks.float_dtype("param_dtype", param_dtype)
        self.head_type = "mlp"
        self.feature_channels = self.channels[1]
        h, w = self.input_size
        for _ in range(2):
            h, w = _map_size(h, self.kernel_size), _map_size(w, self.kernel_size)
        if h < 1 or w < 1:
            raise ValueError(
                f"input_size must leave a non-empty feature map after two {self.kernel_size}x{self.kernel_size} VALID "
                f"convs and 2x2 max-pools, got {input_size!r}"
            )
        self.feature_shape = (h, w, self.feature_channels)

        convs, c_in = [], self.in_channels
        for c_out in self.channels:
            init = layers.torch_default_uniform(c_in * self.kernel_size**2)
            convs.append(layers.conv2d(c_in, c_out, self.kernel_size, 1, padding="valid", use_bias=True,
                                       conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                                       kernel_init=init, bias_init=init, rngs=rngs))
            c_in = c_out
        self.convs = nnx.List(convs)
        head_dtype = jnp.promote_types(self.param_dtype, jnp.float32)

        def linear(n_in: int, n_out: int) -> nnx.Linear:
            init = layers.torch_default_uniform(n_in)
            return layers.dense(n_in, n_out, dtype=head_dtype, param_dtype=self.param_dtype, kernel_init=init,
                                bias_init=init, rngs=rngs)

        self.hidden = linear(h * w * self.feature_channels, self.mlp_hidden)
        self.classifier = linear(self.mlp_hidden, self.num_classes)

    @property
    def mlp_feature_shape(self) -> tuple[int, int, int]:
        """``(h, w, C')``: the map that ``hidden`` flattens (for weight-layout conversions)."""
        return self.feature_shape

    def _check_input(self, x: Any) -> jax.Array:
        x = super()._check_input(x)
        if tuple(x.shape[1:3]) != self.input_size:
            raise ValueError(
                f"x must have shape (B, {self.input_size[0]}, {self.input_size[1]}, {self.in_channels}) for "
                f"{type(self).__name__}(input_size={self.input_size}), got shape {tuple(x.shape)}"
            )
        return x

    def backbone(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = layers.max_pool(self.activation(conv(x)), 2, 2)
        return x

    def decompose_features(self, parts: cd.Parts) -> cd.Parts:
        for conv in self.convs:
            parts = cd.max_pool(cd.activation(self.activation, cd.layer(conv, parts)), 2, 2)
        return parts

    def decompose_head(self, parts: cd.Parts) -> cd.Parts:
        parts = cd.cast(parts, self.classifier.dtype)
        parts = cd.reshape(parts, (parts[0].shape[0], -1))
        return cd.layer(self.classifier, cd.activation(self.activation, cd.layer(self.hidden, parts)))

    def head(self, a: jax.Array) -> jax.Array:
        """flatten -> hidden -> activation -> classifier: ``(B, h, w, C') -> (B, K)`` float32 logits.

        ``(h, w, C')`` must be :attr:`feature_shape`; a per-pixel ``(N, 1, 1, C')`` map (what CAM
        code feeds a GAP head) is refused.
        """
        a = self._check_feature_map(a)
        if tuple(a.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"feature map A must have shape (B, {', '.join(map(str, self.feature_shape))}) for "
                f"{type(self).__name__}(input_size={self.input_size}) (its head flattens the whole map, so class "
                f"activation maps are not defined), got shape {tuple(a.shape)}"
            )
        dtype = self.classifier.dtype
        flat = a.astype(dtype).reshape(a.shape[0], -1)
        return self.classifier(self.activation(self.hidden(flat))).astype(dtype)
