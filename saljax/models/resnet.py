"""ResNets (He, Zhang, Ren, Sun, CVPR 2016) as torchvision builds them, with a choice of stem.

``stem='imagenet'``: 7x7 stride-2 conv + 3x3 stride-2 max-pool (torchvision). ``stem='cifar'``:
3x3 stride-1 conv, no max-pool, the ResNet-18 of the GradMask follow-up (Viviano, Simpson, Dutil,
Bengio, Cohen, ICLR 2021) for small images (28x28 or 32x32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from saljax.models import _checks, layers
from saljax.models import conv as conv_lib
from saljax.models import decomposition as cd
from saljax.models.base import ImageClassifier

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ResNet18", "ResNet50", "STEMS"]

#: Values of the ResNets' ``stem`` argument.
STEMS: tuple[str, ...] = ("cifar", "imagenet")


def _downsample(
    in_planes: int, out_planes: int, stride: int, **kw: Any
) -> tuple[nnx.Conv | None, nnx.BatchNorm | None]:
    # torchvision: 1x1 conv stride s (no bias) + BN when the shape changes.
    if stride == 1 and in_planes == out_planes:
        return None, None
    conv_impl = kw.pop("conv_impl")
    conv = layers.conv2d(in_planes, out_planes, 1, stride, use_bias=False, conv_impl=conv_impl, **kw)
    return conv, layers.batch_norm(out_planes, **kw)


class BasicBlock(nnx.Module):
    """conv3x3(s) -> BN -> act -> conv3x3 -> BN, + shortcut, -> act (expansion 1)."""

    expansion: ClassVar[int] = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int, *, activation: _checks.Activation,
        zero_init_residual: bool, conv_impl: str, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
    ) -> None:
        kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.conv1 = layers.conv2d(in_planes, planes, 3, stride, use_bias=False, conv_impl=conv_impl, **kw)
        self.bn1 = layers.batch_norm(planes, **kw)
        self.conv2 = layers.conv2d(planes, planes, 3, 1, use_bias=False, conv_impl=conv_impl, **kw)
        self.bn2 = layers.batch_norm(planes, zero_scale=zero_init_residual, **kw)
        self.downsample_conv, self.downsample_bn = _downsample(
            in_planes, planes * self.expansion, stride, conv_impl=conv_impl, **kw)

    def shortcut(self, x: jax.Array) -> jax.Array:
        if self.downsample_conv is None or self.downsample_bn is None:
            return x
        return self.downsample_bn(self.downsample_conv(x))

    def decompose_shortcut(self, parts: cd.Parts) -> cd.Parts:
        if self.downsample_conv is None or self.downsample_bn is None:
            return parts
        return cd.layer(self.downsample_bn, cd.layer(self.downsample_conv, parts))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.activation(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.activation(y + self.shortcut(x))

    def decompose(self, parts: cd.Parts) -> cd.Parts:
        """Contextual decomposition of ``__call__`` (:mod:`saljax.models.decomposition`)."""
        y = cd.activation(self.activation, cd.layer(self.bn1, cd.layer(self.conv1, parts)))
        y = cd.layer(self.bn2, cd.layer(self.conv2, y))
        return cd.activation(self.activation, cd.add(y, self.decompose_shortcut(parts)))


class Bottleneck(BasicBlock):
    """1x1 -> BN -> act -> 3x3(s) -> BN -> act -> 1x1 (x4) -> BN, + shortcut, -> act.

    The stride sits on the 3x3 conv (torchvision's ResNet v1.5).
    """

    expansion: ClassVar[int] = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int, *, activation: _checks.Activation,
        zero_init_residual: bool, conv_impl: str, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
    ) -> None:
        kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        out_planes = planes * self.expansion
        self.activation = activation
        self.conv1 = layers.conv2d(in_planes, planes, 1, 1, use_bias=False, conv_impl=conv_impl, **kw)
        self.bn1 = layers.batch_norm(planes, **kw)
        self.conv2 = layers.conv2d(planes, planes, 3, stride, use_bias=False, conv_impl=conv_impl, **kw)
        self.bn2 = layers.batch_norm(planes, **kw)
        self.conv3 = layers.conv2d(planes, out_planes, 1, 1, use_bias=False, conv_impl=conv_impl, **kw)
        self.bn3 = layers.batch_norm(out_planes, zero_scale=zero_init_residual, **kw)
        self.downsample_conv, self.downsample_bn = _downsample(in_planes, out_planes, stride, conv_impl=conv_impl, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.activation(self.bn1(self.conv1(x)))
        y = self.activation(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.activation(y + self.shortcut(x))

    def decompose(self, parts: cd.Parts) -> cd.Parts:
        """Contextual decomposition of ``__call__`` (:mod:`saljax.models.decomposition`)."""
        y = cd.activation(self.activation, cd.layer(self.bn1, cd.layer(self.conv1, parts)))
        y = cd.activation(self.activation, cd.layer(self.bn2, cd.layer(self.conv2, y)))
        y = cd.layer(self.bn3, cd.layer(self.conv3, y))
        return cd.activation(self.activation, cd.add(y, self.decompose_shortcut(parts)))


class ResNet(ImageClassifier):
    """ResNet backbone + GAP + Dense head; subclasses set ``block``, ``stage_sizes``, ``default_stem``.

    ``features``: ``(B, H, W, in_channels) -> (B, h, w, 8 * width * block.expansion)`` with
    ``h = ceil(H / 8)`` for ``stem='cifar'`` and ``ceil(H / 32)`` for ``stem='imagenet'``.
    Head: GAP + ``classifier`` Linear. A ResNet-34 is ``class ResNet34(ResNet): block =
    BasicBlock; stage_sizes = (3, 4, 6, 3)``, or ``ResNet18(stage_sizes=(3, 4, 6, 3), ...)``.

    State paths (torchvision-like): ``conv1``, ``bn1``, ``layer{1..4}.<j>.{conv1, bn1, conv2,
    bn2[, conv3, bn3], downsample_conv, downsample_bn}``, ``classifier.{kernel,bias}``.
    Initialisation: conv kernels He normal (fan_out), BatchNorm scale 1 and bias 0, the
    classifier LeCun normal (truncated) with zero bias.

    Args:
      num_classes: number of classes ``K`` (>= 1).
      in_channels: input channels (>= 1).
      width: base width; stage widths ``w, 2w, 4w, 8w`` (64 for the standard networks).
      stem: ``'cifar'`` or ``'imagenet'``; None: the class's ``default_stem``.
      stage_sizes: blocks in each of the four stages; None: the class's (``(2, 2, 2, 2)`` for
        ResNet-18). The first block of stages 2-4 downsamples, so any depth keeps the shapes
        above; ``(1, 1, 1, 1)`` is the ResNet-10 of the literature.
      activation: nonlinearity used everywhere ReLU would be.
      zero_init_residual: zero-init the last BN scale of each residual branch (torchvision's
        option of the same name).
      conv_impl: ``'auto'``, ``'xla'`` or ``'matmul'`` (:mod:`saljax.models.conv`).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: parameter initialisation keys.
    """

    block: ClassVar[type[BasicBlock]]
    #: Blocks per stage: the class's default, and after ``__init__`` the instance's own.
    stage_sizes: tuple[int, int, int, int]
    default_stem: ClassVar[str] = "imagenet"

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: str | None = None,
        stage_sizes: Sequence[int] | None = None,
        activation: _checks.Activation = nnx.relu,
        zero_init_residual: bool = False,
        conv_impl: str = "auto",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.width = _checks.positive_int("width", width)
        self.stem = _checks.choice("stem", self.default_stem if stem is None else stem, STEMS)
        if stage_sizes is not None:
            sizes = _checks.positive_ints("stage_sizes", stage_sizes)
            if len(sizes) != 4:
                raise ValueError(f"stage_sizes must be four positive ints (one per stage), got {stage_sizes!r}")
            self.stage_sizes = (sizes[0], sizes[1], sizes[2], sizes[3])
        self.activation = _checks.activation(activation)
        self.conv_impl = _checks.choice("conv_impl", conv_impl, conv_lib.CONV_IMPLS)
        self.dtype = _checks.float_dtype("dtype", dtype)
        self.param_dtype = _checks.float_dtype("param_dtype", param_dtype)
        self.head_type = "gap"
        kw: dict[str, Any] = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

        if self.stem == "imagenet":  # 7x7 stride 2 (+ max-pool in backbone)
            self.conv1 = layers.conv2d(self.in_channels, width, 7, 2, use_bias=False, conv_impl=conv_impl, **kw)
        else:  # 'cifar': 3x3 stride 1, no max-pool
            self.conv1 = layers.conv2d(self.in_channels, width, 3, 1, use_bias=False, conv_impl=conv_impl, **kw)
        self.bn1 = layers.batch_norm(width, **kw)

        # Stages layer1..layer4 (torchvision's names), widths w, 2w, 4w, 8w.
        in_planes = width
        for i, n_blocks in enumerate(self.stage_sizes):
            planes = width * 2**i
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(self.block(in_planes, planes, stride, activation=self.activation,
                                         zero_init_residual=zero_init_residual, conv_impl=conv_impl, **kw))
                in_planes = planes * self.block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))

        self.feature_channels = in_planes
        self.classifier = layers.dense(in_planes, self.num_classes, dtype=jnp.promote_types(self.param_dtype, jnp.float32),
                                       param_dtype=self.param_dtype, rngs=rngs)

    @property
    def stages(self) -> tuple[nnx.List, ...]:
        """The stages ``layer1, layer2, ...`` in order."""
        return tuple(getattr(self, f"layer{i + 1}") for i in range(len(self.stage_sizes)))

    def backbone(self, x: jax.Array) -> jax.Array:
        x = self.activation(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = layers.max_pool(x, 3, 2, 1)  # torchvision: MaxPool2d(3, stride=2, padding=1)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return x

    def decompose_features(self, parts: cd.Parts) -> cd.Parts:
        parts = cd.activation(self.activation, cd.layer(self.bn1, cd.layer(self.conv1, parts)))
        if self.stem == "imagenet":
            parts = cd.max_pool(parts, 3, 2, 1)
        for stage in self.stages:
            for block in stage:
                parts = block.decompose(parts)
        return parts


class ResNet18(ResNet):
    """ResNet-18: BasicBlock ``[2, 2, 2, 2]``, features ``8 * width``; ``stem`` defaults to
    ``'cifar'`` (3x3 stride-1 stem, no max-pool: the GradMask follow-up's network). Arguments:
    see :class:`ResNet`."""

    registry_name = "resnet18"
    block = BasicBlock
    stage_sizes = (2, 2, 2, 2)
    default_stem = "cifar"


class ResNet50(ResNet):
    """ResNet-50 (v1.5): Bottleneck ``[3, 4, 6, 3]``, expansion 4, stride on the 3x3; features
    ``32 * width`` (2048 for ``width=64``); ``stem`` defaults to ``'imagenet'`` (CYBORG's backbone).
    Arguments: see :class:`ResNet`."""

    registry_name = "resnet50"
    block = Bottleneck
    stage_sizes = (3, 4, 6, 3)
    default_stem = "imagenet"
