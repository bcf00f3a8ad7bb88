"""One-pass CDEP: with terms that read only the logits, the contextual decomposition is the loss's forward
pass. Its loss, parameter gradient, logits and BatchNorm state equal the two-pass path's; other
combinations fall back to two passes; a Forward without a feature map or input gradients says so."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import forward, make_batch, slow_where
from flax import nnx

from saljax import classifier, losses, models, train


def _model(name, dtype):
    kw = dict(num_classes=3, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    if name == "simple_cnn":
        return models.SimpleCNN(in_channels=2, channels=(3, 4), **kw), (4, 8, 8, 2)
    # One block per stage (an identity block, then three downsampling ones): every rule the full depth
    # repeats, compiled in ~30% less time than (2, 2, 2, 2).
    kw["stage_sizes"] = (1, 1, 1, 1)
    if dtype == jnp.float64:  # imagenet stem: covers the max-pool rule too
        return models.ResNet18(in_channels=2, width=2, stem="imagenet", **kw), (4, 16, 16, 2)
    # float32: BatchNorm over 4 values at 1x1 (the imagenet stem on 16x16) amplifies rounding to 3e-4 in
    # the gradient; 8 samples with the cifar stem keep it near 1e-5
    return models.ResNet18(in_channels=2, width=2, stem="cifar", **kw), (8, 8, 8, 2)


def _no_features(x):
    raise AssertionError("the one-pass loss must not run the ordinary forward pass")


def _no_decompose_with_state(x, region):
    raise AssertionError("this loss must not run the decomposition as its forward pass")


def _step(loss, graphdef, params, state, batch, path):
    """(value, aux), parameter gradient of `loss` on the `path` that the loss must take.

    'one': the ordinary forward pass raises; 'two': no `decompose_with_state` (two passes forced);
    'fallback': `decompose_with_state` raises (the loss must choose two passes itself).
    """

    def f(p):
        clf = classifier.from_nnx(graphdef, p, state)
        if path == "one":
            clf = clf._replace(features=_no_features)
        else:
            clf = clf._replace(decompose_with_state=None if path == "two" else _no_decompose_with_state)
        return loss(clf, batch)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


def _close(a, b, tol):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


# One case in the fast tier (3-7 s each on 2 cores; ResNet-18, with the max-pool and residual rules inside
# the one-pass step, 10-20 s).
_ONE_PASS_CASES = [(name, train, dtype, tol) for name, train in (("simple_cnn", True), ("simple_cnn", False), ("resnet18", True))
                   for dtype, tol in ((jnp.float64, 1e-10), (jnp.float32, 5e-5))]


@pytest.mark.parametrize("name, train, dtype, tol",
                         slow_where(_ONE_PASS_CASES, lambda c: c[:3] != ("simple_cnn", True, jnp.float64)))
def test_one_pass_equals_two_passes(name, train, dtype, tol):
    with jax.enable_x64(dtype == jnp.float64):
        model, (b, h, w, c) = _model(name, dtype)
        model = models.in_mode(model, train=train)
        batch = make_batch(jax.random.key(1), b=b, h=h, w=w, c=c, num_classes=3, dtype=dtype, has_map=(1, 0, 1, 1) * (b // 4))
        graphdef, params, state = nnx.split(model, nnx.Param, ...)
        loss = losses.combine(losses.cross_entropy(), losses.cdep(0.7))
        (v1, aux1), g1 = _step(loss, graphdef, params, state, batch, "one")
        (v2, aux2), g2 = _step(loss, graphdef, params, state, batch, "two")
        assert np.isfinite(v1) and aux1.logits.dtype == aux2.logits.dtype
        _close(v1, v2, tol)
        _close(aux1.terms, aux2.terms, tol)
        _close(aux1.logits, aux2.logits, tol)
        _close(g1, g2, tol)
        assert jax.tree.structure(aux1.state) == jax.tree.structure(aux2.state)
        _close(aux1.state, aux2.state, tol)
        if train:  # the running statistics moved, once: as one ordinary forward pass moves them
            once = nnx.clone(model)
            forward(once, batch["image"])
            _close(aux1.state, nnx.split(once, nnx.Param, ...)[2], tol)
            assert not np.allclose(jax.tree.leaves(aux1.state)[0], jax.tree.leaves(state)[0])
        else:
            chex.assert_trees_all_equal(aux1.state, state)
        chex.assert_trees_all_equal(nnx.split(model, nnx.Param, ...)[2], state)  # the module is untouched


@pytest.mark.slow  # ~4 s on 2 cores
def test_cdep_alone_takes_one_pass_and_equals_two():
    model, (b, h, w, c) = _model("simple_cnn", jnp.float32)
    batch = make_batch(jax.random.key(2), b=b, h=h, w=w, c=c, num_classes=3, has_map=(1, 1, 0, 1))
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    loss = losses.combine(losses.cdep(1.0))
    (v1, aux1), g1 = _step(loss, graphdef, params, state, batch, "one")
    (v2, aux2), g2 = _step(loss, graphdef, params, state, batch, "two")
    _close((v1, aux1.logits, aux1.state, g1), (v2, aux2.logits, aux2.state, g2), 2e-5)


@pytest.mark.slow  # ~7 s on 2 cores
def test_an_input_gradient_term_falls_back_to_two_passes():
    model, (b, h, w, c) = _model("simple_cnn", jnp.float32)
    batch = make_batch(jax.random.key(1), b=b, h=h, w=w, c=c, num_classes=3)
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    loss = losses.combine(losses.cross_entropy(), losses.gradmask(1.0), losses.cdep(0.5))
    # decompose_with_state raises if called: the fallback runs the ordinary pass and CDEP's own decomposition
    (value, aux), grads = _step(loss, graphdef, params, state, batch, "fallback")
    assert np.isfinite(value) and jax.tree.all(jax.tree.map(lambda g: bool(jnp.all(jnp.isfinite(g))), grads))
    clf = classifier.from_nnx(graphdef, params, state)
    alone = losses.combine(losses.cdep(1.0))(clf, batch)[1].terms["cdep"]
    np.testing.assert_allclose(aux.terms["cdep"], alone, rtol=1e-5)


@pytest.mark.slow  # ~6 s on 2 cores
def test_terms_that_do_not_declare_logits_only_fall_back():
    model, (b, h, w, c) = _model("simple_cnn", jnp.float32)
    batch = make_batch(jax.random.key(1), b=b, h=h, w=w, c=c, num_classes=3)
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    peek = losses.Term("peek", lambda fwd, batch: jnp.mean(fwd.feature_map))  # reads the feature map
    loss = losses.combine(losses.cross_entropy(), losses.cdep(1.0), peek)
    (value, aux), _ = _step(loss, graphdef, params, state, batch, "fallback")
    assert np.isfinite(value) and np.isfinite(aux.terms["peek"])
    two_cdep = losses.combine(losses.cross_entropy(), losses.cdep(1.0), losses.cdep(0.5, name="cdep2"))
    (value, aux), _ = _step(two_cdep, graphdef, params, state, batch, "fallback")
    np.testing.assert_allclose(aux.terms["cdep"], aux.terms["cdep2"], rtol=1e-6)


@pytest.mark.parametrize("read, what", [(lambda fwd: fwd.feature_map, "feature map"),
                                        (lambda fwd: fwd.input_gradient(lambda z: z[:, 0]), "input gradients"),
                                        (lambda fwd: fwd.cams(), "feature map")])
def test_the_one_pass_forward_refuses_what_it_lacks(read, what):
    model, (b, h, w, c) = _model("simple_cnn", jnp.float32)
    batch = make_batch(jax.random.key(1), b=b, h=h, w=w, c=c, num_classes=3)
    wrong = losses.Term("wrong", lambda fwd, batch: jnp.mean(read(fwd)), logits_only=True)  # a false declaration
    loss = losses.combine(losses.cdep(1.0), wrong)
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    with pytest.raises(RuntimeError, match=rf"contextual decomposition \(one-pass CDEP\), which gives no {what}"):
        loss(classifier.from_nnx(graphdef, params, state), batch)


@pytest.mark.slow  # ~3 s on 2 cores
def test_train_step_with_one_pass_cdep_moves_statistics_once():
    model, (b, h, w, c) = _model("simple_cnn", jnp.float32)
    batch = make_batch(jax.random.key(1), b=b, h=h, w=w, c=c, num_classes=3)
    optimizer = optax.sgd(0.0)
    model_def, state = train.init_train_state(model, optimizer)
    once = train.merge(model_def, state, train=True)
    once(batch["image"])
    new_state, metrics = train.make_train_step(model_def, losses.for_method("cdep", lam=1.0), optimizer)(state, batch)
    assert bool(metrics["finite"]) and set(metrics) >= {"loss/ce", "loss/cdep"}
    _close(new_state.model_state, nnx.split(once, nnx.Param, ...)[2], 2e-5)
