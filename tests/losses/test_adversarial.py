"""ActDiff's adversarial discriminator (`losses.actdiff_discriminator`): the game, its state, training.

Hand-computed spectral normalisation and BCE (float64), the discriminator learning a separable toy,
the sign of the classifier's gradient (labels flipped) and finite differences of it, the state
carried by the train step, updates every k-th step, BatchNorm statistics moving once, bad input,
and parity with PyTorch (its own spectral_norm, BCELoss and Adam, and the baseline's mirror).
"""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import bound_conv_classifier, conv_features, forward, make_batch, make_conv_params
from flax import nnx

from saljax import demo, losses, models, train
from saljax.losses import adversarial

KEY = jax.random.key(7)
HERE = Path(__file__).resolve().parent


def _np_normalize(v):
    return v / max(np.linalg.norm(v), 1e-12)


def _np_discriminate(params, u, z):
    h, new_u = np.asarray(z, np.float64), {}
    for name in sorted(u):
        k = np.asarray(params[name]["kernel"], np.float64)
        w_mat = k.T  # PyTorch's (fan_out, fan_in)
        v = _np_normalize(w_mat.T @ np.asarray(u[name], np.float64))
        new_u[name] = _np_normalize(w_mat @ v)
        sigma = new_u[name] @ w_mat @ v
        h = np.maximum(h @ (w_mat / sigma).T + np.asarray(params[name]["bias"]), 0.0)
    out = params["out"]
    return (h @ np.asarray(out["kernel"]) + np.asarray(out["bias"]))[:, 0], new_u


def _state(key, d=5, hidden=(6, 4), lr=1e-2):
    state = adversarial.discriminator_init(key, d, hidden)
    state["opt_state"] = optax.adam(lr).init(state["params"])
    return state


@pytest.mark.slow  # ~5 s on 2 cores
def test_discriminator_apply_matches_hand_computed_spectral_norm(x64):
    state = _state(jax.random.key(0))
    state = jax.tree.map(lambda a: a.astype(jnp.float64), state)
    z = jax.random.normal(jax.random.key(1), (3, 5), jnp.float64)
    logits, new_u = adversarial.discriminator_apply(state["params"], state["u"], z)
    want, want_u = _np_discriminate(state["params"], state["u"], z)
    np.testing.assert_allclose(logits, want, rtol=1e-12)
    for name in want_u:
        np.testing.assert_allclose(new_u[name], want_u[name], rtol=1e-12)
        assert abs(np.linalg.norm(new_u[name]) - 1.0) < 1e-12
    # PyTorch's nn.Linear initialisation: uniform in +-1/sqrt(fan_in).
    big = adversarial.discriminator_init(jax.random.key(2), 64, (32,))
    assert np.abs(np.asarray(big["params"]["layer0"]["kernel"])).max() <= 1 / 8
    assert np.abs(np.asarray(big["params"]["out"]["kernel"])).max() <= 1 / np.sqrt(32)


@pytest.mark.slow  # ~6 s on 2 cores
def test_step_is_the_authors_game_hand_computed(x64):
    """D's Adam step on lam * (BCE(D z, 1) + BCE(D z~, 0)), then BCE(D' z, 0) + BCE(D' z~, 1), u advanced 4 times."""
    lam, lr = 2.0, 1e-2
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, _state(jax.random.key(0), lr=lr))
    z = jax.random.normal(jax.random.key(1), (4, 5), jnp.float64)
    z_t = jax.random.normal(jax.random.key(2), (4, 5), jnp.float64)
    weights = jnp.asarray([1.0, 1.0, 0.0, 1.0])
    value, new = jax.jit(functools.partial(adversarial.discriminator_step, lam=lam, lr=lr))(state, z, z_t, weights)

    def bce(a, t):
        return -(t * np.log(1 / (1 + np.exp(-a))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-a))))

    m = np.asarray(weights)
    mean = lambda v: (m * v).sum() / m.sum()  # noqa: E731
    real, u1 = _np_discriminate(state["params"], state["u"], z)
    fake, u2 = _np_discriminate(state["params"], u1, z_t)
    np.testing.assert_allclose(new["metrics"]["discriminator"], mean(bce(real, 1)) + mean(bce(fake, 0)), rtol=1e-12)
    # One Adam step from zero moments moves every parameter by lr * g / (|g| + eps) = lr * sign(g).
    grads = jax.grad(lambda p: lam * (
        jnp.sum(weights * adversarial._bce(adversarial.discriminator_apply(p, state["u"], z)[0], 1.0))
        + jnp.sum(weights * adversarial._bce(adversarial.discriminator_apply(p, u1, z_t)[0], 0.0))) / 3)(state["params"])
    moved = jax.tree.map(lambda p, g: p - lr * g / (jnp.abs(g) + 1e-8), state["params"], grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), new["params"], moved)
    real2, u3 = _np_discriminate(new["params"], u2, z)
    fake2, u4 = _np_discriminate(new["params"], u3, z_t)
    np.testing.assert_allclose(value, mean(bce(real2, 0)) + mean(bce(fake2, 1)), rtol=1e-12)
    for name in u4:
        np.testing.assert_allclose(new["u"][name], u4[name], rtol=1e-12)
    assert int(new["opt_state"][0].count) == 1


@pytest.mark.slow  # ~4 s on 2 cores
def test_discriminator_learns_a_separable_toy():
    d = 5
    state = _state(jax.random.key(0), d=d, hidden=(16, 16), lr=1e-2)
    z = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), (32, d))
    z_t = -1.0 + 0.3 * jax.random.normal(jax.random.key(2), (32, d))
    ones = jnp.ones(32)
    step = jax.jit(lambda s: adversarial.discriminator_step(s, z, z_t, ones, lam=1.0, lr=1e-2))
    first_value, state = step(state)
    start = float(state["metrics"]["discriminator"])
    for _ in range(60):
        value, state = step(state)
    assert abs(start - 2 * np.log(2)) < 0.2
    assert float(state["metrics"]["discriminator"]) < 0.05  # D separates real (z) from fake (z~)
    assert float(value) > 5.0 > float(first_value)  # ... so the classifier's (flipped-label) term grows


@pytest.mark.slow  # ~4 s on 2 cores
def test_classifier_gradient_fools_the_updated_discriminator(x64):
    """Labels flipped, D' held constant: a descent step on z lowers D'(z), on z~ raises D'(z~); FD agree."""
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, _state(jax.random.key(3)))
    z = jax.random.normal(jax.random.key(4), (3, 5), jnp.float64)
    z_t = jax.random.normal(jax.random.key(5), (3, 5), jnp.float64)
    w = jnp.ones(3)
    g_z, g_t = jax.jit(jax.grad(lambda a, b: adversarial.discriminator_step(state, a, b, w, lam=1.0, lr=1e-2)[0],
                                (0, 1)))(z, z_t)
    _, new = jax.jit(functools.partial(adversarial.discriminator_step, lam=1.0, lr=1e-2))(state, z, z_t, w)
    _, u1 = adversarial.discriminator_apply(state["params"], state["u"], z)
    _, u2 = adversarial.discriminator_apply(state["params"], u1, z_t)

    def generator(a, b):  # the term with D' and its u fixed: the part the classifier's gradient sees
        real, u3 = adversarial.discriminator_apply(new["params"], u2, a)
        fake, _ = adversarial.discriminator_apply(new["params"], u3, b)
        return jnp.mean(adversarial._bce(real, 0.0)) + jnp.mean(adversarial._bce(fake, 1.0))

    eps = 1e-6
    for arr, grad, index in ((z, g_z, 0), (z_t, g_t, 1)):
        direction = jax.random.normal(jax.random.key(index), arr.shape, jnp.float64)
        plus = generator(*((arr + eps * direction, z_t) if index == 0 else (z, arr + eps * direction)))
        minus = generator(*((arr - eps * direction, z_t) if index == 0 else (z, arr - eps * direction)))
        np.testing.assert_allclose(jnp.sum(grad * direction), (plus - minus) / (2 * eps), rtol=1e-6)
    logit = lambda p, u, a: adversarial.discriminator_apply(p, u, a)[0]  # noqa: E731
    u3 = adversarial.discriminator_apply(new["params"], u2, z)[1]
    assert np.all(logit(new["params"], u2, z - 1e-3 * g_z) < logit(new["params"], u2, z))
    assert np.all(logit(new["params"], u3, z_t - 1e-3 * g_t) > logit(new["params"], u3, z_t))


@pytest.mark.slow  # ~4 s on 2 cores
def test_loss_term_matches_the_step_on_pooled_activations():
    params = make_conv_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1))
    clf = bound_conv_classifier(params)
    loss = losses.combine(losses.cross_entropy(), losses.actdiff_discriminator(0.5, lr=1e-3, hidden=(4,)))
    assert loss.needs_state and loss.needs_key and loss.update_every == 1
    states = loss.init_state(clf, batch["image"], key=KEY)
    assert states["actdiff_discriminator"]["params"]["layer0"]["kernel"].shape == (3, 4)
    total, aux = loss(clf, batch, key=KEY, term_state=states)
    shuffled = losses.shuffle_outside(batch, losses.term_key(KEY, "actdiff_discriminator"))["image"]
    z = conv_features(params, batch["image"]).mean(axis=(1, 2))
    z_t = conv_features(params, shuffled).mean(axis=(1, 2))
    want, new = adversarial.discriminator_step(states["actdiff_discriminator"], z, z_t,
                                               batch["has_map"].astype(jnp.float32), lam=0.5, lr=1e-3)
    np.testing.assert_allclose(aux.terms["actdiff_discriminator"], want, rtol=1e-6)
    np.testing.assert_allclose(total, aux.terms["ce"] + 0.5 * want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), aux.term_state["actdiff_discriminator"], new)
    # Composes with other terms; the plain ones report no term state.
    both = losses.combine(loss, losses.actdiff(0.1))
    assert [t.name for t in both] == ["ce", "actdiff_discriminator", "actdiff"]
    assert jax.eval_shape(lambda: both(clf, batch, key=KEY, term_state=states))[1].term_state.keys() == {
        "actdiff_discriminator"}
    assert jax.eval_shape(lambda: losses.for_method("actdiff")(clf, batch, key=KEY))[1].term_state is None


def _toy(n=16):
    return demo.toy_decoy_set(n, seed=0, decoy_follows_label=True)


def _setup(loss, optimizer, n=16, channels=(4, 4)):
    data = _toy(n)
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=channels, rngs=nnx.Rngs(0))
    model_def, state = train.init_train_state(model, optimizer, loss=loss, images=data["image"], key=KEY)
    return data, model, model_def, state


@pytest.mark.slow  # ~10 s on 2 cores
def test_train_step_carries_the_state_and_updates_every_k_steps():
    loss = losses.for_method("actdiff_discriminator", lam=1.0, update_every=3, lr=1e-2, hidden=(8,))
    optimizer = optax.adam(1e-2)
    data, model, model_def, state = _setup(loss, optimizer)
    step = train.make_train_step(model_def, loss, optimizer)
    updated = []
    for i in range(6):
        before = jax.device_get(state)  # the step donates its input state
        state, out = step(state, data)
        params_moved = not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.params, before.params)))
        disc_before = before.loss_state["actdiff_discriminator"]["params"]
        disc_moved = not all(jax.tree.leaves(jax.tree.map(
            lambda a, b: bool(jnp.all(a == b)), state.loss_state["actdiff_discriminator"]["params"], disc_before)))
        assert disc_moved, i  # the discriminator steps every step
        assert params_moved == bool(out["updated"]), i
        updated.append(params_moved)
        assert "loss/actdiff_discriminator/discriminator" in out
    assert updated == [False, False, True, False, False, True]  # steps 3 and 6, as the authors' disc_iter
    assert int(state.loss_state["actdiff_discriminator"]["opt_state"][0].count) == 6
    assert int(optax.tree_utils.tree_get(state.opt_state, "count")) == 2


@pytest.mark.slow  # ~7 s on 2 cores
def test_batchnorm_statistics_move_once_per_step():
    loss = losses.for_method("actdiff_discriminator", hidden=(4,))
    optimizer = optax.sgd(0.0)
    data, model, model_def, state = _setup(loss, optimizer)
    once = train.merge(model_def, state, train=True)
    forward(once, jnp.asarray(data["image"]))
    expected = nnx.split(once, nnx.Param, ...)[2]
    state, _ = train.make_train_step(model_def, loss, optimizer)(state, data)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.model_state, expected)


@pytest.mark.slow
def test_short_training_run_lowers_ce_and_evaluates():
    loss = losses.for_method("actdiff_discriminator", lam=0.1, lr=1e-3, hidden=(32, 32))
    optimizer = optax.adam(1e-2)
    data, model, model_def, state = _setup(loss, optimizer, n=32, channels=(8, 8, 8, 8))
    step = train.make_train_step(model_def, loss, optimizer)
    ces = []
    for _ in range(25):
        state, out = step(state, data)
        assert bool(out["finite"])
        ces.append(float(out["loss/ce"]))
    assert np.mean(ces[-5:]) < 0.6 * np.mean(ces[:3])
    summary = train.evaluate(train.make_eval_step(model_def, loss=loss), state, [data])
    assert np.isfinite(summary["loss/actdiff_discriminator"]) and summary["accuracy"] > 0.8


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="lr must be > 0; got 0"):
        losses.actdiff_discriminator(lr=0.0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="update_every must be an integer >= 1"):
            losses.actdiff_discriminator(update_every=bad)
    for bad in ((), (4, 0), (2.5,)):
        with pytest.raises(ValueError, match="hidden must be a non-empty sequence of positive integers"):
            losses.actdiff_discriminator(hidden=bad)
    with pytest.raises(ValueError, match=r"layer must be one of \('pooled', 'feature_map', 'logits'\); got 'fc'"):
        losses.actdiff_discriminator(layer="fc")
    with pytest.raises(ValueError, match=r"optimizer updates every \[2, 3\] steps"):
        losses.combine(losses.actdiff_discriminator(update_every=2), losses.actdiff_discriminator(update_every=3, name="d2"))
    params = make_conv_params(jax.random.key(0))
    batch = make_batch(jax.random.key(1))
    loss = losses.for_method("actdiff_discriminator", hidden=(4,))
    with pytest.raises(ValueError, match="'actdiff_discriminator' keeps state between steps: call loss"):
        loss(bound_conv_classifier(params), batch, key=KEY)
    with pytest.raises(ValueError, match="draws random numbers"):
        loss(bound_conv_classifier(params), batch, term_state=loss.init_state(bound_conv_classifier(params), batch["image"], key=KEY))
    with pytest.raises(ValueError, match=r"images must have shape \(B, H, W, C\); got \(6, 6\)"):
        loss.init_state(bound_conv_classifier(params), jnp.zeros((6, 6)), key=KEY)
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(4, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="images must be given"):
        train.init_train_state(model, optax.sgd(0.1), loss=loss)
    model_def, plain = train.init_train_state(model, optax.sgd(0.1))
    with pytest.raises(ValueError, match="state.loss_state is None"):
        train.make_train_step(model_def, loss, optax.sgd(0.1))(plain, _toy(4))


# --- parity with PyTorch ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_matches_pytorch_spectral_norm_bce_and_adam(x64, tmp_path):
    """Three steps of the game against PyTorch's own modules (the authors' construction) and the baseline mirror."""
    from baselines.torch import bridge

    try:
        python = bridge.torch_python()
    except RuntimeError as error:
        pytest.skip(str(error))
    lam, lr, steps = 2.0, 1e-2, 3
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, _state(jax.random.key(0), lr=lr))
    zs = jax.random.normal(jax.random.key(1), (steps, 4, 5), jnp.float64)
    z_ts = jax.random.normal(jax.random.key(2), (steps, 4, 5), jnp.float64) + 0.5
    arrays = {"zs": zs, "z_ts": z_ts}
    arrays.update({f"params/{k}/{n}": v for k, layer in state["params"].items() for n, v in layer.items()})
    arrays.update({f"u/{k}": v for k, v in state["u"].items()})
    np.savez(tmp_path / "in.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    values, grads_z, grads_t = [], [], []
    for i in range(steps):
        (value, state), (g_z, g_t) = jax.value_and_grad(
            lambda a, b, s=state: adversarial.discriminator_step(s, a, b, jnp.ones(4), lam=lam, lr=lr), (0, 1),
            has_aux=True)(zs[i], z_ts[i])
        values.append(value), grads_z.append(g_z), grads_t.append(g_t)
    subprocess.run([python, str(HERE / "torch_discriminator_side.py"), str(tmp_path), str(lam), str(lr), str(steps)],
                   check=True, cwd=bridge.REPO_ROOT, env=bridge.torch_env(), stdout=sys.stderr)
    for route in ("reference", "mirror"):
        out = np.load(tmp_path / f"{route}.npz")
        np.testing.assert_allclose(out["values"], np.asarray(values), rtol=1e-10, err_msg=route)
        np.testing.assert_allclose(out["grads_z"], np.asarray(grads_z), rtol=1e-8, atol=1e-14, err_msg=route)
        np.testing.assert_allclose(out["grads_t"], np.asarray(grads_t), rtol=1e-8, atol=1e-14, err_msg=route)
        for k, layer in state["params"].items():
            for n, v in layer.items():
                np.testing.assert_allclose(out[f"params/{k}/{n}"], v, rtol=1e-8, atol=1e-14, err_msg=f"{route} {k}/{n}")
        for k, v in state["u"].items():
            np.testing.assert_allclose(out[f"u/{k}"], v, rtol=1e-8, err_msg=f"{route} u/{k}")


@pytest.mark.slow  # ~8 s on 2 cores
def test_checkpoint_round_trip_keeps_the_discriminator(tmp_path):
    from saljax import checkpoint

    loss = losses.for_method("actdiff_discriminator", hidden=(4,), update_every=2)
    optimizer = optax.adam(1e-2)
    data, model, model_def, state = _setup(loss, optimizer)
    state, _ = train.make_train_step(model_def, loss, optimizer)(state, data)
    saved = jax.device_get(state)
    with checkpoint.Checkpointer(tmp_path, best_metric="", async_save=False) as ck:
        ck.save(1, state)
    fresh = _setup(loss, optimizer)[3]
    with checkpoint.Checkpointer(tmp_path, best_metric="") as ck:
        step, restored = ck.restore(fresh)
    assert step == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(restored), saved)


def test_a_config_with_the_discriminator_restores_into_the_state_training_saved():
    # load_model and resume build their restore target with init_from_config: it must hold the
    # discriminator's state, or the checkpoints of such a run could never be read back.
    from saljax import config as config_lib

    c = config_lib.load(str(Path(__file__).resolve().parents[2] / "experiments/configs/red_herring_cpu.py:actdiff_discriminator"),
                        ["model.num_classes=2", "model.in_channels=1", "model.input_size=(12, 12)",
                         "model.kwargs={'width': 2, 'stem': 'cifar'}", "loss.hidden=(4,)"])
    _, state = train.init_from_config(c)
    disc = state.loss_state["actdiff_discriminator"]
    assert disc["params"]["out"]["kernel"].shape == (4, 1)
    del c.model["input_size"]
    with pytest.raises(ValueError, match="model.input_size must be set"):
        train.init_from_config(c)
