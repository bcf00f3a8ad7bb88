"""The state of a training run: a Flax NNX model split into a static definition and pytrees.

The model is split once into a static definition (`ModelDef`) and three pytrees (parameters,
BatchNorm statistics, optimizer state) held in a `TrainState`; the steps are pure functions of
that state and a batch, so `jax.jit` compiles each once and the training loop owns all state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from saljax import models

__all__ = ["ModelDef", "TrainState", "init_train_state", "merge"]


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


def _split(model: nnx.Module, *, train: bool) -> tuple[Any, ...]:
    # raise_if_not_found=False: models without BatchNorm (an MLP) have no use_running_average.
    return nnx.split(models.in_mode(model, train=train), nnx.Param, ...)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[ModelDef, TrainState]:
    """Splits `model` into its definition and a fresh `TrainState` (step 0)."""
    train_def, params, model_state = _split(model, train=True)
    eval_def = _split(model, train=False)[0]
    state = TrainState(jnp.zeros((), jnp.int32), params, model_state, optimizer.init(params))
    return ModelDef(train_def, eval_def), state


def merge(model_def: ModelDef, state: TrainState, *, train: bool = False) -> nnx.Module:
    """The NNX module that `state` describes (a copy), in train or eval mode."""
    return nnx.merge(model_def.train if train else model_def.eval, state.params, state.model_state, copy=True)
