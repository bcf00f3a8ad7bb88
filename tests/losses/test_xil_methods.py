"""The comparison methods: RRR-G, HINT, RBR, ActDiff, SGT, counterexamples and the image transforms.

Hand-computed values on tiny models, finite-difference checks of the higher-order gradients
(float64), BatchNorm statistics moving once per step with second passes, composition, bad input.
"""

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from conftest import conv_features, gap_dense_head, linear_classifier, make_batch, make_conv_params
from flax import nnx

from saljax import classifier, losses
from saljax.losses import second_pass, transforms

B, H, W, C = 4, 6, 6, 1
KEY = jax.random.key(42)


def bound_classifier(params):
    """tanh-conv + GAP + Dense classifier that exposes its parameters (as `classifier.from_nnx` does)."""
    return classifier.Classifier(lambda x: (conv_features(params, x), None), lambda a: gap_dense_head(params, a),
                                 params=params, rebind=bound_classifier)


def pooled_classifier(params):
    """The same with a 2x2 average pool: feature map (B, H/2, W/2, 3), so maps are resized."""
    def features(x):
        a = conv_features(params, x)
        return jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4, None

    return classifier.Classifier(features, lambda a: gap_dense_head(params, a), params=params, rebind=pooled_classifier)


def _value(term, clf, batch, key=KEY):
    return losses.combine(term)(clf, batch, key=key)[1].terms[term.name]


def _np(batch, key):
    return np.asarray(batch[key], np.float64)


def _minmax(v, eps=1e-8):
    lo = v.min(axis=(1, 2), keepdims=True)
    hi = v.max(axis=(1, 2), keepdims=True)
    return (v - lo) / (hi - lo + eps)


def _cams(params, a):
    return np.einsum("bhwk,kc->bhwc", np.asarray(a, np.float64), np.asarray(params["kernel"], np.float64))


# --- Grad-CAM terms: with a GAP + Dense head, Grad-CAM_c = CAM_c / (h w), so minmax(GC) = minmax(CAM) ---


@pytest.mark.parametrize("weights", ["differentiable", "constant"])
def test_rrr_g_hand_computed(weights):
    params = make_conv_params(jax.random.key(3), num_classes=3)
    batch = make_batch(jax.random.key(4), b=B, h=H, w=W, num_classes=3)
    clf = pooled_classifier(params)
    a = clf.features(batch["image"])[0]
    cams = _cams(params, a)
    pred = np.asarray(clf(batch["image"])).argmax(-1)
    cam = _minmax(cams[np.arange(B), ..., pred])
    small = np.asarray(batch["saliency_map"], np.float64).reshape(B, 3, 2, 3, 2).mean(axis=(2, 4))
    per = (((1 - small) * cam) ** 2).sum(axis=(1, 2))
    expected = (_np(batch, "has_map") * per).sum()
    np.testing.assert_allclose(_value(losses.rrr_g(weights=weights), clf, batch), expected, rtol=1e-5)
    mean = expected / _np(batch, "has_map").sum() / 9
    np.testing.assert_allclose(_value(losses.rrr_g(reduction="mean"), clf, batch), mean, rtol=1e-5)


def test_hint_hand_computed_upsamples_nearest():
    params = make_conv_params(jax.random.key(3))
    batch = make_batch(jax.random.key(4), b=B, h=H, w=W)
    clf = pooled_classifier(params)
    cams = _cams(params, clf.features(batch["image"])[0])
    cam = _minmax(cams[np.arange(B), ..., np.asarray(batch["label"])])
    up = cam.repeat(2, axis=1).repeat(2, axis=2)  # nearest doubling
    per = ((up - _np(batch, "saliency_map")) ** 2).sum(axis=(1, 2))
    np.testing.assert_allclose(_value(losses.hint(), clf, batch), (_np(batch, "has_map") * per).sum(), rtol=1e-5)


def test_nearest_indices_match_pytorch_rule():
    np.testing.assert_array_equal(losses.gradcam.nearest_indices(2, 4), [0, 0, 1, 1])
    np.testing.assert_array_equal(losses.gradcam.nearest_indices(2, 5), [0, 0, 0, 1, 1])  # floor(i * 0.4)
    np.testing.assert_array_equal(losses.gradcam.nearest_indices(3, 3), [0, 1, 2])


def test_constant_weights_drop_the_gradient_through_alpha():
    """Same value, different parameter gradient: 'constant' detaches the channel weights."""
    params = make_conv_params(jax.random.key(3))
    batch = make_batch(jax.random.key(4), b=B, h=H, w=W)

    def grad_of(weights):
        return jax.grad(lambda p: _value(losses.rrr_g(weights=weights), pooled_classifier(p), batch))(params)

    differentiable, constant = grad_of("differentiable"), grad_of("constant")
    # With a GAP + Dense head alpha = W[:, c] / (h w): only the head kernel reaches the term through
    # alpha, and only the conv parameters through A.
    assert float(jnp.max(jnp.abs(differentiable["kernel"]))) > 1e-4
    assert float(jnp.max(jnp.abs(constant["kernel"]))) == 0.0
    chex.assert_trees_all_close(differentiable["w"], constant["w"], rtol=1e-5, atol=1e-7)


# --- RBR -------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~5 s on 2 cores
def test_rbr_matches_reverse_mode_definition(x64):
    """The JVP form of `s = sum of grad_theta CE` against its definition with a reverse-mode gradient."""
    params = make_conv_params(jax.random.key(7), dtype=jnp.float64)
    batch = make_batch(jax.random.key(8), b=3, h=4, w=4, dtype=jnp.float64, has_map=(1, 0, 1))
    labels = batch["label"]

    def ce(p, x):
        logits = gap_dense_head(p, conv_features(p, x))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))

    s = lambda x: sum(jnp.sum(g) for g in jax.tree.leaves(jax.grad(ce)(params, x)))
    influence = jax.jit(jax.grad(s))(batch["image"])
    rrr_score = lambda x: jnp.sum(jax.nn.log_softmax(gap_dense_head(params, conv_features(params, x))))
    ig = jax.jit(jax.grad(rrr_score))(batch["image"])
    off = (1 - batch["saliency_map"])[..., None] * influence * ig
    expected = jnp.sum(batch["has_map"][:, None, None, None] * off**2)
    np.testing.assert_allclose(_value(losses.rbr(), bound_classifier(params), batch), expected, rtol=1e-10)


# --- transforms ------------------------------------------------------------------------------------------


def test_shuffle_outside_permutes_outside_pixels_only():
    batch = make_batch(jax.random.key(1), b=B, h=H, w=W, c=2)
    batch["saliency_map"] = (batch["saliency_map"] > 0.5).astype(jnp.float32)
    out = transforms.shuffle_outside(batch, KEY)["image"]
    x, o = np.asarray(batch["image"]), np.asarray(out)
    outside = np.asarray(transforms.outside_region(batch))
    np.testing.assert_array_equal(o[~outside], x[~outside])  # inside and map-less samples stay
    for n in range(B):
        np.testing.assert_array_equal(np.sort(o[n][outside[n]], axis=0), np.sort(x[n][outside[n]], axis=0))
        if outside[n].sum() > 2:
            assert not np.array_equal(o[n][outside[n]], x[n][outside[n]])
        # channels move together: every output pixel is one input pixel
        assert all(any(np.array_equal(p, q) for q in x[n][outside[n]]) for p in o[n][outside[n]])
    assert not outside[2].any()  # has_map = 0


def test_mask_outside_and_counterexamples():
    batch = make_batch(jax.random.key(1), b=B, h=H, w=W, c=2)
    outside = np.asarray(transforms.outside_region(batch))[..., None].repeat(2, -1)
    x = np.asarray(batch["image"])
    masked = np.asarray(transforms.mask_outside(batch, KEY)["image"])
    np.testing.assert_array_equal(masked, np.where(outside, 0.0, x))
    counter = np.asarray(transforms.counterexamples(batch, KEY)["image"])
    np.testing.assert_array_equal(counter[~outside], x[~outside])
    assert counter[outside].min() >= x.min() and counter[outside].max() <= x.max()
    assert not np.any(counter[outside] == x[outside])
    fixed = np.asarray(transforms.counterexamples(batch, KEY, value_range=(5.0, 6.0))["image"])
    assert fixed[outside].min() >= 5.0


# --- SGT and ActDiff, hand-computed -------------------------------------------------------------------------


def test_sgt_hand_computed():
    k = jax.random.split(jax.random.key(0), 2)
    matrix = jax.random.normal(k[0], (H * W * C, 3))
    offset = jax.random.normal(k[1], (3,))
    batch = make_batch(jax.random.key(1), b=B, h=H, w=W, num_classes=3)
    clf = linear_classifier(matrix, offset)
    m, x, y = np.asarray(matrix, np.float64), np.asarray(batch["image"], np.float64), np.asarray(batch["label"])
    # The input gradient of the label's logit is a column of the matrix.
    grad = m[:, y].T  # (B, D)
    u = np.asarray(jax.random.uniform(losses.term_key(KEY, "sgt"), x.shape), np.float64).reshape(B, -1)
    k_low = int(0.5 * H * W * C)
    x_flat = x.reshape(B, -1).copy()
    for n in range(B):
        low = np.argsort(grad[n], kind="stable")[:k_low]
        x_flat[n, low] = x.min() + (x.max() - x.min()) * u[n, low]
    logp = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = logp(x.reshape(B, -1) @ m + np.asarray(offset)), logp(x_flat @ m + np.asarray(offset))
    expected = np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1))
    np.testing.assert_allclose(_value(losses.sgt(), clf, batch), expected, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sgt_mask_picks_what_a_stable_argsort_picks(dtype, x64):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 5, 4, 2)).astype(dtype)
    v[rng.random(v.shape) < 0.3] = 0.0  # ties at 0, as dead ReLUs give
    v[rng.random(v.shape) < 0.1] = -0.0
    v[rng.random(v.shape) < 0.1] = 1.5
    v[0, 0, 0, 0], v[1, 1, 1, 1] = np.finfo(dtype).min, np.inf
    flat = v.reshape(3, -1)
    for fraction in (0.0, 0.05, 0.5, 0.77, 1.0):
        k = int(fraction * flat.shape[1])
        expected = np.zeros(flat.shape, bool)
        for n in range(3):
            expected[n, np.argsort(flat[n], kind="stable")[:k]] = True
        got = np.asarray(jax.jit(second_pass.sgt_mask, static_argnums=1)(jnp.asarray(v), fraction))
        np.testing.assert_array_equal(got.reshape(3, -1), expected, err_msg=f"fraction {fraction}")


def test_actdiff_hand_computed():
    params = make_conv_params(jax.random.key(3))
    batch = make_batch(jax.random.key(4), b=B, h=H, w=W)
    clf = bound_classifier(params)
    shuffled = losses.shuffle_outside(batch, losses.term_key(KEY, "actdiff"))["image"]
    z = np.asarray(conv_features(params, batch["image"]).mean((1, 2)), np.float64)
    z_t = np.asarray(conv_features(params, shuffled).mean((1, 2)), np.float64)
    m = _np(batch, "has_map")
    expected = (m * np.linalg.norm(z_t - z, axis=1)).sum() / m.sum()
    np.testing.assert_allclose(_value(losses.actdiff(), clf, batch), expected, rtol=1e-5)
    # The draw depends on the term's name only: a renamed term draws another permutation.
    assert _value(losses.actdiff(name="other"), clf, batch) != _value(losses.actdiff(), clf, batch)


# --- gradients against finite differences (float64) ----------------------------------------------------------

_TERMS = {
    "rbr": losses.rbr(1.0),
    "rrr_g": losses.rrr_g(1.0),
    "hint": losses.hint(1.0),
    "sgt": losses.sgt(1.0),
    "actdiff": losses.actdiff(1.0),
    "actdiff_feature_map": losses.actdiff(1.0, layer="feature_map"),
    "counterexamples": losses.transformed_ce(losses.counterexamples),
}


@pytest.mark.parametrize("name", sorted(_TERMS))
def test_gradients_match_finite_differences(name, x64):
    params = make_conv_params(jax.random.key(7), dtype=jnp.float64)
    batch = make_batch(jax.random.key(8), b=3, h=4, w=4, dtype=jnp.float64, has_map=(1, 1, 0))
    loss = losses.combine(_TERMS[name])

    def f(p):
        clf = pooled_classifier(p) if name.startswith(("rrr_g", "hint")) else bound_classifier(p)
        return loss(clf, batch, key=KEY)[0]

    jax.test_util.check_grads(jax.jit(f), (params,), order=1, modes=["rev"], eps=1e-5)


# --- BatchNorm: second passes do not move the statistics ------------------------------------------------------


class _BatchNormNet(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        kw = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.conv = nnx.Conv(1, 3, (3, 3), padding=((1, 1), (1, 1)), **kw)
        self.bn = nnx.BatchNorm(3, momentum=0.9, **kw)
        self.classifier = nnx.Linear(3, 2, **kw)

    def features(self, x):
        return jnp.tanh(self.bn(self.conv(x)))

    def head(self, a):
        return self.classifier(a.mean((1, 2)))

    def __call__(self, x):
        return self.head(self.features(x))


def _one_pass_state(model, images):
    once = nnx.clone(model)
    once(images)
    return nnx.split(once, nnx.Param, ...)[2]


@pytest.mark.parametrize("method", ["actdiff", "sgt", "counterexamples", "rbr", "rrr_g", "hint", "masked_images",
                                    "shuffled_images"])
def test_batchnorm_statistics_change_once(method):
    model = _BatchNormNet(nnx.Rngs(0))
    model.train()
    batch = make_batch(jax.random.key(1), b=4, h=6, w=6, c=1)
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    loss = losses.for_method(method)

    @jax.jit
    def step(params, state):
        return jax.grad(lambda p: loss(classifier.from_nnx(graphdef, p, state), batch, key=KEY), has_aux=True)(params)

    grads, aux = step(params, state)
    assert jax.tree.all(jax.tree.map(lambda g: bool(jnp.all(jnp.isfinite(g))), grads))
    # The transforms replace the batch before the one pass; every other method passes the clean batch once.
    seen = batch if loss.transform is None else loss.transform(batch, losses.term_key(KEY, "transform"))
    chex.assert_trees_all_close(aux.state, _one_pass_state(model, seen["image"]), rtol=1e-6)


# nnx.BatchNorm keeps float32 running statistics in a float64 model; the update warns, harmlessly here.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
@pytest.mark.slow  # a third-order program compiled for finite differences
def test_rbr_through_train_mode_batchnorm_matches_finite_differences(x64):
    """Third order through train-mode BatchNorm (where PyTorch's autograd drops the batch statistics'
    dependence; see the parity test): the conv bias, removed by BatchNorm, gets exactly no gradient."""
    model = _BatchNormNet(nnx.Rngs(0), jnp.float64)
    model.train()
    batch = make_batch(jax.random.key(1), b=4, h=5, w=5, c=1, dtype=jnp.float64)
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    loss = losses.combine(losses.rbr(1.0))
    f = lambda p: loss(classifier.from_nnx(graphdef, p, state), batch)[0]
    jax.test_util.check_grads(jax.jit(f), (params,), order=1, modes=["rev"], eps=1e-5)
    assert float(jnp.max(jnp.abs(jax.jit(jax.grad(f))(params)["conv"]["bias"][...]))) < 1e-12


# --- composition and presets --------------------------------------------------------------------------------


def test_combine_flattens_losses_like_chain():
    loss = losses.combine(losses.for_method("cyborg"), losses.rrr(0.1))
    assert [(t.name, t.weight) for t in loss.terms] == [("ce", 0.5), ("cyborg", 0.5), ("rrr", 0.1)]
    nested = losses.combine(losses.combine(losses.cross_entropy()), losses.combine(losses.hint(2.0), losses.sgt()))
    assert [t.name for t in nested] == ["ce", "hint", "sgt"]
    params = make_conv_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1))
    value, aux = jax.jit(lambda p: loss(bound_classifier(p), batch))(params)
    np.testing.assert_allclose(value, 0.5 * aux.terms["ce"] + 0.5 * aux.terms["cyborg"] + 0.1 * aux.terms["rrr"], rtol=1e-6)
    masked = losses.combine(losses.for_method("masked_images"), losses.actdiff())
    assert masked.transform is not None and [t.name for t in masked] == ["ce", "actdiff"]


def test_combine_errors():
    with pytest.raises(ValueError, match="two terms are named 'ce'"):
        losses.combine(losses.for_method("sgt"), losses.cross_entropy())
    with pytest.raises(ValueError, match="at most one"):
        losses.combine(losses.for_method("masked_images"), losses.for_method("shuffled_images", lam=1.0) if False
                       else losses.combine(losses.cross_entropy(name="ce2"), transform=transforms.mask_outside))
    with pytest.raises(TypeError, match="combine takes Terms and Losses"):
        losses.combine(losses.sgt)


def test_presets_come_from_the_table():
    for method, row in losses.PRESETS.items():
        loss = losses.for_method(method)
        weights = [t.weight for t in loss.terms]
        if "alpha" in row:
            assert weights == [row["alpha"], 1.0 - row["alpha"]], method
        elif row["term"] is not None:
            assert weights == [1.0, row["lam"]], method
    assert [t.weight for t in losses.for_method("sgt", lam=0.3).terms] == [1.0, 0.3]
    random = {m for m in losses.METHODS if losses.for_method(m).needs_key}
    assert random == {"actdiff", "actdiff_discriminator", "sgt", "counterexamples", "masked_images", "shuffled_images"}
    assert {m for m in losses.METHODS if losses.for_method(m).needs_state} == {"actdiff_discriminator"}


# --- bad input --------------------------------------------------------------------------------------------


def test_errors_before_tracing():
    params = make_conv_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1))
    flat = classifier.from_functions(lambda x: x.reshape(x.shape[0], -1), lambda a: a[:, :2])
    for method in ("rrr_g", "hint", "actdiff", "cyborg"):
        with pytest.raises(ValueError, match=rf"'{method}' needs a conv feature map: .* got shape \(4, 36\)"):
            losses.for_method(method)(flat, batch, key=KEY)
    no_map = {k: v for k, v in batch.items() if k != "saliency_map"}
    for method in ("rrr_g", "hint", "actdiff", "rbr", "counterexamples", "masked_images"):
        with pytest.raises(ValueError, match="batch has no 'saliency_map' entry"):
            losses.for_method(method)(bound_classifier(params), no_map, key=KEY)
    losses.for_method("sgt")(bound_classifier(params), no_map, key=KEY)  # SGT needs no map
    for method in ("actdiff", "sgt", "counterexamples", "shuffled_images"):
        with pytest.raises(ValueError, match="draws random numbers: call loss"):
            losses.for_method(method)(bound_classifier(params), batch)
    with pytest.raises(ValueError, match="'rbr' differentiates with respect to the parameters inside the loss"):
        losses.for_method("rbr")(classifier.from_functions(lambda x: conv_features(params, x),
                                                           lambda a: gap_dense_head(params, a)), batch)
    with pytest.raises(ValueError, match=r"layer must be one of \('pooled', 'feature_map', 'logits'\); got 'conv3'"):
        losses.actdiff(layer="conv3")
    with pytest.raises(ValueError, match="fraction must lie in"):
        losses.sgt(fraction=1.5)
    with pytest.raises(ValueError, match="weights must be one of"):
        losses.rrr_g(weights="detached")
    with pytest.raises(ValueError, match="method must be one of"):
        losses.for_method("gain")


@pytest.mark.slow  # ~4 s on 2 cores
def test_rbr_with_a_linen_classifier():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def features(self, x):
            return jnp.tanh(nn.Conv(3, (3, 3))(x))

        @nn.compact
        def head(self, a):
            return nn.Dense(2)(a.mean((1, 2)))

        def __call__(self, x):
            return self.head(self.features(x))

    batch = make_batch(jax.random.key(1), b=4, h=6, w=6, c=1)
    net = Net()
    variables = net.init(jax.random.key(0), batch["image"])
    loss = losses.for_method("rbr")

    def f(params):
        return loss(classifier.from_linen(net, {**variables, "params": params}, mutable=False), batch)[0]

    value, grads = jax.value_and_grad(f)(variables["params"])
    assert np.isfinite(value) and value > 0
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
