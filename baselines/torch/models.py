"""PyTorch SimpleCNN, ResNet18, ResNet50, MLP and XILCNN with the architecture and options of saljax.models.

Layout NCHW (saljax: NHWC). Every model offers the interface the losses use:

  features(x) -> A      x (B, in_channels, H, W) -> A (B, C', h, w)
  head(A) -> logits     (B, C', h, w) -> (B, K); 'gap': global average pooling + `classifier`
  forward(x) = head(features(x))

Module names follow the flax paths of saljax.models so that `layout` maps one onto the other by
renaming: `convs.<i>`, `norms.<i>`, `hidden`, `deeper.<i>`, `classifier`, `conv1`, `bn1`,
`layer{1..4}.<j>.{conv1, bn1, conv2, bn2, conv3, bn3, downsample_conv, downsample_bn}`. `hidden` is
always the dense layer that reads a flattened map or image; `mlp_feature_shape` (h, w, C) is that
map's shape, which `layout` needs to reorder its weight.

Hyperparameters as saljax: padding k // 2 on every side, max-pool 3x3/2 padding 1, BatchNorm
momentum 0.1 and eps 1e-5 (PyTorch defaults; flax's 0.9 is the same average). PyTorch updates
`running_var` with the unbiased batch variance where flax uses the biased one (see
`layout.flax_running_var`). The head runs in at least float32, as saljax's (which casts to float32
exactly): bfloat16 features are upcast, float64 stay float64.

Initialisation mirrors saljax's distributions (not its random streams): conv kernels Kaiming
normal (fan_out, untruncated), conv biases zero, dense kernels LeCun normal truncated at 2 std,
dense biases zero, BatchNorm scale 1 (0 for the last of each residual branch with
`zero_init_residual`) and bias 0. MLP and XILCNN keep PyTorch's default initialisation, as saljax does
for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "SimpleCNN", "ResNet18", "ResNet50", "MLP", "XILCNN", "create", "MODEL_NAMES"]

Activation = Callable[[torch.Tensor], torch.Tensor]

# Names shared with the saljax side (jax.nn.relu, jnp.tanh, jax.nn.softplus, jax.nn.silu, ...).
ACTIVATIONS: dict[str, Activation] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}

BN_MOMENTUM = 0.1  # torch convention: new = (1 - m) old + m batch; flax's 0.9 is the same
BN_EPSILON = 1e-5


def _activation(value: str | Activation) -> Activation:
    if isinstance(value, str):
        if value not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable; got {value!r}")
        return ACTIVATIONS[value]
    if not callable(value):
        raise ValueError(f"activation must be a name or a callable; got {value!r}")
    return value


def _conv(c_in: int, c_out: int, k: int, stride: int, *, bias: bool) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _bn(c: int, *, zero_scale: bool = False) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=BN_EPSILON, momentum=BN_MOMENTUM)
    if zero_scale:
        nn.init.zeros_(bn.weight)
    return bn


def _linear(c_in: int, c_out: int) -> nn.Linear:
    linear = nn.Linear(c_in, c_out)
    # flax's LeCun normal: truncated at +-2 std of the standard normal, rescaled to std 1/sqrt(fan_in).
    std = math.sqrt(1.0 / c_in) / 0.87962566103423978
    nn.init.trunc_normal_(linear.weight, std=std, a=-2.0 * std, b=2.0 * std)
    nn.init.zeros_(linear.bias)
    return linear


class _Classifier(nn.Module):
    head_type: str
    classifier: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, a: torch.Tensor) -> torch.Tensor:
        """GAP + Dense: (B, C', h, w) -> (B, K), in at least float32 (outside autocast)."""
        with torch.autocast(a.device.type, enabled=False):
            a = a.to(torch.promote_types(a.dtype, torch.float32))
            return self.classifier(a.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits (B, K); `(A, logits)` with `return_features` (for `torch.func.functional_call`)."""
        a = self.features(x)
        return (a, self.head(a)) if return_features else self.head(a)

    @property
    def norm_modules(self) -> frozenset[str]:
        """Dotted names of the BatchNorm modules (`layout.from_torch` needs them)."""
        return frozenset(n for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def _stride2_out(n: int) -> int:
    return (n - 1) // 2 + 1


class SimpleCNN(_Classifier):
    """GradMask's small CNN: 3x3 stride-2 convs (with bias), each + BatchNorm + activation.

    `head_type` 'gap' (any input size) or 'mlp': flatten (C, h, w) -> `hidden` Linear -> activation
    -> `classifier` Linear; 'mlp' needs `input_size`. `mlp_feature_shape` is (h, w, C) for 'mlp'.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 32, 16, 8),
        activation: str | Activation = "relu",
        head_type: str = "gap",
        mlp_hidden: int = 128,
        input_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if head_type not in ("gap", "mlp"):
            raise ValueError(f"head_type must be 'gap' or 'mlp'; got {head_type!r}")
        channels = tuple(channels)
        self.num_classes, self.in_channels, self.head_type = num_classes, in_channels, head_type
        self.activation = _activation(activation)
        self.feature_channels = channels[-1]
        convs, norms, c_in = [], [], in_channels
        for c_out in channels:
            convs.append(_conv(c_in, c_out, 3, 2, bias=True))
            norms.append(_bn(c_out))
            c_in = c_out
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.mlp_feature_shape: tuple[int, int, int] | None = None
        if head_type == "mlp":
            if input_size is None:
                raise ValueError("input_size (H or (H, W)) is required for head_type='mlp'")
            h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            for _ in channels:
                h, w = _stride2_out(h), _stride2_out(w)
            self.mlp_feature_shape = (h, w, channels[-1])
            self.hidden = _linear(h * w * channels[-1], mlp_hidden)
            self.classifier = _linear(mlp_hidden, num_classes)
        else:
            self.classifier = _linear(channels[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = self.activation(norm(conv(x)))
        return x

    def head(self, a: torch.Tensor) -> torch.Tensor:
        if self.head_type == "gap":
            return super().head(a)
        with torch.autocast(a.device.type, enabled=False):
            a = a.to(torch.promote_types(a.dtype, torch.float32))
            return self.classifier(self.activation(self.hidden(torch.flatten(a, 1))))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, *, activation: Activation, zero_init_residual: bool):
        super().__init__()
        self.activation = activation
        self.conv1 = _conv(in_planes, planes, 3, stride, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3, 1, bias=False)
        self.bn2 = _bn(planes, zero_scale=zero_init_residual)
        self.downsample_conv, self.downsample_bn = _downsample(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.activation(y + _shortcut(self, x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, *, activation: Activation, zero_init_residual: bool):
        super().__init__()
        out_planes = planes * self.expansion
        self.activation = activation
        self.conv1 = _conv(in_planes, planes, 1, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3, stride, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = _bn(planes)
        self.conv3 = _conv(planes, out_planes, 1, 1, bias=False)
        self.bn3 = _bn(out_planes, zero_scale=zero_init_residual)
        self.downsample_conv, self.downsample_bn = _downsample(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.bn1(self.conv1(x)))
        y = self.activation(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.activation(y + _shortcut(self, x))


def _downsample(in_planes: int, out_planes: int, stride: int) -> tuple[nn.Module | None, nn.Module | None]:
    if stride == 1 and in_planes == out_planes:
        return None, None
    return _conv(in_planes, out_planes, 1, stride, bias=False), _bn(out_planes)


def _shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if block.downsample_conv is None:
        return x
    return block.downsample_bn(block.downsample_conv(x))


class _ResNet(_Classifier):
    _block: type[nn.Module]
    _stage_sizes: tuple[int, int, int, int]
    _default_stem: str

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: str | None = None,
        stage_sizes: Sequence[int] | None = None,
        activation: str | Activation = "relu",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        stem = stem or self._default_stem
        stages = tuple(self._stage_sizes if stage_sizes is None else stage_sizes)
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet'; got {stem!r}")
        self.num_classes, self.in_channels, self.width, self.stem = num_classes, in_channels, width, stem
        self.head_type = "gap"
        self.activation = _activation(activation)
        self.conv1 = _conv(in_channels, width, 7, 2, bias=False) if stem == "imagenet" else _conv(
            in_channels, width, 3, 1, bias=False)
        self.bn1 = _bn(width)
        in_planes = width
        for i, n_blocks in enumerate(stages):
            planes = width * 2**i
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(self._block(in_planes, planes, stride, activation=self.activation,
                                          zero_init_residual=zero_init_residual))
                in_planes = planes * self._block.expansion
            setattr(self, f"layer{i + 1}", nn.ModuleList(blocks))
        self.feature_channels = in_planes
        self.classifier = _linear(in_planes, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Standard (NCHW-contiguous) memory: on AVX2 CPUs torch 2.13's oneDNN corrupts the heap in the
        # backward pass of a channels_last 1x1 stride-2 convolution (the downsampling shortcut), and
        # a batch permuted from NHWC (the second-pass terms' shuffled or noised images) is channels_last.
        x = self.activation(self.bn1(self.conv1(x.contiguous())))
        if self.stem == "imagenet":
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return x


class ResNet18(_ResNet):
    """BasicBlock [2, 2, 2, 2] (or `stage_sizes`), widths w, 2w, 4w, 8w; stem 'cifar' (default) or 'imagenet'."""

    _block = _BasicBlock
    _stage_sizes = (2, 2, 2, 2)
    _default_stem = "cifar"


class ResNet50(_ResNet):
    """Bottleneck [3, 4, 6, 3] (or `stage_sizes`) (v1.5), features 32*width; stem 'imagenet' (default) or 'cifar'."""

    _block = _Bottleneck
    _stage_sizes = (3, 4, 6, 3)
    _default_stem = "imagenet"


def _size(value: int | Sequence[int]) -> tuple[int, int]:
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    return int(h), int(w)


class MLP(_Classifier):
    """RRR's MLP: flatten (C, H, W) -> `hidden` -> act -> `deeper.<i>` -> act -> `classifier`.

    features: the last hidden layer as a (B, C', 1, 1) map; head: `classifier` on it ('dense').
    `mlp_feature_shape` is the image's (H, W, C): `hidden` reads the flattened image.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 1,
        input_size: int | Sequence[int] = (28, 28),
        hidden_sizes: Sequence[int] = (50, 50),
        activation: str | Activation = "relu",
    ) -> None:
        super().__init__()
        h, w = _size(input_size)
        sizes = tuple(hidden_sizes)
        self.num_classes, self.in_channels, self.head_type = num_classes, in_channels, "dense"
        self.input_size = (h, w)
        self.activation = _activation(activation)
        self.feature_channels = sizes[-1]
        self.mlp_feature_shape: tuple[int, int, int] = (h, w, in_channels)
        self.hidden = nn.Linear(h * w * in_channels, sizes[0])
        self.deeper = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.hidden(torch.flatten(x, 1)))
        for layer in self.deeper:
            h = self.activation(layer(h))
        return h[:, :, None, None]

    def head(self, a: torch.Tensor) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):
            a = a.to(torch.promote_types(a.dtype, torch.float32))
            return self.classifier(torch.flatten(a, 1))


class XILCNN(_Classifier):
    """XIL's DecoyMNIST CNN: [conv 5x5 (VALID, bias) -> act -> max-pool 2x2] x 2 = features; head:
    flatten (C, h, w) -> `hidden` -> act -> `classifier` ('mlp')."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 1,
        input_size: int | Sequence[int] = (28, 28),
        channels: Sequence[int] = (20, 50),
        kernel_size: int = 5,
        mlp_hidden: int = 256,
        activation: str | Activation = "relu",
    ) -> None:
        super().__init__()
        h, w = _size(input_size)
        channels = tuple(channels)
        self.num_classes, self.in_channels, self.head_type = num_classes, in_channels, "mlp"
        self.activation = _activation(activation)
        self.feature_channels = channels[-1]
        self.convs = nn.ModuleList([nn.Conv2d(a, b, kernel_size) for a, b in zip((in_channels, *channels), channels)])
        for _ in channels:
            h, w = (h - kernel_size + 1) // 2, (w - kernel_size + 1) // 2
        self.mlp_feature_shape = (h, w, channels[-1])
        self.hidden = nn.Linear(h * w * channels[-1], mlp_hidden)
        self.classifier = nn.Linear(mlp_hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.max_pool2d(self.activation(conv(x)), 2, 2)
        return x

    def head(self, a: torch.Tensor) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):
            a = a.to(torch.promote_types(a.dtype, torch.float32))
            return self.classifier(self.activation(self.hidden(torch.flatten(a, 1))))


_REGISTRY: dict[str, type[_Classifier]] = {"simple_cnn": SimpleCNN, "resnet18": ResNet18, "resnet50": ResNet50,
                                           "mlp": MLP, "xil_cnn": XILCNN}
MODEL_NAMES = tuple(_REGISTRY)


def create(name: str, **kwargs) -> _Classifier:
    """A model by saljax's name ('simple_cnn', 'resnet18', 'resnet50', 'mlp', 'xil_cnn') and constructor arguments."""
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {list(MODEL_NAMES)}; got {name!r}")
    return _REGISTRY[name](**kwargs)
