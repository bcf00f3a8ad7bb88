"""Image classifiers for saliency-guided training (Flax NNX).

Every model is an :class:`ImageClassifier` (:mod:`saljax.models.base`): ``features(x) -> A``
``(B, h, w, C')``, ``head(A) -> logits (B, K)``, ``model(x) = head(features(x))``, with
``in_channels``, ``num_classes``, ``feature_channels`` and ``head_type`` attributes. CAM methods
need ``head_type == 'gap'`` (global average pooling + one Dense layer, ``model.classifier``; then
``z_c = b_c + mean_ij CAM_c(i, j)`` exactly); :func:`require_cam_head` raises for other heads.

Models (:func:`create` names):

- ``'simple_cnn'`` :class:`SimpleCNN`: GradMask's small CNN (Simpson et al., MIDL 2019).
- ``'resnet18'`` :class:`ResNet18`, ``'resnet50'`` :class:`ResNet50` (He et al., CVPR 2016;
  torchvision's layout, v1.5), ``stem='cifar'`` (3x3 stride 1, no max-pool) or ``'imagenet'``.
- ``'mlp'`` :class:`MLP`: RRR's two-hidden-layer perceptron (Ross et al., IJCAI 2017).
- ``'xil_cnn'`` :class:`XILCNN`: the DecoyMNIST CNN of the XIL typology (Friedrich et al., Nature
  Machine Intelligence 2023).

Train / eval mode (flax 0.12)
-----------------------------
``nnx.BatchNorm`` reads ``use_running_average`` at call time. Models are built in training mode
(batch statistics used, running averages updated on every forward pass), as in PyTorch. Switch in
place with ``model.eval()`` / ``model.train()``, or take a view without mutating the model::

    eval_model = nnx.view(model, use_running_average=True)

A view shares its Variables with ``model``. Running statistics are ``nnx.BatchStat`` Variables
``mean`` and ``var``; parameters are ``nnx.Param``. For functional code::

    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

In training mode every forward pass (also one made only for a saliency map) moves the running
statistics and an output depends on the other batch members; explain in eval mode.

Layers, padding, initialisation: :mod:`saljax.models.layers` (PyTorch-matching BatchNorm, explicit
symmetric padding ``k // 2``; flax's running ``var`` is the biased batch variance, PyTorch's the
unbiased one). Convolution implementation: ``conv_impl`` (:mod:`saljax.models.conv`; ``'auto'``
runs strided convolutions on CPU as a matmul, which makes double backprop several times faster).

dtypes: ``param_dtype`` (default float32) for parameters, ``dtype`` (default float32) for the
computation, e.g. ``dtype=jnp.bfloat16``. BatchNorm statistics and the head run in float32 at least
(float64 for float64 parameters); logits are float32 (float64).

Porting weights from PyTorch: conv kernels are HWIO here (``torch_weight.permute(2, 3, 1, 0)``),
dense kernels ``(in, out)`` (``torch_weight.T``), and a dense layer reading a flattened map or
image flattens in (h, w, C) order where PyTorch flattens NCHW in (C, h, w) order.
"""

from saljax.models import conv, decomposition, layers
from saljax.models._checks import Activation
from saljax.models.base import ImageClassifier, in_mode, require_cam_head
from saljax.models.conv import CONV_IMPLS
from saljax.models.decomposition import decompose
from saljax.models.layers import BN_EPSILON, BN_MOMENTUM
from saljax.models.mlp import MLP
from saljax.models.registry import MODEL_NAMES, create, model_names, register
from saljax.models.resnet import STEMS, BasicBlock, Bottleneck, ResNet, ResNet18, ResNet50
from saljax.models.simple_cnn import SimpleCNN
from saljax.models.xil_cnn import XILCNN

__all__ = [
    "Activation",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "BasicBlock",
    "Bottleneck",
    "CONV_IMPLS",
    "ImageClassifier",
    "MLP",
    "MODEL_NAMES",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "STEMS",
    "SimpleCNN",
    "XILCNN",
    "conv",
    "create",
    "decompose",
    "decomposition",
    "in_mode",
    "layers",
    "model_names",
    "register",
    "require_cam_head",
]
