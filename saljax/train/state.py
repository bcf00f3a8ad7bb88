"""The state of a training run: a Flax NNX model split into a static definition and pytrees.

The model is split once into a static definition (`ModelDef`) and pytrees (parameters, BatchNorm
statistics, optimizer state, and the state of loss terms that keep one) held in a `TrainState`; the steps are pure functions of
that state and a batch, so `jax.jit` compiles each once and the training loop owns all state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from saljax import classifier, models

__all__ = ["ModelDef", "TrainState", "init_train_state", "merge", "with_loss_state"]


class ModelDef(NamedTuple):
    """The static halves of a model: its graph in train mode and in eval mode."""

    train: nnx.GraphDef
    eval: nnx.GraphDef


class TrainState(NamedTuple):
    """Everything a training run updates: a pytree, so it can be jitted, sharded and saved."""

    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of nnx.Param
    model_state: Any  # nnx.State of everything else (BatchNorm statistics)
    opt_state: Any  # optax state
    loss_state: Any = None  # {term name: state} of the loss terms that keep state (`Loss.init_state`), or None


def _split(model: nnx.Module, *, train: bool) -> tuple[Any, ...]:
    # raise_if_not_found=False: models without BatchNorm (an MLP) have no use_running_average.
    return nnx.split(models.in_mode(model, train=train), nnx.Param, ...)


def init_train_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    loss: Any = None,
    images: Any = None,
    key: jax.Array | None = None,
) -> tuple[ModelDef, TrainState]:
    """Splits `model` into its definition and a fresh `TrainState` (step 0).

    With a `loss` whose terms keep state (`loss.needs_state`, e.g. ActDiff's discriminator),
    `loss_state` is `loss.init_state(...)` for batches of `images` (an array or
    `jax.ShapeDtypeStruct` (B, H, W, C); only its shape is used), drawn from `key` (default
    `jax.random.key(0)`).
    """
    train_def, params, model_state = _split(model, train=True)
    eval_def = _split(model, train=False)[0]
    model_def = ModelDef(train_def, eval_def)
    state = TrainState(jnp.zeros((), jnp.int32), params, model_state, optimizer.init(params))
    if loss is not None and getattr(loss, "needs_state", False):
        state = with_loss_state(model_def, state, loss, images, key=key)
    return model_def, state


def with_loss_state(model_def: ModelDef, state: TrainState, loss: Any, images: Any, *,
                    key: jax.Array | None = None) -> TrainState:
    """`state` with `loss_state = loss.init_state(...)`: the initial states of the loss's stateful terms.

    `images`: an array or `jax.ShapeDtypeStruct` (B, H, W, C) of the training batches (only the
    shape is used); `key` defaults to `jax.random.key(0)`.
    """
    if images is None:
        raise ValueError("images must be given (an array or jax.ShapeDtypeStruct (B, H, W, C)): the loss has terms"
                         " that keep state, whose shapes depend on the model's activations")
    clf = classifier.from_nnx(model_def.train, state.params, state.model_state)
    return state._replace(loss_state=loss.init_state(clf, images, key=jax.random.key(0) if key is None else key))


def merge(model_def: ModelDef, state: TrainState, *, train: bool = False) -> nnx.Module:
    """The NNX module that `state` describes (a copy), in train or eval mode."""
    return nnx.merge(model_def.train if train else model_def.eval, state.params, state.model_state, copy=True)
