"""Losses: hand-computed values, the CAM margin identity, second-order gradients, BatchNorm, bad input."""

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from conftest import (
    bound_conv_classifier,
    conv_classifier,
    conv_features,
    gap_dense_head,
    linear_classifier,
    make_batch,
    make_conv_params,
    slow_where,
)
from flax import nnx

from saljax import classifier, losses

B, H, W, C = 4, 5, 5, 2


def _linear_setup(num_classes=2, seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    matrix = jax.random.normal(k[0], (H * W * C, num_classes))
    offset = jax.random.normal(k[1], (num_classes,))
    batch = make_batch(jax.random.key(seed + 1), b=B, h=H, w=W, c=C, num_classes=num_classes)
    logits = batch["image"].reshape(B, -1) @ matrix + offset
    return np.asarray(matrix, np.float64), np.asarray(logits, np.float64), batch, linear_classifier(matrix, offset)


def _np(batch, key):
    return np.asarray(batch[key], np.float64)


def _value(term, clf, batch):
    return losses.combine(term)(clf, batch)[1].terms[term.name]


def _ce(logits, labels):
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


# --- hand-computed values on a linear model (input gradient = a weight column) ---------------------


def test_cross_entropy_mean_and_sum():
    _, logits, batch, clf = _linear_setup()
    ce = _ce(logits, np.asarray(batch["label"]))
    np.testing.assert_allclose(_value(losses.cross_entropy(), clf, batch), ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(_value(losses.cross_entropy(reduction="sum"), clf, batch), ce.sum(), rtol=1e-5)


def _gradmask_reference(matrix, logits, batch, *, positives=False, l2=False, mean=False, midl=False):
    labels = np.asarray(batch["label"])
    d = logits[:, 0] - logits[:, 1]
    # g_n = d/dx |z_n0 - z_n1| = sign(z_n0 - z_n1) (M[:, 0] - M[:, 1])
    g = np.sign(d)[:, None] * (matrix[:, 0] - matrix[:, 1])[None, :]
    off = (1.0 - _np(batch, "saliency_map"))[..., None] * g.reshape(B, H, W, C)
    per = (off**2 if l2 else np.abs(off)).sum(axis=(1, 2, 3))
    weights = _np(batch, "has_map") * ((labels == 1) if positives else 1.0)
    penalty = (weights * per).sum()
    if mean:
        penalty = penalty / max(weights.sum(), 1.0) / (H * W * C)
    if midl:
        penalty = _ce(logits, labels).mean() * penalty
    return penalty


@pytest.mark.parametrize("options, reference", [
    ({}, {}),
    ({"samples": "positives"}, {"positives": True}),
    ({"norm": "l2sq"}, {"l2": True}),
    ({"reduction": "mean"}, {"mean": True}),
    ({"variant": "midl"}, {"positives": True, "l2": True, "midl": True}),
])
def test_gradmask_hand_computed(options, reference):
    matrix, logits, batch, clf = _linear_setup()
    got = _value(losses.gradmask(**options), clf, batch)
    np.testing.assert_allclose(got, _gradmask_reference(matrix, logits, batch, **reference), rtol=1e-5)


def test_gradmask_midl_total_is_multiplicative():
    matrix, logits, batch, clf = _linear_setup()
    ce = _ce(logits, np.asarray(batch["label"])).mean()
    r = _gradmask_reference(matrix, logits, batch, positives=True, l2=True)
    total, _ = losses.for_method("gradmask_midl", lam=0.3)(clf, batch)
    np.testing.assert_allclose(total, ce * (1 + 0.3 * r), rtol=1e-5)


def test_gradmask_nonhealthy_score_and_k_class_contrast():
    matrix, logits, batch, clf = _linear_setup()
    g = np.sign(logits[:, 1])[:, None] * matrix[:, 1][None, :]
    off = (1 - _np(batch, "saliency_map"))[..., None] * g.reshape(B, H, W, C)
    expected = (_np(batch, "has_map") * np.abs(off).sum(axis=(1, 2, 3))).sum()
    np.testing.assert_allclose(_value(losses.gradmask(score="nonhealthy"), clf, batch), expected, rtol=1e-5)

    matrix, logits, batch, clf = _linear_setup(num_classes=3)
    labels = np.asarray(batch["label"])
    grads = []
    for n, t in enumerate(labels):
        others = [k for k in range(3) if k != t]
        q = np.exp(logits[n, others]) / np.exp(logits[n, others]).sum()
        v = logits[n, t] - np.log(np.exp(logits[n, others]).sum())
        dz = np.zeros(3)
        dz[t] = 1.0
        dz[others] = -q
        grads.append(np.sign(v) * matrix @ dz)
    off = (1 - _np(batch, "saliency_map"))[..., None] * np.stack(grads).reshape(B, H, W, C)
    expected = (_np(batch, "has_map") * np.abs(off).sum(axis=(1, 2, 3))).sum()
    np.testing.assert_allclose(_value(losses.gradmask(), clf, batch), expected, rtol=1e-5)


def test_rrr_hand_computed():
    matrix, logits, batch, clf = _linear_setup(num_classes=3)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # d/dz sum_k log p_k = 1 - K p, so g_n = M (1 - 3 p_n).
    g = ((1.0 - 3.0 * p) @ matrix.T).reshape(B, H, W, C)
    off = (1 - _np(batch, "saliency_map"))[..., None] * g
    expected = (_np(batch, "has_map") * (off**2).sum(axis=(1, 2, 3))).sum()
    np.testing.assert_allclose(_value(losses.rrr(), clf, batch), expected, rtol=1e-5)
    total, _ = losses.for_method("rrr", lam=2.0)(clf, batch)
    np.testing.assert_allclose(total, _ce(logits, np.asarray(batch["label"])).sum() + 2.0 * expected, rtol=1e-5)


def test_samples_without_maps_are_not_penalised():
    _, _, batch, _ = _linear_setup()
    none = dict(batch, has_map=jnp.zeros((B,), bool))
    clf = conv_classifier(make_conv_params(jax.random.key(3), in_channels=C))
    for term in (losses.gradmask(), losses.rrr(), losses.cyborg(), losses.dd_paired(), losses.dd_divergence()):
        assert _value(term, clf, none) == 0.0, term.name
        assert _value(term, clf, batch) > 0.0, term.name


# --- CAM losses: hand-computed with explicit CAMs -----------------------------------------------------


def _cam_setup(num_classes=2, map_size=None):
    params = make_conv_params(jax.random.key(3), in_channels=C, num_classes=num_classes)
    batch = make_batch(jax.random.key(4), b=B, h=H, w=W, c=C, num_classes=num_classes)
    a = np.asarray(conv_features(params, batch["image"]), np.float64)
    cams = np.einsum("bhwk,kc->bhwc", a, np.asarray(params["kernel"], np.float64))
    logits = np.asarray(gap_dense_head(params, conv_features(params, batch["image"])), np.float64)
    return params, batch, cams, logits, conv_classifier(params)


def _minmax(v, eps=1e-8):
    lo = v.min(axis=(1, 2), keepdims=True)
    hi = v.max(axis=(1, 2), keepdims=True)
    return (v - lo) / (hi - lo + eps)


def _masked_mean(per, batch):
    m = _np(batch, "has_map")
    return (m * per).sum() / max(m.sum(), 1.0)


@pytest.mark.parametrize("cam_class", ["true", "pred"])
def test_cyborg_hand_computed(cam_class):
    _, batch, cams, logits, clf = _cam_setup(num_classes=3)
    index = np.asarray(batch["label"]) if cam_class == "true" else logits.argmax(-1)
    cam = cams[np.arange(B), ..., index]
    per = ((_minmax(cam) - _minmax(_np(batch, "saliency_map"))) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(_value(losses.cyborg(cam_class=cam_class), clf, batch), _masked_mean(per, batch), rtol=1e-5)


def test_dd_terms_hand_computed():
    _, batch, cams, _, clf = _cam_setup()
    t = np.asarray(batch["label"])
    cam_t, cam_f = cams[np.arange(B), ..., t], cams[np.arange(B), ..., 1 - t]
    h = _np(batch, "saliency_map")
    mse = lambda a, b: ((a - b) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(
        _value(losses.dd_difference(), clf, batch), _masked_mean(mse(_minmax(cam_t - cam_f), h), batch), rtol=1e-5)
    np.testing.assert_allclose(
        _value(losses.dd_paired(), clf, batch),
        _masked_mean(mse(_minmax(cam_t), h) + mse(_minmax(cam_f), 1 - h), batch), rtol=1e-5)
    diff = _minmax(cam_t) - _minmax(cam_f)
    delta, eps = 0.3, 1e-8
    inside = (h * np.maximum(delta - diff, 0)).sum(axis=(1, 2)) / (h.sum(axis=(1, 2)) + eps)
    outside = ((1 - h) * np.abs(diff)).sum(axis=(1, 2)) / ((1 - h).sum(axis=(1, 2)) + eps)
    np.testing.assert_allclose(
        _value(losses.dd_divergence(delta=delta), clf, batch), _masked_mean(inside + outside, batch), rtol=1e-5)


def test_margin_identity_of_the_divergence_map():
    params, batch, cams, logits, _ = _cam_setup()
    t = np.asarray(batch["label"])
    d = cams[np.arange(B), ..., t] - cams[np.arange(B), ..., 1 - t]
    b = np.asarray(params["bias"])
    # mean_ij (CAM_t - CAM_f) = (z_t - z_f) - (b_t - b_f): D decomposes the decision margin.
    margin = logits[np.arange(B), t] - logits[np.arange(B), 1 - t] - (b[t] - b[1 - t])
    np.testing.assert_allclose(d.mean(axis=(1, 2)), margin, rtol=1e-5, atol=1e-6)


def test_cam_losses_resize_maps_from_image_to_feature_resolution():
    params = make_conv_params(jax.random.key(3), in_channels=C)
    pooled = lambda x: jax.lax.reduce_window(conv_features(params, x), 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    clf = classifier.from_functions(pooled, lambda a: gap_dense_head(params, a))
    batch = make_batch(jax.random.key(4), b=B, h=8, w=8, c=C)
    # Bilinear (half-pixel centres, no antialiasing) halving samples the centre of each 2x2 block.
    h = np.asarray(batch["saliency_map"], np.float64).reshape(B, 4, 2, 4, 2).mean(axis=(2, 4))
    small = dict(batch, saliency_map=jnp.asarray(h, jnp.float32))
    np.testing.assert_allclose(_value(losses.cyborg(), clf, batch), _value(losses.cyborg(), clf, small), rtol=1e-5)


# --- second-order gradients: the parameter gradient through the input gradient -------------------------

_PENALTIES = {
    "gradmask": losses.gradmask(1.0),
    "gradmask_l2_mean_positives": losses.gradmask(1.0, norm="l2sq", reduction="mean", samples="positives"),
    "gradmask_midl": losses.gradmask(1.0, variant="midl"),
    "gradmask_nonhealthy_blur": losses.gradmask(1.0, score="nonhealthy", mask_blur=0.7, mask_dilation=1),
    "rrr": losses.rrr(1.0),
    "cyborg": losses.cyborg(1.0),
    "cyborg_pred": losses.cyborg(1.0, cam_class="pred"),
    "dd_difference": losses.dd_difference(1.0),
    "dd_paired": losses.dd_paired(1.0),
    "dd_divergence": losses.dd_divergence(1.0),
    "ce": losses.cross_entropy(),
}


# A penalty's options (norm, reduction, blur, the CAM's class), GradMask's MIDL form and the two Divisive
# Decisions losses beside dd_divergence reuse a second-order path checked here; their values are
# hand-computed above. Their finite-difference checks (2-4 s each) run in the slow tier.
_VARIANTS = {"gradmask_l2_mean_positives", "gradmask_nonhealthy_blur", "gradmask_midl", "cyborg_pred", "dd_difference",
             "dd_paired"}


@pytest.mark.parametrize("name", slow_where(sorted(_PENALTIES), _VARIANTS.__contains__))
def test_second_order_gradients_match_finite_differences(name, x64):
    params = make_conv_params(jax.random.key(7), in_channels=1, dtype=jnp.float64)
    batch = make_batch(jax.random.key(8), b=3, h=4, w=4, c=1, dtype=jnp.float64, has_map=(1, 1, 0))
    loss = losses.combine(_PENALTIES[name])

    def f(p):
        return loss(conv_classifier(p), batch)[0]

    jax.test_util.check_grads(jax.jit(f), (params,), order=2, modes=["rev"], eps=1e-4)


# --- one forward pass: BatchNorm statistics change once per step ---------------------------------------


class _BatchNormNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn = nnx.BatchNorm(3, momentum=0.9, rngs=rngs)
        self.classifier = nnx.Linear(3, 2, rngs=rngs)

    def features(self, x):
        return jnp.tanh(self.bn(self.conv(x)))

    def head(self, a):
        return self.classifier(a.mean((1, 2)))

    def __call__(self, x):
        return self.head(self.features(x))


def test_batchnorm_statistics_change_exactly_once_per_step():
    model = _BatchNormNet(nnx.Rngs(0))
    model.train()
    batch = make_batch(jax.random.key(1), b=4, h=6, w=6, c=1)
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    loss = losses.combine(losses.cross_entropy(), losses.gradmask(1.0), losses.rrr(1.0), losses.dd_paired(0.5))

    @jax.jit
    def step(params, state):
        return jax.grad(lambda p: loss(classifier.from_nnx(graphdef, p, state), batch), has_aux=True)(params)

    grads, aux = step(params, state)
    assert jax.tree.all(jax.tree.map(lambda g: bool(jnp.all(jnp.isfinite(g))), grads))
    once = nnx.clone(model)
    once(batch["image"])  # one forward pass in train mode
    _, _, expected = nnx.split(once, nnx.Param, ...)
    chex.assert_trees_all_close(aux.state, expected, rtol=1e-6)
    twice = nnx.clone(once)
    twice(batch["image"])
    _, _, two = nnx.split(twice, nnx.Param, ...)
    assert not np.allclose(two["bn"]["mean"][...], expected["bn"]["mean"][...])
    # The loss itself did not mutate the module.
    chex.assert_trees_all_equal(nnx.split(model, nnx.Param, ...)[2], state)


def test_linen_classifier_returns_updated_batch_stats():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def features(self, x):
            return jnp.tanh(nn.BatchNorm(use_running_average=False)(nn.Conv(3, (3, 3))(x)))

        @nn.compact
        def head(self, a):
            return nn.Dense(2)(a.mean((1, 2)))

        def __call__(self, x):
            return self.head(self.features(x))

    batch = make_batch(jax.random.key(1), b=4, h=6, w=6, c=1)
    net = Net()
    variables = net.init(jax.random.key(0), batch["image"])
    clf = classifier.from_linen(net, variables)
    value, aux = losses.for_method("gradmask")(clf, batch)
    assert np.isfinite(value)
    _, expected = net.apply(variables, batch["image"], mutable=["batch_stats"])
    chex.assert_trees_all_close(aux.state, expected)


class CombineVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_combined_loss_with_and_without_jit(self):
        params = make_conv_params(jax.random.key(0))
        batch = make_batch(jax.random.key(1))
        loss = losses.combine(losses.cross_entropy(), losses.gradmask(0.5), losses.dd_divergence(0.25))
        value, aux = self.variant(lambda p, b: loss(conv_classifier(p), b))(params, batch)
        expected = aux.terms["ce"] + 0.5 * aux.terms["gradmask"] + 0.25 * aux.terms["dd_divergence"]
        np.testing.assert_allclose(value, expected, rtol=1e-6)
        eager, _ = loss(conv_classifier(params), batch)
        np.testing.assert_allclose(value, eager, rtol=1e-5)


@pytest.mark.slow  # ~7 s on 2 cores
def test_for_method_builds_every_method():
    params = make_conv_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1))
    # cdep needs an nnx model's contextual decomposition: built in test_cdep.py
    built = {method: losses.for_method(method) for method in losses.METHODS if method != "cdep"}
    # Terms that keep state (ActDiff's discriminator) read it from term_state.
    states = {method: loss.init_state(bound_conv_classifier(params), batch["image"], key=jax.random.key(3))
              for method, loss in built.items() if loss.needs_state}

    @jax.jit  # every method in one program: one compilation instead of one per method
    def values(p):
        return {method: loss(bound_conv_classifier(p), batch, key=jax.random.key(2), term_state=states.get(method))[0]
                for method, loss in built.items()}

    for method, value in values(params).items():
        assert np.isfinite(value), method
    cyborg = losses.for_method("cyborg", alpha=0.25)
    assert [(t.name, t.weight) for t in cyborg.terms] == [("ce", 0.25), ("cyborg", 0.75)]
