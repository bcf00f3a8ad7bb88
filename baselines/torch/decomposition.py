"""Contextual decomposition (CD) of the torch SimpleCNN, XILCNN, MLP and ResNets, as `saljax.models.decomposition`.

CD (Murdoch, Liu, Yu, ICLR 2018; Singh, Murdoch, Yu, ICLR 2019; used by CDEP, Rieger, Singh,
Murdoch, Yu, ICML 2020) carries `beta`, the contribution of an input region, and `gamma`, that of
the rest, through the network, `beta + gamma` = the ordinary activation. The rules, written the way
the CDEP authors' PyTorch code propagates them, with saljax's choices:

- input: `beta = region * x`, `gamma = (1 - region) * x` (NCHW; a (B, H, W) region covers every channel);
- conv and linear layers: the weights act on both parts, the bias is split in proportion to
  `|W beta| + 1e-20` and `|W gamma| + 1e-20`;
- BatchNorm as the affine map `m x + c`, `c` split like a bias. In train mode (or without running
  statistics) `m` and `c` use the biased batch statistics of `beta + gamma` (kept in the graph, as
  the forward pass); the running statistics are never read or updated there. In eval mode they use
  the running statistics;
- elementwise activations `f`: `(f(beta), f(beta + gamma) - f(beta))`;
- max-pool (with `-inf` padding, as the ResNets' 3x3/2 stem pool): both parts at the argmax of
  `beta + gamma`; average pooling, global average pooling, residual additions and flattening act
  on both parts.

`decompose(model, x, region)` refuses a model type it has no rule for, naming it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines.torch import models

__all__ = ["decompose"]

Parts = tuple[torch.Tensor, torch.Tensor]

_EPS = 1e-20


def _split_bias(beta: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor) -> Parts:
    pb, pg = beta.abs() + _EPS, gamma.abs() + _EPS
    share = pb / (pb + pg)
    return beta + share * bias, gamma + (1 - share) * bias


def _both(fn, parts: Parts) -> Parts:
    beta, gamma = parts
    out = fn(torch.cat([beta, gamma], dim=0))
    return out[: beta.shape[0]], out[beta.shape[0]:]


def _conv(conv: nn.Conv2d, parts: Parts) -> Parts:
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError("contextual decomposition supports Conv2d with groups=1 and zero padding")
    beta, gamma = _both(lambda x: F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation), parts)
    if conv.bias is None:
        return beta, gamma
    return _split_bias(beta, gamma, conv.bias.view(1, -1, 1, 1))


def _linear(linear: nn.Linear, parts: Parts) -> Parts:
    beta, gamma = _both(lambda x: F.linear(x, linear.weight), parts)
    if linear.bias is None:
        return beta, gamma
    return _split_bias(beta, gamma, linear.bias)


def _batch_norm(bn: nn.BatchNorm2d, parts: Parts) -> Parts:
    beta, gamma = parts
    if bn.training or bn.running_mean is None or bn.running_var is None:
        x = beta + gamma
        mean = x.mean(dim=(0, 2, 3))
        var = (x - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
    else:
        mean, var = bn.running_mean, bn.running_var
    mul = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        mul = mul * bn.weight
    offset = -mean * mul
    if bn.bias is not None:
        offset = offset + bn.bias
    mul, offset = mul.view(1, -1, 1, 1), offset.view(1, -1, 1, 1)
    return _split_bias(beta * mul, gamma * mul, offset)


def _layer(module: nn.Module, parts: Parts) -> Parts:
    if type(module) is nn.Conv2d:
        return _conv(module, parts)
    if type(module) is nn.Linear:
        return _linear(module, parts)
    if type(module) is nn.BatchNorm2d:
        return _batch_norm(module, parts)
    raise ValueError(f"no contextual decomposition for layer {type(module).__name__}")


def _activation(fn, parts: Parts) -> Parts:
    if fn not in models.ACTIVATIONS.values():
        raise ValueError(f"no contextual decomposition for activation {getattr(fn, '__name__', fn)!r}")
    beta, gamma = parts
    f_beta = fn(beta)
    return f_beta, fn(beta + gamma) - f_beta


def _max_pool(parts: Parts, window: int, stride: int, padding: int = 0) -> Parts:
    beta, gamma = parts
    # The indices point into the unpadded map (F.max_pool2d pads with -inf, as saljax).
    _, index = F.max_pool2d(beta + gamma, window, stride, padding, return_indices=True)
    pick = lambda v: v.flatten(2).gather(2, index.flatten(2)).view(index.shape)
    return pick(beta), pick(gamma)


def _add(p: Parts, q: Parts) -> Parts:
    return p[0] + q[0], p[1] + q[1]


def _global_avg_pool(parts: Parts) -> Parts:
    return parts[0].mean(dim=(2, 3)), parts[1].mean(dim=(2, 3))


def _flatten(parts: Parts) -> Parts:
    return torch.flatten(parts[0], 1), torch.flatten(parts[1], 1)


def _head_dtype(parts: Parts) -> Parts:
    """The heads run in at least float32, as the models' `head`."""
    dtype = torch.promote_types(parts[0].dtype, torch.float32)
    return parts[0].to(dtype), parts[1].to(dtype)


def _simple_cnn(model: models.SimpleCNN, parts: Parts) -> Parts:
    for conv, norm in zip(model.convs, model.norms):
        parts = _activation(model.activation, _layer(norm, _layer(conv, parts)))
    parts = _head_dtype(parts)
    if model.head_type == "gap":
        return _layer(model.classifier, _global_avg_pool(parts))
    return _layer(model.classifier, _activation(model.activation, _layer(model.hidden, _flatten(parts))))


def _xil_cnn(model: models.XILCNN, parts: Parts) -> Parts:
    for conv in model.convs:
        parts = _max_pool(_activation(model.activation, _layer(conv, parts)), 2, 2)
    parts = _flatten(_head_dtype(parts))
    return _layer(model.classifier, _activation(model.activation, _layer(model.hidden, parts)))


def _mlp(model: models.MLP, parts: Parts) -> Parts:
    parts = _activation(model.activation, _layer(model.hidden, _flatten(parts)))
    for layer in model.deeper:
        parts = _activation(model.activation, _layer(layer, parts))
    return _layer(model.classifier, _head_dtype(parts))


def _shortcut(block: nn.Module, parts: Parts) -> Parts:
    if block.downsample_conv is None:
        return parts
    return _layer(block.downsample_bn, _layer(block.downsample_conv, parts))


def _basic_block(block: nn.Module, parts: Parts) -> Parts:
    y = _activation(block.activation, _layer(block.bn1, _layer(block.conv1, parts)))
    y = _layer(block.bn2, _layer(block.conv2, y))
    return _activation(block.activation, _add(y, _shortcut(block, parts)))


def _bottleneck(block: nn.Module, parts: Parts) -> Parts:
    y = _activation(block.activation, _layer(block.bn1, _layer(block.conv1, parts)))
    y = _activation(block.activation, _layer(block.bn2, _layer(block.conv2, y)))
    y = _layer(block.bn3, _layer(block.conv3, y))
    return _activation(block.activation, _add(y, _shortcut(block, parts)))


_BLOCKS = {models._BasicBlock: _basic_block, models._Bottleneck: _bottleneck}


def _resnet(model: models._ResNet, parts: Parts) -> Parts:
    parts = _activation(model.activation, _layer(model.bn1, _layer(model.conv1, parts)))
    if model.stem == "imagenet":
        parts = _max_pool(parts, 3, 2, 1)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            parts = _BLOCKS[type(block)](block, parts)
    return _layer(model.classifier, _global_avg_pool(_head_dtype(parts)))


_MODELS = {models.SimpleCNN: _simple_cnn, models.XILCNN: _xil_cnn, models.MLP: _mlp,
           models.ResNet18: _resnet, models.ResNet50: _resnet}


def decompose(model: nn.Module, x: torch.Tensor, region: torch.Tensor) -> Parts:
    """`(beta, gamma)` of the logits (B, K) of `model` on x (B, C, H, W); `region` (B, H, W) or (B, C, H, W)."""
    rule = _MODELS.get(type(model))
    if rule is None:
        raise ValueError(f"no contextual decomposition for model {type(model).__name__}; known: "
                         f"{sorted(t.__name__ for t in _MODELS)}")
    if region.dim() == 3:
        region = region[:, None]
    region = region.to(x.dtype).expand_as(x)
    return rule(model, (region * x, (1 - region) * x))
