"""saljax.models: shapes, the features/head interface, the CAM identity, BatchNorm modes,
bfloat16 compute, argument validation and jit / split-merge use.

Shapes are tiny (batch 2, <= 20x20 images, ResNet width 4) and each configuration is built and
compiled once per module, because XLA compilation dominates the run time on CPU.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_conv_matches_lax_to_second_order, slow_where
from flax import nnx

from saljax import models

# name -> (create() name, kwargs, input shape, expected feature-map shape)
CONFIGS = {
    "simple_gap": ("simple_cnn", dict(in_channels=1), (2, 20, 20, 1), (2, 2, 2, 8)),
    "simple_mlp": (
        "simple_cnn",
        dict(in_channels=3, head_type="mlp", input_size=16, mlp_hidden=8, channels=(8, 6, 4)),
        (2, 16, 16, 3),
        (2, 2, 2, 4),
    ),
    "r18_cifar": ("resnet18", dict(in_channels=3, width=4, stem="cifar"), (2, 16, 16, 3), (2, 2, 2, 32)),
    "r18_imagenet": ("resnet18", dict(in_channels=3, width=4, stem="imagenet"), (2, 32, 32, 3), (2, 1, 1, 32)),
    # ResNet-50 with an identity bottleneck and a downsampling one per stage (the full depth repeats them:
    # see test_resnets_have_torchvisions_depth_and_parameter_count).
    "r50_imagenet": ("resnet50", dict(in_channels=2, width=4, stage_sizes=(2, 1, 1, 1)), (2, 16, 16, 2),
                     (2, 1, 1, 128)),
    "r50_cifar": ("resnet50", dict(in_channels=3, width=4, stem="cifar", stage_sizes=(2, 1, 1, 1)), (2, 16, 16, 3),
                  (2, 2, 2, 128)),
}
NUM_CLASSES = 3


def _build(config: str, **extra) -> nnx.Module:
    name, kwargs, _, _ = CONFIGS[config]
    kwargs = {**kwargs, **extra}
    in_channels = kwargs.pop("in_channels")
    return models.create(name, num_classes=NUM_CLASSES, in_channels=in_channels, rngs=nnx.Rngs(0), **kwargs)


def _images(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@nnx.jit
def _probe(model, x):
    """Everything the interface tests look at, in one compiled program per configuration."""
    model = nnx.view(model, use_running_average=True)
    a = model.features(x)
    out = {"logits": model(x), "features": a, "head_of_features": model.head(a)}
    if model.head_type == "gap":
        b, h, w, c = a.shape
        pixels = a.reshape(b * h * w, 1, 1, c)
        out["head_of_pixels"] = model.head(pixels).reshape(b, h, w, -1)
        out["dense_of_pixels"] = model.classifier(pixels.reshape(-1, c).astype(jnp.float32)).reshape(b, h, w, -1)
    return out


@pytest.fixture(scope="session")
def probed():
    cache = {}

    def get(config):
        if config not in cache:
            model = _build(config)
            cache[config] = (model, jax.tree.map(np.asarray, _probe(model, _images(CONFIGS[config][2]))))
        return cache[config]

    return get


# --------------------------------------------------------------------------------------------
# Interface, shapes and the CAM identity
# --------------------------------------------------------------------------------------------


def _params(configs):
    """The ResNets build and probe for 2-5 s each on 2 cores: slow (SimpleCNN checks the interface in the
    fast tier)."""
    return slow_where(configs, lambda c: c.startswith("r"))


@pytest.mark.parametrize("config", _params(CONFIGS))
def test_shapes_and_call_is_head_of_features(probed, config):
    model, out = probed(config)
    _, _, x_shape, feature_shape = CONFIGS[config]
    assert out["features"].shape == feature_shape
    assert model.feature_channels == feature_shape[-1]
    assert out["logits"].shape == (2, NUM_CLASSES)
    assert out["logits"].dtype == np.float32
    assert np.isfinite(out["logits"]).all()
    np.testing.assert_array_equal(out["logits"], out["head_of_features"])
    assert model.classifier.kernel.shape == (
        (feature_shape[-1] if model.head_type == "gap" else model.mlp_hidden),
        NUM_CLASSES,
    )
    assert model.classifier.bias.shape == (NUM_CLASSES,)


@pytest.mark.parametrize("config", _params(c for c in CONFIGS if c != "simple_mlp"))
def test_gap_head_is_dense_per_pixel_and_cam_identity(probed, config):
    model, out = probed(config)
    assert model.head_type == "gap"
    # head on a 1x1 map is the Dense layer applied to that vector, so the head gives the CAM per pixel
    np.testing.assert_allclose(out["head_of_pixels"], out["dense_of_pixels"], rtol=1e-6, atol=1e-6)
    # z_c = b_c + mean_ij sum_k W[k, c] A[i, j, k]
    kernel = np.asarray(model.classifier.kernel[...], np.float64)
    bias = np.asarray(model.classifier.bias[...], np.float64)
    cam = np.einsum("bhwk,kc->bhwc", out["features"].astype(np.float64), kernel)
    np.testing.assert_allclose(cam.mean(axis=(1, 2)) + bias, out["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cam + bias, out["head_of_pixels"], rtol=1e-5, atol=1e-5)


def test_gap_head_accepts_any_spatial_size(probed):
    model, _ = probed("simple_gap")
    a = jax.random.normal(jax.random.key(3), (2, 3, 5, model.feature_channels))
    expected = model.classifier(jnp.mean(a, axis=(1, 2)))
    np.testing.assert_allclose(model.head(a), expected, rtol=1e-6, atol=1e-6)


def test_state_paths_and_initialisation():
    model = models.SimpleCNN(num_classes=4, in_channels=3, rngs=nnx.Rngs(0))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert {"classifier/kernel", "classifier/bias", "convs/0/kernel", "convs/0/bias", "norms/3/mean"} <= paths
    params = nnx.state(model, nnx.Param)
    assert params["classifier"]["kernel"][...].shape == (8, 4)
    # He normal fan_out: std sqrt(2 / (3 * 3 * 64)) for the first conv (3x3x3x64 = 1728 samples)
    kernel = np.asarray(model.convs[0].kernel[...])
    assert abs(kernel.std() / np.sqrt(2 / (9 * 64)) - 1) < 0.1
    assert abs(kernel.mean()) < 0.01
    np.testing.assert_array_equal(model.convs[0].bias[...], 0)
    np.testing.assert_array_equal(model.norms[0].scale[...], 1)
    np.testing.assert_array_equal(model.norms[0].bias[...], 0)
    np.testing.assert_array_equal(model.classifier.bias[...], 0)
    # PyTorch-matching hyperparameters, explicit symmetric padding
    assert (model.norms[0].momentum, model.norms[0].epsilon) == (0.9, 1e-5)
    assert model.convs[0].padding == ((1, 1), (1, 1))

    resnet = models.ResNet18(num_classes=2, width=4, stem="imagenet", zero_init_residual=True, rngs=nnx.Rngs(0))
    assert resnet.conv1.padding == ((3, 3), (3, 3))
    assert resnet.conv1.bias is None and resnet.layer2[0].downsample_conv.bias is None
    assert resnet.layer1[0].downsample_conv is None
    assert resnet.layer2[0].downsample_conv.strides == (2, 2)
    np.testing.assert_array_equal(resnet.layer1[0].bn2.scale[...], 0)
    np.testing.assert_array_equal(resnet.layer1[0].bn1.scale[...], 1)
    resnet50 = models.ResNet50(num_classes=2, width=4, rngs=nnx.Rngs(0))
    block = resnet50.layer2[0]  # v1.5: the stride sits on the 3x3 conv
    assert block.conv1.strides == (1, 1) and block.conv2.strides == (2, 2)
    assert block.conv3.kernel.shape == (1, 1, 8, 32)


def test_resnets_have_torchvisions_depth_and_parameter_count():
    """The full-size networks (abstract: nothing is allocated or compiled) against torchvision's parameter
    counts; elsewhere the tests use narrower or shallower ResNets made of the same blocks."""
    for cls, sizes, count in ((models.ResNet18, (2, 2, 2, 2), 11_689_512), (models.ResNet50, (3, 4, 6, 3), 25_557_032)):
        model = nnx.eval_shape(lambda cls=cls: cls(num_classes=1000, stem="imagenet", rngs=nnx.Rngs(0)))
        assert tuple(len(stage) for stage in model.stages) == sizes
        assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == count
    shallow = nnx.eval_shape(lambda: models.create("resnet18", num_classes=2, in_channels=3, width=2,
                                                   stage_sizes=[1, 2, 1, 1], rngs=nnx.Rngs(0)))
    assert shallow.stage_sizes == (1, 2, 1, 1) and models.ResNet18.stage_sizes == (2, 2, 2, 2)
    assert tuple(len(stage) for stage in shallow.stages) == (1, 2, 1, 1)
    assert shallow.layer2[0].downsample_conv is not None and shallow.layer2[1].downsample_conv is None


def test_stride2_conv_matches_symmetric_zero_padding():
    """The first SimpleCNN conv equals a reference conv with PyTorch's padding=1 on an even input."""
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(2,), rngs=nnx.Rngs(0))
    x = np.asarray(_images((1, 6, 6, 1)))
    w = np.asarray(model.convs[0].kernel[...])  # (3, 3, 1, 2)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros((1, 3, 3, 2), np.float32)
    for i in range(3):
        for j in range(3):
            patch = padded[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
            expected[0, i, j] = np.einsum("hwc,hwco->o", patch, w)
    np.testing.assert_allclose(model.convs[0](jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


_NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [(3, 2, ((1, 1), (1, 1))), (1, 2, ((0, 0), (0, 0))), (3, (2, 1), "VALID"), (3, 3, ((2, 0), (1, 1))),
     pytest.param(7, 2, ((3, 3), (3, 3)), marks=pytest.mark.slow)],  # 49 slices: 5 s to compile
)
def test_strided_conv_as_matmul_matches_lax_to_second_order(kernel, stride, padding, x64):
    """On CPU a strided conv runs as slices + matmul: values, the input gradient and the
    gradient of an input-gradient penalty (double backprop) equal lax's convolution."""
    assert jax.default_backend() == "cpu"
    strides = (stride, stride) if isinstance(stride, int) else stride
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 9, 8, 3), jnp.float64)
    w = jax.random.normal(kw, (kernel, kernel, 3, 4), jnp.float64)
    jaxpr = assert_conv_matches_lax_to_second_order(models.conv.auto_conv_general_dilated, x, w, strides, padding)
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


def test_conv_keeps_lax_for_stride_one_dilation_groups_and_negative_padding():
    x = jnp.ones((1, 6, 6, 4))
    dims = jax.lax.conv_dimension_numbers(x.shape, (3, 3, 4, 4), _NHWC)
    same = ((1, 1), (1, 1))
    cases = [  # (kernel, strides, padding, other arguments)
        (jnp.ones((3, 3, 4, 4)), (1, 1), same, {}),
        (jnp.ones((3, 3, 4, 4)), (2, 2), same, {"rhs_dilation": (2, 2)}),
        (jnp.ones((3, 3, 2, 4)), (2, 2), same, {"feature_group_count": 2}),
        (jnp.ones((3, 3, 4, 4)), (2, 2), ((1, -1), (0, 0)), {}),
    ]
    for w, strides, pad, extra in cases:
        f = lambda x, w, strides=strides, pad=pad, extra=extra: models.conv.auto_conv_general_dilated(
            x, w, strides, pad, dimension_numbers=dims, **extra)
        assert "conv_general_dilated" in str(jax.make_jaxpr(f)(x, w))
        np.testing.assert_allclose(
            f(x, w), jax.lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=dims, **extra)
        )


def test_strided_conv_as_matmul_keeps_bfloat16_compute():
    """bfloat16 inputs stay bfloat16 through the matmul form, and agree with lax to bf16 rounding."""
    model = models.SimpleCNN(num_classes=2, in_channels=3, channels=(4,), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = _images((2, 8, 8, 3))
    conv = model.convs[0]
    y = conv(x)
    assert y.dtype == jnp.bfloat16
    ref = jax.lax.conv_general_dilated(
        x.astype(jnp.bfloat16), conv.kernel[...].astype(jnp.bfloat16), (2, 2), ((1, 1), (1, 1)),
        dimension_numbers=_NHWC,
    ) + conv.bias[...].astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------
# BatchNorm train / eval
# --------------------------------------------------------------------------------------------


@nnx.jit
def _forward(model, x):
    return model(x)


def _batch_stats(model):
    return jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))


def test_batchnorm_train_updates_and_eval_freezes_statistics():
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(4, 3), rngs=nnx.Rngs(0))
    x = _images((2, 8, 8, 1))
    before = _batch_stats(model)

    # Built in training mode: a forward pass moves the running statistics ...
    assert all(bn.use_running_average is False for bn in model.norms)
    _forward(model, x)
    after_train = _batch_stats(model)
    assert not np.allclose(before["norms"][0]["mean"][...], after_train["norms"][0]["mean"][...])
    # ... by momentum 0.9 with the BIASED batch variance (PyTorch's running_var uses the unbiased one).
    pre = np.asarray(model.convs[0](x), np.float64)  # (2, 4, 4, 4): N = 32 per channel
    np.testing.assert_allclose(after_train["norms"][0]["mean"][...], 0.1 * pre.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        after_train["norms"][0]["var"][...], 0.9 + 0.1 * pre.var((0, 1, 2), ddof=0), rtol=1e-4, atol=1e-6
    )

    # Eval mode (in place): statistics frozen, each output independent of the other batch members.
    model.eval()
    assert all(bn.use_running_average is True for bn in model.norms)
    both = np.asarray(_forward(model, x))
    jax.tree.map(np.testing.assert_array_equal, _batch_stats(model), after_train)
    other = x.at[1].set(-3.0 * x[1])
    np.testing.assert_allclose(np.asarray(_forward(model, other))[0], both[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_forward(model, x[:1]))[0], both[0], rtol=1e-5, atol=1e-6)

    # Back to training mode: the output of row 0 now depends on row 1.
    model.train()
    changed = np.asarray(_forward(model, other))[0]
    assert not np.allclose(changed, np.asarray(_forward(model, x))[0])


def test_nnx_view_switches_mode_without_mutating_and_shares_statistics():
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(4, 3), rngs=nnx.Rngs(0))
    x = _images((2, 8, 8, 1))
    eval_view = nnx.view(model, use_running_average=True)
    assert model.norms[0].use_running_average is False and eval_view.norms[0].use_running_average is True
    before = _batch_stats(model)
    _forward(eval_view, x)
    jax.tree.map(np.testing.assert_array_equal, _batch_stats(model), before)
    _forward(model, x)  # training the model moves the statistics the view reads
    np.testing.assert_array_equal(eval_view.norms[0].mean[...], model.norms[0].mean[...])
    assert not np.array_equal(before["norms"][0]["mean"][...], model.norms[0].mean[...])


# --------------------------------------------------------------------------------------------
# bfloat16 compute
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["simple_gap", "r18_cifar"])
def test_bfloat16_compute_keeps_float32_params_and_logits(probed, config):
    reference, out = probed(config)
    model = _build(config, dtype=jnp.bfloat16)
    for leaf in jax.tree.leaves(nnx.state(model)):  # params and BatchNorm statistics
        assert leaf.dtype == jnp.float32
    # same seed, float32 parameters: identical parameters to the float32 model
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param))
    got = jax.tree.map(np.asarray, _probe(model, _images(CONFIGS[config][2])))
    assert got["features"].dtype == jnp.bfloat16
    assert got["logits"].dtype == np.float32
    scale = np.abs(out["logits"]).max()
    np.testing.assert_allclose(got["logits"], out["logits"], rtol=0.05, atol=0.05 * scale)


# --------------------------------------------------------------------------------------------
# create() and argument validation
# --------------------------------------------------------------------------------------------


def test_create_builds_every_model():
    assert set(models.MODEL_NAMES) == {"simple_cnn", "resnet18", "resnet50", "mlp", "xil_cnn"}
    expected = {"simple_cnn": models.SimpleCNN, "resnet18": models.ResNet18, "resnet50": models.ResNet50,
                "mlp": models.MLP, "xil_cnn": models.XILCNN}
    for name, cls in expected.items():
        kwargs = {"width": 2} if name.startswith("resnet") else {}
        # Abstract (shapes only): initialising every model's parameters op by op compiles each op.
        model = nnx.eval_shape(lambda name=name, kwargs=kwargs: models.create(name, num_classes=5, in_channels=2,
                                                                              rngs=nnx.Rngs(0), **kwargs))
        assert type(model) is cls
        assert (model.num_classes, model.in_channels) == (5, 2)
        assert model.classifier.bias.shape == (5,)
    assert nnx.eval_shape(lambda: models.ResNet18(num_classes=2, rngs=nnx.Rngs(0), width=2)).stem == "cifar"
    assert nnx.eval_shape(lambda: models.ResNet50(num_classes=2, rngs=nnx.Rngs(0), width=2)).stem == "imagenet"


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("vgg16", {}, r"name.*'mlp', 'resnet18', 'resnet50', 'simple_cnn', 'xil_cnn'.*vgg16"),
        ("resnet18", {"num_classes": 0}, "num_classes"),
        ("resnet18", {"num_classes": True}, "num_classes"),
        ("resnet50", {"in_channels": 0}, "in_channels"),
        ("resnet18", {"stem": "tiny"}, r"stem.*'cifar', 'imagenet'"),
        ("resnet18", {"width": 0}, "width"),
        ("resnet18", {"stage_sizes": (2, 2, 2)}, "stage_sizes.*four"),
        ("resnet50", {"stage_sizes": (1, 0, 1, 1)}, "stage_sizes"),
        ("resnet18", {"dtype": jnp.int32}, "dtype"),
        ("resnet18", {"activation": "relu"}, "activation"),
        ("resnet18", {"head_type": "mlp"}, "head_type"),  # ResNets take no head_type
        ("simple_cnn", {"head_type": "attention"}, r"head_type.*'gap', 'mlp'"),
        ("simple_cnn", {"head_type": "mlp"}, "input_size"),
        ("simple_cnn", {"channels": ()}, "channels"),
        ("simple_cnn", {"channels": (8, 0)}, "channels"),
    ],
)
def test_create_rejects_bad_arguments(name, kwargs, match):
    kwargs = {"num_classes": 2, "in_channels": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        models.create(name, rngs=nnx.Rngs(0), **kwargs)


def test_bad_inputs_raise_at_trace_time(probed):
    model, _ = probed("simple_gap")  # in_channels=1
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, W, in_channels=1\).*\(2, 8, 8, 3\)"):
        model.features(jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"x must have shape .*\(8, 8, 1\)"):
        _forward(model, jnp.zeros((8, 8, 1)))  # under nnx.jit: raised while tracing
    with pytest.raises(ValueError, match="x must be a floating-point"):
        model.features(jnp.zeros((2, 8, 8, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"A must have shape \(B, h, w, C'=8\)"):
        model.head(jnp.zeros((2, 1, 1, 4)))
    mlp, _ = probed("simple_mlp")  # fixed input_size=16 -> 2x2 feature map
    with pytest.raises(ValueError, match=r"A must have shape \(B, 2, 2, 4\).*input_size"):
        mlp.head(jnp.zeros((2, 1, 1, 4)))


# --------------------------------------------------------------------------------------------
# jit and functional (split / merge) use
# --------------------------------------------------------------------------------------------


def test_split_merge_under_jax_jit_matches_nnx_jit():
    model = models.SimpleCNN(
        num_classes=2, in_channels=1, channels=(4, 3), activation=jax.nn.softplus, rngs=nnx.Rngs(0)
    )
    x = _images((2, 8, 8, 1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_stats(params, rest, x):
        def loss(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            logits = m(x)
            return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), nnx.split(m, nnx.Param, ...)[2]

        return jax.value_and_grad(loss, has_aux=True)(params)

    (value, new_rest), grads = loss_and_stats(params, rest, x)
    jax.tree.map(lambda g, p: (g.shape == p.shape) or pytest.fail("grad shape"), grads, params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # the functional call did not touch the module; nnx.jit in place gives the same numbers
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), nnx.state(rest, nnx.BatchStat))
    logits = _forward(model, x)
    np.testing.assert_allclose(value, jnp.sum(jax.nn.log_softmax(logits)[:, 0]), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        nnx.state(new_rest, nnx.BatchStat),
        nnx.state(model, nnx.BatchStat),
    )


def test_input_gradient_matches_finite_differences_with_smooth_activation():
    model = models.SimpleCNN(
        num_classes=2, in_channels=1, channels=(4, 3), activation=jax.nn.softplus, rngs=nnx.Rngs(0)
    )
    model.eval()
    x = _images((1, 8, 8, 1))
    direction = _images((1, 8, 8, 1), seed=2)

    @nnx.jit
    def logit_and_grad(model, x):
        return jax.value_and_grad(lambda x: model(x)[0, 1])(x)

    _, grad = logit_and_grad(model, x)
    eps = 1e-2
    plus, _ = logit_and_grad(model, x + eps * direction)
    minus, _ = logit_and_grad(model, x - eps * direction)
    fd = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(fd, jnp.vdot(grad, direction), rtol=1e-2, atol=1e-4)


def test_float64_models_keep_float64_logits():
    with jax.enable_x64(True):
        model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(4,), dtype=jnp.float64,
                                 param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no float64 -> float32 update of the running statistics
            assert model(jnp.ones((2, 8, 8, 1), jnp.float64)).dtype == jnp.float64
        stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
        assert stats and all(s.dtype == jnp.float64 for s in stats)
        assert not np.allclose(model.norms[0].mean[...], 0)  # the train-mode pass updated them
    # Narrower parameters keep flax's float32 statistics.
    half = models.SimpleCNN(num_classes=2, in_channels=1, channels=(4,), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(nnx.state(half, nnx.BatchStat)))
