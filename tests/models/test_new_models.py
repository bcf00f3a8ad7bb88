"""saljax.models: RRR's MLP, XIL's CNN, the conv_impl switch, register() and the red-herring ResNet-18.

Forward passes are compared in float64 with a numpy re-implementation of the architecture.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_conv_matches_lax_to_second_order
from flax import nnx

from saljax import models, saliency


def _np(v):
    return np.asarray(v[...], np.float64)


def _relu(x):
    return np.maximum(x, 0.0)


def _conv_valid(x, w, b):
    """NHWC x (B, H, W, C), HWIO w -> VALID stride-1 correlation + b."""
    kh, kw = w.shape[:2]
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("bhwc,co->bhwo", x[:, i : i + ho, j : j + wo, :], w[i, j])
    return out + b


def _pool2(x):
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


def test_mlp_matches_reference_and_has_the_features_head_contract(x64):
    model = models.create("mlp", num_classes=4, in_channels=2, input_size=(5, 3), hidden_sizes=(6, 7, 5),
                          param_dtype=jnp.float64, dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert (model.head_type, model.feature_channels, model.mlp_feature_shape) == ("dense", 5, (5, 3, 2))
    x = np.random.default_rng(0).normal(size=(3, 5, 3, 2))
    a = model.features(jnp.asarray(x))
    logits = model(jnp.asarray(x))
    assert a.shape == (3, 1, 1, 5) and logits.shape == (3, 4) and logits.dtype == jnp.float64
    np.testing.assert_array_equal(model.head(a), logits)
    # flatten in (H, W, C) order -> hidden -> deeper.0 -> deeper.1 -> classifier
    h = _relu(x.reshape(3, -1) @ _np(model.hidden.kernel) + _np(model.hidden.bias))
    for layer in model.deeper:
        h = _relu(h @ _np(layer.kernel) + _np(layer.bias))
    np.testing.assert_allclose(np.asarray(a)[:, 0, 0], h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logits, h @ _np(model.classifier.kernel) + _np(model.classifier.bias), rtol=1e-12,
                               atol=1e-12)


def test_mlp_defaults_are_rrr_network_with_torch_init():
    model = models.MLP(num_classes=10, rngs=nnx.Rngs(0))
    assert model.input_size == (28, 28) and model.in_channels == 1 and model.hidden_sizes == (50, 50)
    assert model.hidden.kernel.shape == (784, 50) and model.deeper[0].kernel.shape == (50, 50)
    assert model.classifier.kernel.shape == (50, 10)
    # PyTorch's nn.Linear default: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for layer, fan_in in ((model.hidden, 784), (model.deeper[0], 50), (model.classifier, 50)):
        bound = 1 / np.sqrt(fan_in)
        for p in (layer.kernel, layer.bias):
            values = np.asarray(p[...])
            assert np.abs(values).max() <= bound
        assert np.abs(np.asarray(layer.kernel[...])).max() > 0.9 * bound
    kernel = np.asarray(model.hidden.kernel[...])
    assert abs(kernel.std() * np.sqrt(3 * 784) - 1) < 0.02  # uniform: std = bound / sqrt(3)


def test_mlp_refuses_other_input_sizes_and_spatial_maps():
    model = models.MLP(num_classes=10, input_size=8, hidden_sizes=(4, 4), rngs=nnx.Rngs(0))
    assert model.input_size == (8, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 8, 8, 1\) for MLP\(input_size=\(8, 8\)\).*\(2, 9, 8, 1\)"):
        model(jnp.zeros((2, 9, 8, 1)))
    with pytest.raises(ValueError, match=r"in_channels=1"):
        model(jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"A must have shape \(B, 1, 1, 4\) for MLP"):
        model.head(jnp.zeros((2, 2, 2, 4)))
    with pytest.raises(ValueError, match="hidden_sizes"):
        models.MLP(num_classes=10, hidden_sizes=(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_size"):
        models.MLP(num_classes=10, input_size=(8, 0), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# XIL's CNN
# --------------------------------------------------------------------------------------------


def test_xil_cnn_matches_reference_on_28x28(x64):
    model = models.create("xil_cnn", num_classes=10, in_channels=1, param_dtype=jnp.float64, dtype=jnp.float64,
                          rngs=nnx.Rngs(0))
    assert model.feature_shape == (4, 4, 50) and model.hidden.kernel.shape == (800, 256)
    assert [c.kernel.shape for c in model.convs] == [(5, 5, 1, 20), (5, 5, 20, 50)]
    assert all(c.padding == "VALID" for c in model.convs)
    x = np.random.default_rng(1).normal(size=(2, 28, 28, 1))
    a = model.features(jnp.asarray(x))
    logits = model(jnp.asarray(x))
    assert a.shape == (2, 4, 4, 50) and logits.shape == (2, 10)
    np.testing.assert_array_equal(model.head(a), logits)
    ref = x
    for conv in model.convs:
        ref = _pool2(_relu(_conv_valid(ref, _np(conv.kernel), _np(conv.bias))))
    np.testing.assert_allclose(a, ref, rtol=1e-10, atol=1e-10)
    hidden = _relu(ref.reshape(2, -1) @ _np(model.hidden.kernel) + _np(model.hidden.bias))
    np.testing.assert_allclose(logits, hidden @ _np(model.classifier.kernel) + _np(model.classifier.bias),
                               rtol=1e-10, atol=1e-10)


def test_xil_cnn_other_sizes_torch_init_and_errors():
    model = models.XILCNN(num_classes=3, in_channels=2, input_size=(17, 21), channels=(3, 4), mlp_hidden=6,
                          rngs=nnx.Rngs(0))
    # 17 -> 13 -> 6 -> 2 -> 1 ; 21 -> 17 -> 8 -> 4 -> 2
    assert model.feature_shape == (1, 2, 4) and model.hidden.kernel.shape == (8, 6)
    assert model(jnp.ones((2, 17, 21, 2))).shape == (2, 3)
    bound = 1 / np.sqrt(2 * 25)
    kernel = np.asarray(model.convs[0].kernel[...])
    assert np.abs(kernel).max() <= bound and np.abs(np.asarray(model.convs[0].bias[...])).max() <= bound
    with pytest.raises(ValueError, match=r"x must have shape \(B, 17, 21, 2\) for XILCNN"):
        model(jnp.ones((2, 16, 21, 2)))
    with pytest.raises(ValueError, match="input_size must leave a non-empty feature map"):
        models.XILCNN(num_classes=3, input_size=15, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels must be two"):
        models.XILCNN(num_classes=3, channels=(4, 4, 4), rngs=nnx.Rngs(0))


def test_cam_methods_refuse_models_without_a_gap_head():
    xil = models.XILCNN(num_classes=3, input_size=20, channels=(2, 3), mlp_hidden=4, rngs=nnx.Rngs(0))
    mlp = models.MLP(num_classes=3, input_size=4, hidden_sizes=(3,), rngs=nnx.Rngs(0))
    for model, head_type in ((xil, "mlp"), (mlp, "dense")):
        with pytest.raises(ValueError, match=rf"cyborg needs class activation maps.*model {type(model).__name__} "
                                             rf"has head_type '{head_type}'"):
            models.require_cam_head(model, "cyborg")
    models.require_cam_head(models.SimpleCNN(num_classes=2, channels=(2,), rngs=nnx.Rngs(0)), "cyborg")
    # CAM code probes the head pixel by pixel; XIL's flattening head refuses that by itself.
    with pytest.raises(ValueError, match=r"XILCNN.*class activation maps are not defined"):
        saliency.class_activation_maps(xil.head, xil.features(jnp.ones((2, 20, 20, 1))))


# --------------------------------------------------------------------------------------------
# conv_impl
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, shape", [
    ("simple_cnn", {"channels": (3, 4)}, (2, 8, 8, 2)),  # stride-2 convs with bias
    pytest.param("xil_cnn", {"input_size": 16, "channels": (2, 3), "mlp_hidden": 4}, (2, 16, 16, 2),  # stride-1 VALID
                 marks=pytest.mark.slow),  # ~4 s on 2 cores
])
@pytest.mark.cpu_conv_default
def test_conv_impl_selects_the_convolution_and_keeps_parameters_and_values(name, kwargs, shape):
    built = {impl: models.create(name, num_classes=2, in_channels=2, conv_impl=impl, rngs=nnx.Rngs(0), **kwargs)
             for impl in models.CONV_IMPLS}
    x = jax.random.normal(jax.random.key(0), shape)
    outputs = {}
    for impl, model in built.items():
        model.eval()
        jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(built["auto"]))
        jaxpr = str(jax.make_jaxpr(lambda x, model=model: model(x))(x))
        strided = name == "simple_cnn"
        uses_lax = impl == "xla" or (impl == "auto" and not strided)  # auto: matmul for strided convs on CPU
        assert ("conv_general_dilated" in jaxpr) == uses_lax, (impl, jaxpr)
        outputs[impl] = np.asarray(model(x))
    for impl in models.CONV_IMPLS:
        np.testing.assert_allclose(outputs[impl], outputs["xla"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"conv_impl must be one of \['auto', 'xla', 'matmul'\]"):
        models.create(name, num_classes=2, in_channels=2, conv_impl="cudnn", rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.slow  # ~6 s on 2 cores
def test_matmul_conv_with_stride_one_matches_lax_to_second_order(x64):
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (2, 9, 8, 3), jnp.float64)
    w = jax.random.normal(kw, (5, 5, 3, 4), jnp.float64)
    jaxpr = assert_conv_matches_lax_to_second_order(models.conv.matmul_conv_general_dilated, x, w, (1, 1), "VALID")
    assert "conv_general_dilated" not in jaxpr


# --------------------------------------------------------------------------------------------
# Registry and the red-herring ResNet-18
# --------------------------------------------------------------------------------------------


class _Linear(models.ImageClassifier):
    """A user model: features = the image, GAP + Dense head."""

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs):
        self.num_classes, self.in_channels, self.feature_channels = num_classes, in_channels, in_channels
        self.head_type, self.dtype = "gap", jnp.float32
        self.classifier = models.layers.dense(in_channels, num_classes, dtype=jnp.float32, rngs=rngs)

    def backbone(self, x):
        return x


def test_register_makes_a_user_model_available_to_create():
    models.register("test_linear", _Linear)
    try:
        assert "test_linear" in models.model_names() and "test_linear" not in models.MODEL_NAMES
        model = models.create("test_linear", num_classes=3, in_channels=2, input_size=(4, 4), rngs=nnx.Rngs(0))
        x = jnp.ones((1, 4, 4, 2))
        np.testing.assert_allclose(model(x), model.classifier(jnp.ones((1, 2))), rtol=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            models.register("test_linear", _Linear)
    finally:
        from saljax.models import registry

        registry._REGISTRY.pop("test_linear", None)
    with pytest.raises(ValueError, match="subclass of saljax.models.ImageClassifier"):
        models.register("bad", dict)  # type: ignore[arg-type]


def test_create_passes_input_size_only_to_fixed_size_models():
    mlp = models.create("mlp", num_classes=2, in_channels=3, input_size=(6, 4), hidden_sizes=(2,), rngs=nnx.Rngs(0))
    assert mlp.input_size == (6, 4) and mlp.hidden.kernel.shape == (72, 2)
    resnet = nnx.eval_shape(lambda: models.create("resnet18", num_classes=2, in_channels=1, input_size=(6, 4),
                                                  width=2, rngs=nnx.Rngs(0)))
    assert resnet.stem == "cifar"


def test_red_herring_resnet18_width16_one_channel_28x28():
    """The GradMask follow-up's network: 3x3 stride-1 stem, no max-pool, 1 channel, 2 classes."""
    model = nnx.eval_shape(lambda: models.create("resnet18", num_classes=2, in_channels=1, width=16, rngs=nnx.Rngs(0)))
    assert model.stem == "cifar" and model.conv1.kernel.shape == (3, 3, 1, 16) and model.conv1.strides == (1, 1)
    x = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
    a = nnx.eval_shape(lambda m, x: m.features(x), model, x)
    logits = nnx.eval_shape(lambda m, x: m(x), model, x)
    assert a.shape == (4, 4, 4, 128) and logits.shape == (4, 2)  # 28 -> 28 -> 14 -> 7 -> 4
