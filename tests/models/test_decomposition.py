"""saljax.models.decomposition: CDEP's contextual decomposition adds up to the forward pass, layer by
layer and for every model, splits linear maps exactly, and refuses what it cannot decompose."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import slow_where
from flax import nnx

from saljax import models
from saljax.models import decomposition as cd

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def _x(shape, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _region(shape, seed=1):
    return (jax.random.uniform(jax.random.key(seed), shape) > 0.5).astype(jnp.float64)


def _parts(x, seed=1):
    r = _region(x.shape, seed)
    return r * x, (1 - r) * x


def _assert_adds_up(parts, want, tol):
    beta, gamma = (np.asarray(p, np.float64) for p in parts)
    want = np.asarray(want, np.float64)
    assert beta.shape == want.shape and gamma.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(beta + gamma, want, rtol=tol, atol=tol * scale)
    assert np.abs(beta).max() > 0 and np.abs(gamma).max() > 0  # both parts carry something


# --------------------------------------------------------------------------------------------
# Layer rules
# --------------------------------------------------------------------------------------------


@pytest.mark.cpu_conv_default  # "auto" as on CPU: the rule swaps its matmul form for XLA's convolution
@pytest.mark.parametrize("conv_impl", models.CONV_IMPLS)
@pytest.mark.parametrize("stride, padding, use_bias", [(2, "symmetric", True), (1, "valid", False)])
def test_conv_rule_adds_up_and_splits_the_bias_in_proportion(x64, conv_impl, stride, padding, use_bias):
    conv = models.layers.conv2d(3, 4, 3, stride, padding=padding, use_bias=use_bias, conv_impl=conv_impl,
                                bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0), **F64)
    x = _x((2, 7, 6, 3))
    parts = _parts(x)
    out = cd.layer(conv, parts)
    _assert_adds_up(out, conv(x), 1e-12)
    no_bias = lambda v: conv(v) - (conv.bias[...] if use_bias else 0.0)
    wb, wg = no_bias(parts[0]), no_bias(parts[1])
    if use_bias:
        share = (jnp.abs(wb) + 1e-20) / (jnp.abs(wb) + jnp.abs(wg) + 2e-20)
        np.testing.assert_allclose(out[0], wb + share * conv.bias[...], rtol=1e-10, atol=1e-12)
    else:
        np.testing.assert_allclose(out[0], wb, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out[1], wg, rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # ~4 s on 2 cores
def test_dense_activation_pool_add_reshape_rules(x64):
    dense = models.layers.dense(5, 3, dtype=jnp.float64, param_dtype=jnp.float64,
                                bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
    x = _x((4, 5))
    _assert_adds_up(cd.layer(dense, _parts(x)), dense(x), 1e-12)
    m = _x((2, 7, 7, 3), seed=3)
    parts = _parts(m)
    for fn in (jax.nn.relu, jax.nn.softplus, jnp.tanh, jax.nn.sigmoid, jax.nn.silu):
        beta, gamma = cd.activation(fn, parts)
        np.testing.assert_array_equal(beta, fn(parts[0]))
        _assert_adds_up((beta, gamma), fn(m), 1e-12)
    for window, stride, padding in ((2, 2, 0), (3, 2, 1)):
        beta, gamma = cd.max_pool(parts, window, stride, padding)
        _assert_adds_up((beta, gamma), models.layers.max_pool(m, window, stride, padding), 1e-12)
        # both parts come from the same input pixel: each is one of the window's values of that part
        assert np.isin(np.asarray(beta), np.asarray(parts[0])).all()
    _assert_adds_up(cd.avg_pool(parts, 2, 2), nnx.avg_pool(m, (2, 2), (2, 2)), 1e-12)
    _assert_adds_up(cd.global_avg_pool(parts), m.mean(axis=(1, 2)), 1e-12)
    _assert_adds_up(cd.add(parts, parts), 2 * m, 1e-12)
    _assert_adds_up(cd.reshape(parts, (2, -1)), m.reshape(2, -1), 0)


@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_rule_in_eval_and_train_mode(x64, train):
    bn = models.layers.batch_norm(3, rngs=nnx.Rngs(0), **F64)
    bn.scale[...] = jnp.asarray([0.5, 2.0, -1.0])
    bn.bias[...] = jnp.asarray([0.3, -0.2, 1.0])
    bn.mean[...] = jnp.asarray([0.1, -0.4, 0.2])
    bn.var[...] = jnp.asarray([0.5, 2.0, 1.5])
    bn.use_running_average = not train
    x = _x((2, 4, 4, 3)) * 2 + 1
    before = (np.asarray(bn.mean[...]), np.asarray(bn.var[...]))
    parts = cd.layer(bn, _parts(x))
    # the decomposition never moves the running statistics
    np.testing.assert_array_equal(bn.mean[...], before[0])
    np.testing.assert_array_equal(bn.var[...], before[1])
    _assert_adds_up(parts, bn(x), 1e-12)  # train mode: the batch statistics of beta + gamma


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

MODELS = {
    "simple_gap": ("simple_cnn", dict(channels=(3, 4)), (2, 8, 8, 2)),
    "simple_mlp": ("simple_cnn", dict(channels=(3, 4), head_type="mlp", input_size=8, mlp_hidden=5,
                                      activation=jax.nn.softplus), (2, 8, 8, 2)),
    # ResNets one block per stage (ResNet-50: two in the first, for its identity bottleneck): every rule
    # and block kind the full depth repeats.
    "r18_cifar": ("resnet18", dict(width=2, stage_sizes=(1, 1, 1, 1)), (2, 8, 8, 2)),
    "r18_imagenet": ("resnet18", dict(width=2, stem="imagenet", activation=jax.nn.silu, stage_sizes=(1, 1, 1, 1)),
                     (2, 16, 16, 2)),
    "r50": ("resnet50", dict(width=1, stem="cifar", stage_sizes=(2, 1, 1, 1)), (2, 8, 8, 2)),
    "mlp": ("mlp", dict(input_size=(5, 4), hidden_sizes=(6, 5)), (2, 5, 4, 2)),
    "xil_cnn": ("xil_cnn", dict(input_size=20, channels=(3, 4), mlp_hidden=5), (2, 20, 20, 2)),
}


def _decompose_and_forward(model, x, region):
    """(feature parts, logit parts, features, logits) in one program."""
    graphdef, state = nnx.split(model)

    def run(state, x, region):
        m = nnx.merge(graphdef, state)
        feature_parts = cd.decompose(m, x, region, at="features")
        return feature_parts, m.decompose_head(feature_parts), m.features(x), m(x)

    return jax.jit(run)(state, x, region)


# Every model in float64, eval and train mode. float32: eval mode, and train mode where the BatchNorm
# batches are not tiny (with 2 values per channel, as in the last stage of a 16x16 ImageNet-stem ResNet,
# train-mode BatchNorm amplifies float32 rounding of its input by 1 / std in the forward pass as well).
RUNS = [(c, train, "float64", 1e-10) for c in MODELS for train in (False, True)]
RUNS += [(c, False, "float32", 1e-5) for c in MODELS]
RUNS += [(c, True, "float32", 1e-5) for c in ("simple_gap", "r18_cifar", "xil_cnn")]
# Slow: the ResNets (3-9 s each on 2 cores; in the fast tier the other models check the conv, BatchNorm,
# activation, pooling and dense rules, and only the residual addition waits for the slow tier) and the
# float32 repeats beyond one model (rounding, not another rule).
_SLOW_RUNS = slow_where(RUNS, lambda r: r[0].startswith(("r18", "r50")) or (r[2] == "float32" and r[0] != "simple_gap"))


@pytest.mark.parametrize("config, train, dtype, tol", _SLOW_RUNS,
                         ids=[f"{c}-{'train' if t else 'eval'}-{d}" for c, t, d, _ in RUNS])
def test_every_model_decomposes_into_parts_that_add_up_to_the_forward_pass(config, train, dtype, tol):
    name, kwargs, shape = MODELS[config]
    with jax.enable_x64(dtype == "float64"):
        model = models.create(name, num_classes=3, in_channels=shape[-1], rngs=nnx.Rngs(0), dtype=dtype,
                              param_dtype=dtype, **kwargs)
        # non-trivial BatchNorm statistics and affine parameters
        for path, var in nnx.iter_graph(model):
            if isinstance(var, nnx.BatchNorm):
                c = var.scale.shape[0]
                var.scale[...] = 1 + 0.3 * _x((c,), seed=len(path), dtype=dtype)
                var.bias[...] = 0.2 * _x((c,), seed=len(path) + 1, dtype=dtype)
                var.mean[...] = 0.1 * _x((c,), seed=len(path) + 2, dtype=dtype)
                var.var[...] = 1 + 0.2 * jnp.abs(_x((c,), seed=len(path) + 3, dtype=dtype))
        model.train() if train else model.eval()
        x = _x(shape, dtype=dtype)
        region = (jax.random.uniform(jax.random.key(1), shape[:3]) > 0.5).astype(dtype)
        feature_parts, logit_parts, features, logits = _decompose_and_forward(model, x, region)
        _assert_adds_up(feature_parts, features, tol)
        _assert_adds_up(logit_parts, logits, tol)
        assert logit_parts[0].dtype == logits.dtype


@pytest.mark.slow  # ~4 s on 2 cores
def test_region_everywhere_gives_gamma_zero_and_beta_the_logits(x64):
    model = models.create("xil_cnn", num_classes=3, in_channels=1, input_size=16, channels=(2, 3), mlp_hidden=4,
                          rngs=nnx.Rngs(0), **F64)
    x = _x((2, 16, 16, 1))
    beta, gamma = models.decompose(model, x, jnp.ones((2, 16, 16)))
    np.testing.assert_allclose(beta, model(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gamma, 0, atol=1e-10)


class _LinearNet(models.ImageClassifier):
    """A purely linear model: conv (no bias) -> GAP -> Dense; its decomposition is the exact split."""

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs):
        self.num_classes, self.in_channels, self.feature_channels = num_classes, in_channels, 4
        self.head_type, self.dtype = "gap", jnp.float64
        self.conv = models.layers.conv2d(in_channels, 4, 3, 2, use_bias=False, rngs=rngs, **F64)
        self.classifier = models.layers.dense(4, num_classes, dtype=jnp.float64, param_dtype=jnp.float64,
                                              rngs=rngs)

    def backbone(self, x):
        return self.conv(x)

    def decompose_features(self, parts):
        return cd.layer(self.conv, parts)


def test_linear_model_decomposition_is_the_exact_split(x64):
    model = _LinearNet(num_classes=3, in_channels=2, rngs=nnx.Rngs(0))
    x = _x((2, 8, 8, 2))
    region = _region((2, 8, 8))
    r = region[..., None]
    bias = model.classifier.bias[...]
    beta, gamma = models.decompose(model, x, region)
    lin_b, lin_g = model(r * x) - bias, model((1 - r) * x) - bias  # the linear map on each part
    share = (jnp.abs(lin_b) + 1e-20) / (jnp.abs(lin_b) + jnp.abs(lin_g) + 2e-20)
    np.testing.assert_allclose(beta, lin_b + share * bias, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gamma, lin_g + (1 - share) * bias, rtol=1e-12, atol=1e-12)
    model.classifier.bias[...] = jnp.zeros_like(bias)  # no bias at all: exactly f(A x), f((1 - A) x)
    beta, gamma = models.decompose(model, x, region)
    np.testing.assert_allclose(beta, model(r * x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gamma, model((1 - r) * x), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Running statistics (update_stats): as nnx.BatchNorm's forward pass moves them
# --------------------------------------------------------------------------------------------


class _Norm(nnx.Module):
    """A lone nnx.BatchNorm (flax's defaults otherwise: one-pass variance unless `fast` is False)."""

    def __init__(self, fast: bool, dtype):
        self.bn = nnx.BatchNorm(4, use_running_average=False, momentum=0.8, use_fast_variance=fast, dtype=dtype,
                                param_dtype=dtype, rngs=nnx.Rngs(0))
        self.bn.mean = nnx.BatchStat(0.5 + jnp.arange(4, dtype=dtype))  # flax's are float32 whatever param_dtype
        self.bn.var = nnx.BatchStat(2.0 + jnp.arange(4, dtype=dtype))

    def decompose_features(self, parts):
        return cd.layer(self.bn, parts)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 2e-6)])
def test_update_stats_moves_running_statistics_as_the_forward_pass(fast, dtype, tol):
    with jax.enable_x64(dtype == jnp.float64):
        model = _Norm(fast, dtype)
        x = 30.0 + _x((3, 5, 5, 4), dtype=dtype)  # |mean| >> std: the one-pass variance shows in float32
        region = (jax.random.uniform(jax.random.key(1), (3, 5, 5)) > 0.5).astype(dtype)
        before = nnx.clone(model)
        parts = cd.decompose(model, x, region, at="features")
        _assert_same_statistics(model, before)  # without update_stats the model stays as it was
        forward = nnx.clone(model)
        want = forward.bn(x)
        _assert_adds_up(parts, want, tol)  # normalised with the forward pass's own variance formula
        parts = cd.decompose(model, x, region, at="features", update_stats=True)
        _assert_adds_up(parts, want, tol)
        for name in ("mean", "var"):
            got, expected = getattr(model.bn, name)[...], getattr(forward.bn, name)[...]
            assert got.dtype == expected.dtype
            np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
        assert not np.allclose(model.bn.mean[...], before.bn.mean[...])
        model.bn.use_running_average = True  # eval mode: nothing to update
        moved = nnx.clone(model)
        cd.decompose(model, x, region, at="features", update_stats=True)
        _assert_same_statistics(model, moved)


def _assert_same_statistics(model, other):
    for name in ("mean", "var"):
        np.testing.assert_array_equal(getattr(model.bn, name)[...], getattr(other.bn, name)[...])


@pytest.mark.slow  # ~6 s on 2 cores
def test_update_stats_under_jit_is_a_constant_for_the_gradient(x64):
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(2, 3), rngs=nnx.Rngs(0), **F64)
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    x, region = _x((3, 6, 6, 1)), _region((3, 6, 6))

    def f(p):
        module = nnx.merge(graphdef, p, state, copy=True)
        beta, gamma = cd.decompose(module, x, region, update_stats=True)
        return jnp.sum(beta - gamma), nnx.state(module, nnx.Not(nnx.Param))

    grads, new_state = jax.jit(jax.grad(f, has_aux=True))(params)
    want = nnx.clone(model)
    want(x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), new_state,
                 nnx.split(want, nnx.Param, ...)[2])
    # the same gradient as without the update
    plain = jax.jit(jax.grad(lambda p: jnp.sum(jnp.subtract(*cd.decompose(nnx.merge(graphdef, p, state, copy=True), x, region)))))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), grads, plain(params))


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


class _NoDecomposition(models.ImageClassifier):
    def __init__(self, *, rngs: nnx.Rngs):
        self.num_classes, self.in_channels, self.feature_channels, self.head_type = 2, 1, 1, "gap"
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.classifier = models.layers.dense(1, 2, dtype=jnp.float32, rngs=rngs)

    def backbone(self, x):
        return self.dropout(x)


def test_refuses_models_layers_activations_and_bad_arguments():
    model = _NoDecomposition(rngs=nnx.Rngs(0))
    x = jnp.ones((1, 4, 4, 1))
    with pytest.raises(ValueError, match="model _NoDecomposition declares no contextual decomposition"):
        models.decompose(model, x, jnp.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="no contextual decomposition for layer Dropout"):
        cd.layer(model.dropout, (x, x))
    with pytest.raises(ValueError, match="no contextual decomposition for activation 'mystery'"):
        def mystery(v):
            return v**3
        cd.activation(mystery, (x, x))
    cd.register_activation(mystery)
    try:
        np.testing.assert_allclose(sum(cd.activation(mystery, (x, x))), 8.0)
    finally:
        cd._ACTIVATIONS.pop(mystery)
    simple = models.SimpleCNN(num_classes=2, in_channels=1, channels=(2,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"region must have shape \(B, H, W\) or \(B, H, W, C\)"):
        models.decompose(simple, x, jnp.ones((1, 3, 3)))
    with pytest.raises(ValueError, match="at must be 'logits' or 'features'"):
        models.decompose(simple, x, jnp.ones((1, 4, 4)), at="hidden")
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, W, in_channels=1\)"):
        models.decompose(simple, jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 4)))
