"""Losses that draw random numbers get a PRNG key per step: fold_in(key, step), the same after a resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from saljax import demo, losses, models, train


def _keyed_loss():
    ce = losses.for_method("ce")

    def loss(classifier, batch, *, key=None):
        value, aux = ce(classifier, batch)
        draw = jax.random.uniform(key, ())
        return value + 0.0 * draw, losses.LossAux({**aux.terms, "draw": draw}, aux.logits, aux.state)

    return loss


@pytest.mark.slow  # ~4 s on 2 cores
def test_a_loss_that_takes_a_key_gets_fold_in_key_step():
    data = demo.toy_decoy_set(8, seed=0, decoy_follows_label=True)
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(4, 4), rngs=nnx.Rngs(0))
    optimizer = optax.sgd(0.1)
    model_def, state = train.init_train_state(model, optimizer)
    base = jax.random.key(3)
    step = train.make_train_step(model_def, _keyed_loss(), optimizer, key=base)
    draws = []
    for i in range(3):
        state, out = step(state, data)
        draws.append(float(out["loss/draw"]))
        np.testing.assert_allclose(draws[-1], jax.random.uniform(jax.random.fold_in(base, i), ()), rtol=1e-6)
    assert len(set(draws)) == 3
    eval_step = train.make_eval_step(model_def, loss=_keyed_loss(), key=base)
    out = eval_step(state, data)
    np.testing.assert_allclose(out["loss/draw"], jnp.full(8, jax.random.uniform(jax.random.fold_in(base, 0), ())))
