"""`saljax.train.make_optimizer`: each optimizer and schedule against optax's own, and its errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from saljax import config as config_lib
from saljax.train import make_optimizer, make_schedule

PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
GRADS = [{"w": jnp.array([0.3, -0.1, 0.2]), "b": jnp.array([-0.4])},
         {"w": jnp.array([-0.2, 0.5, 0.1]), "b": jnp.array([0.3])},
         {"w": jnp.array([0.1, 0.1, -0.6]), "b": jnp.array([0.2])}]


def _opt(**fields):
    c = config_lib.defaults().optimizer
    c.update(fields)
    return c


def _run(optimizer, grads_fn=lambda g, p: g):
    params, state = PARAMS, optimizer.init(PARAMS)
    for g in GRADS:
        updates, state = optimizer.update(grads_fn(g, params), state, params)
        params = optax.apply_updates(params, updates)
    return params


def _assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


@pytest.mark.parametrize("fields, reference", [
    ({"name": "adam"}, optax.adam(0.1)),
    ({"name": "adamw", "weight_decay": 0.01}, optax.adamw(0.1, weight_decay=0.01)),
    ({"name": "sgd", "momentum": 0.0}, optax.sgd(0.1)),
    ({"name": "sgd", "momentum": 0.9, "nesterov": True}, optax.sgd(0.1, momentum=0.9, nesterov=True)),
    ({"name": "lamb", "weight_decay": 0.01}, optax.lamb(0.1, weight_decay=0.01)),
    ({"name": "lars", "weight_decay": 0.01, "momentum": 0.8}, optax.lars(0.1, weight_decay=0.01, momentum=0.8)),
])
def test_each_optimizer_is_optax_s_own(fields, reference):
    _assert_same(_run(make_optimizer(_opt(learning_rate=0.1, **fields))), _run(reference))


@pytest.mark.parametrize("name, reference", [("adam", optax.adam(0.1)), ("sgd", optax.sgd(0.1, momentum=0.9))])
def test_adam_and_sgd_weight_decay_is_l2_on_the_gradient(name, reference):
    # PyTorch's weight_decay: grad + wd * param enters the optimizer.
    ours = _run(make_optimizer(_opt(name=name, learning_rate=0.1, weight_decay=0.05)))
    _assert_same(ours, _run(reference, lambda g, p: jax.tree.map(lambda gi, pi: gi + 0.05 * pi, g, p)))


def test_clip_norm_clips_the_global_gradient_norm_first():
    opt = make_optimizer(_opt(name="sgd", momentum=0.0, learning_rate=1.0, clip_norm=0.5))
    grads = {"w": jnp.array([3.0, 4.0, 0.0]), "b": jnp.array([0.0])}
    updates, _ = opt.update(grads, opt.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["w"], [-0.3, -0.4, 0.0], rtol=1e-6)
    small = {"w": jnp.array([0.03, 0.04, 0.0]), "b": jnp.array([0.0])}
    np.testing.assert_allclose(opt.update(small, opt.init(PARAMS), PARAMS)[0]["w"], [-0.03, -0.04, 0.0], rtol=1e-6)


def test_schedules():
    assert make_schedule(_opt(learning_rate=0.2)) == 0.2
    step = make_schedule(_opt(learning_rate=1.0, schedule="step", decay_every=10, decay_factor=0.5))
    np.testing.assert_allclose([step(0), step(9), step(10), step(25)], [1.0, 1.0, 0.5, 0.25])
    cosine = make_schedule(_opt(learning_rate=1.0, schedule="cosine", end_factor=0.1), num_steps=100)
    np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [1.0, 0.55, 0.1], rtol=1e-6)
    reference = optax.cosine_decay_schedule(1.0, 40, alpha=0.1)
    ours = make_schedule(_opt(learning_rate=1.0, schedule="cosine", end_factor=0.1, decay_steps=40), num_steps=100)
    np.testing.assert_allclose([ours(s) for s in range(0, 50, 7)], [reference(s) for s in range(0, 50, 7)])
    warm = make_schedule(_opt(learning_rate=2.0, schedule="warmup_cosine", warmup_steps=10), num_steps=110)
    np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(60), warm(110)], [0.0, 1.0, 2.0, 1.0, 0.0], atol=1e-6)


def test_a_config_without_schedule_field_reads_decay_every_as_the_step_schedule():
    old = ml_collections.ConfigDict({"name": "sgd", "learning_rate": 1.0, "momentum": 0.9, "weight_decay": 0.0,
                                     "decay_every": 10, "decay_factor": 0.1})
    lr = make_schedule(old)
    np.testing.assert_allclose([lr(9), lr(10)], [1.0, 0.1])
    make_optimizer(old)  # and builds


@pytest.mark.parametrize("fields, message", [
    ({"name": "adamx"}, r"optimizer.name must be one of adam \| adamw \| sgd \| lamb \| lars; got 'adamx'"),
    ({"schedule": "linear"}, r"optimizer.schedule must be one of constant \| step \| cosine \| warmup_cosine; got 'linear'"),
    ({"decay_every": 5}, "optimizer.decay_every is set but optimizer.schedule is 'constant'"),
    ({"schedule": "step"}, "optimizer.schedule='step' needs optimizer.decay_every >= 1"),
    ({"schedule": "warmup_cosine", "warmup_steps": 100}, r"warmup_steps \(100\) must be smaller"),
    ({"clip_norm": -1.0}, "optimizer.clip_norm must be a non-negative float"),
    ({"weight_decay": -0.1}, "optimizer.weight_decay must be a non-negative float"),
    ({"name": "sgd", "momentum": 0.0, "nesterov": True}, "optimizer.nesterov needs optimizer.momentum > 0"),
])
def test_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(_opt(**fields), num_steps=100)
