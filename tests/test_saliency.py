"""Saliency maps: exact values on models with known gradients, identities, and model interfaces."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import conv_features, gap_dense_head, make_conv_params
from flax import nnx

from saljax import saliency

B, H, W, C, K = 3, 4, 4, 2, 3


def _linear(key):
    m = jax.random.normal(key, (H * W * C, K))
    offset = jnp.array([0.5, -1.0, 2.0])
    return m, offset, lambda x: x.reshape(x.shape[0], -1) @ m + offset


def _inputs(key=1):
    return jax.random.normal(jax.random.key(key), (B, H, W, C))


def test_vanilla_gradient_of_a_linear_model_is_its_weight_column():
    m, _, model = _linear(jax.random.key(0))
    x, target = _inputs(), jnp.array([2, 0, 1])
    g = saliency.vanilla_gradient(model, x, target)
    np.testing.assert_allclose(g, m[:, target].T.reshape(B, H, W, C), rtol=1e-6)
    np.testing.assert_allclose(saliency.gradient_x_input(model, x, target), x * g, rtol=1e-6)


def test_scalar_target_broadcasts_and_callable_target_is_a_score():
    m, _, model = _linear(jax.random.key(0))
    x = _inputs()
    np.testing.assert_allclose(
        saliency.vanilla_gradient(model, x, 1), saliency.vanilla_gradient(model, x, jnp.array([1, 1, 1])))
    # d/dx log p_t = M (e_t - p): check against the closed form.
    target = jnp.array([0, 2, 1])
    g = saliency.vanilla_gradient(model, x, saliency.log_softmax_score(target))
    p = jax.nn.softmax(model(x))
    expected = (jax.nn.one_hot(target, K) - p) @ m.T
    np.testing.assert_allclose(g.reshape(B, -1), expected, rtol=1e-5, atol=1e-6)


def test_contrast_score_is_the_two_class_logit_gap_and_generalises():
    z2 = jnp.array([[1.0, 3.0], [2.0, -1.0]])
    np.testing.assert_allclose(saliency.contrast_score(jnp.array([0, 1]))(z2), [2.0, 3.0])
    z3 = jnp.array([[1.0, 2.0, 0.5]])
    expected = abs(2.0 - np.log(np.exp(1.0) + np.exp(0.5)))
    np.testing.assert_allclose(saliency.contrast_score(jnp.array([1]))(z3), [expected], rtol=1e-6)
    np.testing.assert_allclose(saliency.sum_log_softmax_score(z3), jax.nn.log_softmax(z3).sum(-1))
    np.testing.assert_allclose(saliency.nonhealthy_score(z2), [3.0, 1.0])


def test_smoothgrad_of_a_linear_model_is_its_gradient():
    _, _, model = _linear(jax.random.key(0))
    x, target, key = _inputs(), jnp.array([2, 0, 1]), jax.random.key(3)
    g = saliency.vanilla_gradient(model, x, target)
    np.testing.assert_allclose(saliency.smoothgrad(model, x, target, key=key, nt_samples=4), g, rtol=1e-5)
    np.testing.assert_allclose(
        saliency.smoothgrad(model, x, target, key=key, nt_samples=4, nt_type="smoothgrad_sq"), g * g, rtol=1e-5)
    np.testing.assert_allclose(
        saliency.smoothgrad(model, x, target, key=key, nt_samples=4, nt_type="vargrad"), 0.0, atol=1e-5)


@pytest.mark.slow  # ~6 s on 2 cores
def test_smoothgrad_matches_an_explicit_loop_over_noise_draws():
    params = make_conv_params(jax.random.key(0), in_channels=C, num_classes=K)
    model = lambda x: gap_dense_head(params, conv_features(params, x))
    x, target, key = _inputs(), jnp.array([2, 0, 1]), jax.random.key(5)
    sigma = 0.2 * (x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True))
    grads = np.stack([
        saliency.vanilla_gradient(model, x + sigma * jax.random.normal(k, x.shape), target)
        for k in jax.random.split(key, 5)
    ])
    for nt_type, expected in [("smoothgrad", grads.mean(0)), ("smoothgrad_sq", (grads**2).mean(0)),
                              ("vargrad", grads.var(0))]:
        got = saliency.smoothgrad(model, x, target, key=key, nt_samples=5, stdevs=0.2, nt_type=nt_type)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    absolute = saliency.smoothgrad(model, x, target, key=key, nt_samples=5, stdevs=0.2, relative=False)
    loop = np.mean([saliency.vanilla_gradient(model, x + 0.2 * jax.random.normal(k, x.shape), target)
                    for k in jax.random.split(key, 5)], axis=0)
    np.testing.assert_allclose(absolute, loop, rtol=1e-4, atol=1e-6)
    # k samples per vmapped pass instead of a scan: the same numbers.
    for k in (2, 5):
        chunked = saliency.smoothgrad(model, x, target, key=key, nt_samples=5, stdevs=0.2, nt_type="vargrad",
                                      internal_batch_size=k)
        np.testing.assert_allclose(chunked, grads.var(0), rtol=1e-4, atol=1e-6)
    other = saliency.smoothgrad(model, x, target, key=jax.random.key(6), nt_samples=5)
    assert not np.allclose(other, grads.mean(0))


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_of_a_linear_model_is_exact(method):
    m, _, model = _linear(jax.random.key(0))
    x, target = _inputs(), jnp.array([2, 0, 1])
    baselines = 0.5 * jnp.ones_like(x)
    attr = saliency.integrated_gradients(model, x, target, baselines=baselines, n_steps=3, method=method)
    np.testing.assert_allclose(attr, (x - baselines) * m[:, target].T.reshape(B, H, W, C), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~4 s on 2 cores
def test_integrated_gradients_completeness(x64):
    params = make_conv_params(jax.random.key(0), in_channels=C, num_classes=K, dtype=jnp.float64)
    model = lambda x: gap_dense_head(params, conv_features(params, x))
    x, target = _inputs().astype(jnp.float64), jnp.array([2, 0, 1])
    attr, delta = saliency.integrated_gradients(model, x, target, n_steps=32, return_convergence_delta=True)
    s = lambda v: saliency.logit_score(target)(model(v))
    np.testing.assert_allclose(attr.sum(axis=(1, 2, 3)), s(x) - s(jnp.zeros_like(x)), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(delta, 0.0, atol=1e-10)
    chunked = saliency.integrated_gradients(model, x, target, n_steps=32, internal_batch_size=5)
    np.testing.assert_allclose(chunked, attr, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="internal_batch_size must be >= 1"):
        saliency.integrated_gradients(model, x, target, internal_batch_size=0)
    # Riemann sums converge more slowly but still to the same total.
    _, delta_riemann = saliency.integrated_gradients(
        model, x, target, n_steps=64, method="riemann_trapezoid", return_convergence_delta=True)
    assert 1e-10 < np.max(np.abs(delta_riemann)) < 1e-2


def test_gauss_legendre_is_exact_for_a_quadratic_model_with_two_nodes(x64):
    q = jax.random.normal(jax.random.key(2), (H * W * C,))
    model = lambda x: jnp.stack([jnp.sum((x.reshape(x.shape[0], -1) * q) ** 2, -1)] * 2, -1)
    x = _inputs().astype(jnp.float64)
    _, delta = saliency.integrated_gradients(model, x, 0, n_steps=2, return_convergence_delta=True)
    np.testing.assert_allclose(delta, 0.0, atol=1e-10)
    _, delta_left = saliency.integrated_gradients(model, x, 0, n_steps=2, method="riemann_left",
                                                  return_convergence_delta=True)
    assert np.max(np.abs(delta_left)) > 1e-3


def test_cam_identity_and_explicit_formula():
    params = make_conv_params(jax.random.key(0), in_channels=C, num_classes=K)
    features = lambda x: conv_features(params, x)
    head = lambda a: gap_dense_head(params, a)
    x = _inputs()
    a = features(x)
    cams = saliency.class_activation_maps(head, a)
    np.testing.assert_allclose(cams, jnp.einsum("bhwk,kc->bhwc", a, params["kernel"]), rtol=1e-5, atol=1e-6)
    # z_c = b_c + mean_ij CAM_c: the CAM decomposes the logit over space.
    np.testing.assert_allclose(cams.mean(axis=(1, 2)) + params["bias"], head(a), rtol=1e-5, atol=1e-6)
    target = jnp.array([2, 0, 1])
    np.testing.assert_allclose(saliency.cam(features, head, x, target), cams[jnp.arange(B), ..., target], rtol=1e-6)


def test_grad_cam_of_a_gap_dense_head_is_the_relu_of_the_scaled_cam():
    params = make_conv_params(jax.random.key(0), in_channels=C, num_classes=K)
    features = lambda x: conv_features(params, x)
    head = lambda a: gap_dense_head(params, a)
    x, target = _inputs(), jnp.array([2, 0, 1])
    # alpha_k = mean_ij dz_c/dA_k = W[k, c] / (h w), so Grad-CAM = relu(CAM_c) / (h w).
    expected = jax.nn.relu(saliency.cam(features, head, x, target)) / (H * W)
    np.testing.assert_allclose(saliency.grad_cam(features, head, x, target), expected, rtol=1e-5, atol=1e-7)


def test_minmax_normalize():
    v = jnp.array([[[1.0, 3.0], [5.0, 2.0]]])
    np.testing.assert_allclose(saliency.minmax_normalize(v, eps=0.0), [[[0.0, 0.5], [1.0, 0.25]]])
    np.testing.assert_allclose(saliency.minmax_normalize(jnp.ones((1, 2, 2))), 0.0)
    assert np.isnan(saliency.minmax_normalize(jnp.ones((1, 2, 2)), eps=0.0)).all()


class _LinenNet(nn.Module):
    def setup(self):
        self.conv = nn.Conv(3, (3, 3), padding="SAME")
        self.classifier = nn.Dense(K)

    def features(self, x):
        return jnp.tanh(self.conv(x))

    def head(self, a):
        return self.classifier(a.mean((1, 2)))

    def __call__(self, x):
        return self.head(self.features(x))


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(C, 3, (3, 3), padding="SAME", rngs=rngs)
        self.classifier = nnx.Linear(3, K, rngs=rngs)

    def features(self, x):
        return jnp.tanh(self.conv(x))

    def head(self, a):
        return self.classifier(a.mean((1, 2)))

    def __call__(self, x):
        return self.head(self.features(x))


def test_nnx_module_linen_apply_and_plain_function_give_the_same_maps():
    params = make_conv_params(jax.random.key(0), in_channels=C, num_classes=K)
    plain = lambda x: gap_dense_head(params, conv_features(params, x))
    linen_vars = {"params": {"conv": {"kernel": params["w"], "bias": params["c"]},
                             "classifier": {"kernel": params["kernel"], "bias": params["bias"]}}}
    linen = lambda x: _LinenNet().apply(linen_vars, x)
    module = _NnxNet(nnx.Rngs(0))
    module.conv.kernel[...] = params["w"]
    module.conv.bias[...] = params["c"]
    module.classifier.kernel[...] = params["kernel"]
    module.classifier.bias[...] = params["bias"]
    x, target = _inputs(), jnp.array([2, 0, 1])
    reference = saliency.vanilla_gradient(plain, x, target)
    for model in (linen, module):
        np.testing.assert_allclose(saliency.vanilla_gradient(model, x, target), reference, rtol=1e-5, atol=1e-7)
    ref_cam = saliency.grad_cam(lambda x: conv_features(params, x), lambda a: gap_dense_head(params, a), x, target)
    np.testing.assert_allclose(saliency.grad_cam(module.features, module.head, x, target), ref_cam, rtol=1e-5, atol=1e-7)
    linen_cam = saliency.cam(lambda x: _LinenNet().apply(linen_vars, x, method="features"),
                             lambda a: _LinenNet().apply(linen_vars, a, method="head"), x, target)
    np.testing.assert_allclose(linen_cam, saliency.cam(module.features, module.head, x, target), rtol=1e-5, atol=1e-6)


class VariantsTest(chex.TestCase):
    """Every map gives the same values with and without jit, and vmaps over a stack of batches."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_maps_under_jit_and_vmap(self):
        params = make_conv_params(jax.random.key(0), in_channels=C, num_classes=K)
        features = lambda x: conv_features(params, x)
        head = lambda a: gap_dense_head(params, a)
        model = lambda x: head(features(x))
        x, target, key = _inputs(), jnp.array([2, 0, 1]), jax.random.key(0)
        maps = {
            "vanilla": lambda x: saliency.vanilla_gradient(model, x, target),
            "x_input": lambda x: saliency.gradient_x_input(model, x, target),
            "smoothgrad": lambda x: saliency.smoothgrad(model, x, target, key=key, nt_samples=3),
            "ig": lambda x: saliency.integrated_gradients(model, x, target, n_steps=4),
            "cam": lambda x: saliency.cam(features, head, x, target),
            "grad_cam": lambda x: saliency.grad_cam(features, head, x, target),
        }
        for name, fn in maps.items():
            eager = fn(x)
            np.testing.assert_allclose(self.variant(fn)(x), eager, rtol=1e-5, atol=1e-6, err_msg=name)
            stacked = jax.vmap(fn)(jnp.stack([x, 2 * x]))
            np.testing.assert_allclose(stacked[0], eager, rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(stacked[1], fn(2 * x), rtol=1e-5, atol=1e-6, err_msg=name)


def test_maps_are_differentiable_in_the_parameters(x64):
    x, target = _inputs().astype(jnp.float64), jnp.array([2, 0, 1])

    def energy(params):
        model = lambda v: gap_dense_head(params, conv_features(params, v))
        g = saliency.vanilla_gradient(model, x, target)
        cams = saliency.grad_cam(lambda v: conv_features(params, v), lambda a: gap_dense_head(params, a), x, target)
        return jnp.sum(g**2) + jnp.sum(cams)

    params = make_conv_params(jax.random.key(0), in_channels=C, num_classes=K, dtype=jnp.float64)
    jax.test_util.check_grads(energy, (params,), order=1, modes=["rev"])


def test_errors_name_the_argument():
    _, _, model = _linear(jax.random.key(0))
    x = _inputs()
    with pytest.raises(ValueError, match=r"inputs must have shape \(B, H, W, C\)"):
        saliency.vanilla_gradient(model, x[0], 0)
    with pytest.raises(ValueError, match=r"target must have shape \(B,\)"):
        saliency.vanilla_gradient(model, x, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="target must be an int array"):
        saliency.vanilla_gradient(model, x, jnp.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="nt_type must be one of"):
        saliency.smoothgrad(model, x, 0, key=jax.random.key(0), nt_type="sg")
    with pytest.raises(ValueError, match="method must be one of"):
        saliency.integrated_gradients(model, x, 0, method="simpson")
    with pytest.raises(ValueError, match="n_steps must be >= 2"):
        saliency.integrated_gradients(model, x, 0, method="riemann_trapezoid", n_steps=1)
    with pytest.raises(ValueError, match=r"logits of shape \(B, K\)"):
        saliency.vanilla_gradient(lambda v: v.sum(), x, 0)
