"""CDEP (Rieger et al. 2020): hand-computed share on a linear model, float64 finite differences on
SimpleCNN and XIL's CNN, BatchNorm statistics moving once per step, composition, refusals."""

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from conftest import conv_classifier, make_batch
from flax import nnx

from saljax import classifier, losses, models
from saljax.models import decomposition


class _Linear(nnx.Module):
    """logits = flatten(x) @ W + b, with its contextual decomposition."""

    def __init__(self, h, w, c, k, rngs, dtype=jnp.float32):
        self.dense = nnx.Linear(h * w * c, k, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.dense.bias[...] = jax.random.normal(jax.random.key(3), (k,), dtype)

    def features(self, x):
        return x

    def head(self, a):
        return self.dense(a.reshape(a.shape[0], -1))

    def decompose_features(self, parts):
        return parts

    def decompose_head(self, parts):
        return decomposition.layer(self.dense, decomposition.reshape(parts, (parts[0].shape[0], -1)))


def _nnx_classifier(model):
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    return classifier.from_nnx(graphdef, params, state)


def _value(term, clf, batch):
    return losses.combine(term)(clf, batch)[1].terms[term.name]


def test_linear_model_hand_computed(x64):
    b, h, w, c, k = 4, 3, 3, 2, 3
    model = _Linear(h, w, c, k, nnx.Rngs(0), jnp.float64)
    batch = make_batch(jax.random.key(1), b=b, h=h, w=w, c=c, num_classes=k, dtype=jnp.float64, has_map=(1, 0, 1, 1))
    x = np.asarray(batch["image"], np.float64)
    region = 1.0 - np.asarray(batch["saliency_map"], np.float64)[..., None]  # A = 1 - H, over channels
    kernel, bias = np.asarray(model.dense.kernel[...]), np.asarray(model.dense.bias[...])
    wb = (region * x).reshape(b, -1) @ kernel
    wg = ((1 - region) * x).reshape(b, -1) @ kernel
    share_b = (np.abs(wb) + 1e-20) / (np.abs(wb) + np.abs(wg) + 2e-20)
    beta, gamma = wb + share_b * bias, wg + (1 - share_b) * bias
    np.testing.assert_allclose(beta + gamma, x.reshape(b, -1) @ kernel + bias, rtol=1e-12)
    per = np.mean(np.exp(beta) / (np.exp(beta) + np.exp(gamma)), axis=1)
    expected = per[[0, 2, 3]].mean()  # sample 1 has no map
    np.testing.assert_allclose(_value(losses.cdep(), _nnx_classifier(model), batch), expected, rtol=1e-12)


def test_share_is_stable_for_large_logit_parts(x64):
    model = _Linear(2, 2, 1, 2, nnx.Rngs(0), jnp.float64)
    batch = make_batch(jax.random.key(1), b=2, h=2, w=2, c=1, dtype=jnp.float64, has_map=(1, 1))
    batch["image"] = batch["image"] * 1e4  # exp(beta) alone would overflow
    value = _value(losses.cdep(), _nnx_classifier(model), batch)
    assert np.isfinite(value) and 0.0 <= float(value) <= 1.0


def _tiny(name, dtype):
    rngs = nnx.Rngs(0)
    if name == "simple_cnn":
        return models.SimpleCNN(num_classes=3, in_channels=2, channels=(3, 4), dtype=dtype, param_dtype=dtype,
                                rngs=rngs), (3, 8, 8, 2)
    return models.XILCNN(num_classes=3, in_channels=1, input_size=12, channels=(2, 3), kernel_size=3, mlp_hidden=5,
                         dtype=dtype, param_dtype=dtype, rngs=rngs), (3, 12, 12, 1)


# nnx.BatchNorm keeps float32 running statistics in a float64 model; the update warns, harmlessly here.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
@pytest.mark.parametrize("name", ["simple_cnn", pytest.param("xil_cnn", marks=pytest.mark.slow)])  # 4 s each
def test_gradients_match_finite_differences(name, x64):
    model, (b, h, w, c) = _tiny(name, jnp.float64)
    model.train()
    batch = make_batch(jax.random.key(2), b=b, h=h, w=w, c=c, num_classes=3, dtype=jnp.float64, has_map=(1, 1, 0))
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    loss = losses.combine(losses.cdep(1.0))
    f = jax.jit(lambda p: loss(classifier.from_nnx(graphdef, p, state), batch)[0])
    value = f(params)
    assert np.isfinite(value) and 0.0 < float(value) < 1.0
    grads = jax.grad(f)(params)
    assert jax.tree.all(jax.tree.map(lambda g: bool(jnp.all(jnp.isfinite(g))), grads))
    jax.test_util.check_grads(f, (params,), order=1, modes=["rev"], eps=1e-6)


@pytest.mark.slow  # ~3 s on 2 cores
def test_batchnorm_statistics_change_exactly_once_per_step():
    model, (b, h, w, c) = _tiny("simple_cnn", jnp.float32)
    model.train()
    batch = make_batch(jax.random.key(1), b=4, h=h, w=w, c=c, num_classes=3)
    graphdef, params, state = nnx.split(model, nnx.Param, ...)

    def step(loss):
        f = lambda p: loss(classifier.from_nnx(graphdef, p, state), batch)
        return jax.jit(jax.grad(f, has_aux=True))(params)

    grads, aux = step(losses.combine(losses.cross_entropy(), losses.cdep(1.0)))
    _, ce_only = step(losses.combine(losses.cross_entropy()))
    assert jax.tree.all(jax.tree.map(lambda g: bool(jnp.all(jnp.isfinite(g))), grads))
    # (CE + CDEP runs one pass, the decomposition: its statistics are those of beta + gamma, the
    # forward pass's to rounding, hence atol for the means near 0)
    chex.assert_trees_all_close(aux.state, ce_only.state, rtol=1e-6, atol=1e-8)
    once = nnx.clone(model)
    once(batch["image"])  # one forward pass in train mode
    chex.assert_trees_all_close(aux.state, nnx.split(once, nnx.Param, ...)[2], rtol=1e-6, atol=1e-8)
    assert not np.allclose(aux.state["norms"][0]["mean"][...], state["norms"][0]["mean"][...])
    # The loss itself did not mutate the module.
    chex.assert_trees_all_equal(nnx.split(model, nnx.Param, ...)[2], state)


def test_composes_with_gradmask_and_rrr():
    model, (b, h, w, c) = _tiny("simple_cnn", jnp.float32)
    batch = make_batch(jax.random.key(1), b=4, h=h, w=w, c=c, num_classes=3)
    loss = losses.combine(losses.for_method("cdep", lam=0.5), losses.gradmask(1.0), losses.rrr(0.1))
    assert [(t.name, t.weight) for t in loss.terms] == [("ce", 1.0), ("cdep", 0.5), ("gradmask", 1.0), ("rrr", 0.1)]
    clf = _nnx_classifier(model)
    value, aux = jax.jit(lambda: loss(clf, batch))()
    t = aux.terms
    np.testing.assert_allclose(value, t["ce"] + 0.5 * t["cdep"] + t["gradmask"] + 0.1 * t["rrr"], rtol=1e-6)
    np.testing.assert_allclose(t["cdep"], _value(losses.cdep(), clf, batch), rtol=1e-6)


def test_refuses_a_classifier_without_decomposition():
    batch = make_batch(jax.random.key(1), b=2, h=4, w=4, c=1)
    params = {"conv": jnp.ones((3, 3, 1, 3)), "kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}
    with pytest.raises(ValueError, match="'cdep' needs the contextual decomposition"):
        losses.for_method("cdep")(conv_classifier(params), batch)


class _WithLayerNorm(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.dense = nnx.Linear(4, 2, rngs=rngs)

    def features(self, x):
        return x

    def head(self, a):
        return self.dense(self.norm(a.reshape(a.shape[0], -1)))

    def decompose_features(self, parts):
        return parts

    def decompose_head(self, parts):
        parts = decomposition.layer(self.norm, decomposition.reshape(parts, (parts[0].shape[0], -1)))
        return decomposition.layer(self.dense, parts)


class _Undeclared(_WithLayerNorm):
    decompose_features = None  # type: ignore[assignment]


@pytest.mark.parametrize("model, message", [(_WithLayerNorm, "no contextual decomposition for layer LayerNorm"),
                                            (_Undeclared, "declares no contextual decomposition")])
def test_refuses_a_model_the_decomposition_does_not_know(model, message):
    batch = make_batch(jax.random.key(1), b=2, h=2, w=2, c=1)
    with pytest.raises(ValueError, match=message):
        losses.for_method("cdep")(_nnx_classifier(model(nnx.Rngs(0))), batch)


def test_refuses_a_batch_without_maps():
    model, (b, h, w, c) = _tiny("simple_cnn", jnp.float32)
    batch = make_batch(jax.random.key(1), b=2, h=h, w=w, c=c)
    del batch["saliency_map"]
    with pytest.raises(ValueError, match="saliency_map"):
        losses.combine(losses.cdep())(_nnx_classifier(model), batch)


def test_bias_split_gradient_is_finite_where_both_parts_vanish():
    """float32 under jit: where beta = gamma = 0 (a window that ReLU zeroed), the bias share's derivative
    is taken with |x|' = 0 at 0 (as PyTorch) and without squaring the 2e-20 denominator, which
    underflows; several such layers in a row used to give inf and NaN gradients (ResNet-18)."""
    beta = jnp.asarray([0.0, 0.0, 0.5, -1e-3], jnp.float32)
    gamma = jnp.asarray([0.0, 1.0, 0.0, 2e-3], jnp.float32)

    def f(beta, gamma):
        parts = (beta, gamma)
        for bias in (0.3, -0.2, 0.7):  # three layers: weights 2, then the bias split
            parts = decomposition._split_bias(2.0 * parts[0], 2.0 * parts[1], jnp.float32(bias))
        return jnp.sum(parts[0] - 3.0 * parts[1])

    gb, gg = jax.jit(jax.grad(f, (0, 1)))(beta, gamma)
    assert np.all(np.isfinite(gb)) and np.all(np.isfinite(gg))
    with jax.enable_x64(True):  # float64 has no underflow here
        want = jax.jit(jax.grad(f, (0, 1)))(jnp.asarray(beta, jnp.float64), jnp.asarray(gamma, jnp.float64))
    np.testing.assert_allclose(gb, want[0], rtol=1e-5)
    np.testing.assert_allclose(gg, want[1], rtol=1e-5)
