"""Train/eval steps, metrics, and the `saljax` command line."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import forward
from flax import nnx

import saljax
from saljax import cli, demo, losses, metrics, models, train


def _toy(n=64, seed=0):
    return demo.toy_decoy_set(n, seed=seed, decoy_follows_label=True)


def test_train_step_lowers_the_loss():
    data = _toy()
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(8, 8, 8, 8), rngs=nnx.Rngs(0))
    optimizer = optax.adam(1e-2)
    model_def, state = train.init_train_state(model, optimizer)
    step = train.make_train_step(model_def, losses.for_method("gradmask", lam=1.0, reduction="mean"), optimizer)
    state, first = step(state, data)
    values = [float(first["loss"])]
    for _ in range(15):
        state, out = step(state, data)
        values.append(float(out["loss"]))
    assert int(state.step) == 16
    assert values[-1] < 0.5 * values[0]
    assert set(out) == {"loss", "loss/ce", "loss/gradmask", "accuracy", "grad_norm", "finite"}
    assert bool(out["finite"])


@pytest.mark.slow  # ~6 s on 2 cores
def test_train_step_statistics_match_a_single_forward_pass():
    data = _toy(16)
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(4, 4), rngs=nnx.Rngs(1))
    optimizer = optax.sgd(0.0)
    model_def, state = train.init_train_state(model, optimizer)
    once = train.merge(model_def, state, train=True)
    forward(once, jnp.asarray(data["image"]))
    expected = nnx.split(once, nnx.Param, ...)[2]
    state, _ = train.make_train_step(model_def, losses.for_method("rrr"), optimizer)(state, data)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.model_state, expected)


@pytest.mark.slow  # ~5 s on 2 cores
def test_eval_step_and_summary():
    data = _toy(32)
    model = models.SimpleCNN(num_classes=2, in_channels=1, channels=(4, 4), rngs=nnx.Rngs(0))
    model_def, state = train.init_train_state(model, optax.sgd(0.1))
    eval_step = train.make_eval_step(model_def)
    batches = [{k: v[:20] for k, v in data.items()}, {k: v[20:] for k, v in data.items()}]
    summary = train.evaluate(eval_step, state, batches)
    assert summary["count"] == 32
    logits = np.concatenate([np.asarray(eval_step(state, b)["logits"]) for b in batches])
    np.testing.assert_allclose(summary["accuracy"], np.mean(logits.argmax(-1) == data["label"]))
    assert 0.0 <= summary["saliency_inside"] <= 1.0 and 0.0 <= summary["roc_auc"] <= 1.0
    # eval mode: a sample's logits do not depend on the rest of its batch.
    single = eval_step(state, {k: v[:1] for k, v in data.items()})["logits"]
    np.testing.assert_allclose(single[0], logits[0], rtol=1e-5, atol=1e-6)


def test_fraction_inside_and_roc_auc_on_known_answers():
    s = jnp.array([[[1.0, 3.0], [0.0, 4.0]]])
    h = jnp.array([[[1.0, 0.0], [1.0, 0.5]]])
    np.testing.assert_allclose(metrics.fraction_inside(s, h), [(1.0 + 2.0) / 8.0])
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert metrics.roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count one half
    assert metrics.roc_auc([1.0, 2.0], [0, 1]) == 1.0
    assert np.isnan(metrics.roc_auc([1.0, 2.0], [1, 1]))
    with pytest.raises(ValueError, match="must have the same shape"):
        metrics.fraction_inside(s, h[:, :1])
    with pytest.raises(ValueError, match=r"scores and labels must both have shape \(N,\)"):
        metrics.roc_auc([0.1, 0.2], [0, 1, 1])


@pytest.mark.slow  # the demo command end to end: two trainings
def test_cli_demo_prints_the_table(capsys):
    assert cli.main(["demo", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "| CE |" in out and "| GradMask (lam=10) |" in out and "saliency inside map" in out


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["demo", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])


def test_version():
    assert isinstance(saljax.__version__, str) and saljax.__version__.count(".") == 2
