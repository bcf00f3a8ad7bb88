"""Jit-compiled train and eval steps for saliency-guided losses on Flax NNX models.

The model is split once into a static definition and three pytrees (parameters, BatchNorm
statistics, optimizer state) held in a `TrainState`; the steps are pure functions of that state
and a batch, so `jax.jit` compiles each once and the training loop owns all state.

    model_def, state = init_train_state(model, optimizer)
    train_step = make_train_step(model_def, losses.for_method("gradmask", lam=1.0), optimizer)
    eval_step = make_eval_step(model_def)
    state, metrics = train_step(state, batch)

The train step runs the model in train mode (batch statistics, updated once per step: the loss
makes one forward pass), the eval step in eval mode (running statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from saljax import batch as batch_lib
from saljax import classifier, losses, metrics, saliency

Array = Any
Batch = batch_lib.Batch


class ModelDef(NamedTuple):
    """The static halves of a model: its graph in train mode and in eval mode."""

    train: nnx.GraphDef
    eval: nnx.GraphDef


class TrainState(NamedTuple):
    """Everything a training run updates: a pytree, so it can be jitted, sharded and saved."""

    step: Array  # int32 scalar
    params: Any  # nnx.State of nnx.Param
    model_state: Any  # nnx.State of everything else (BatchNorm statistics)
    opt_state: Any  # optax state


def _split(model: nnx.Module, *, train: bool):
    return nnx.split(nnx.view(model, use_running_average=not train), nnx.Param, ...)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[ModelDef, TrainState]:
    """Splits `model` into its definition and a fresh `TrainState` (step 0)."""
    train_def, params, model_state = _split(model, train=True)
    eval_def = _split(model, train=False)[0]
    state = TrainState(jnp.zeros((), jnp.int32), params, model_state, optimizer.init(params))
    return ModelDef(train_def, eval_def), state


def merge(model_def: ModelDef, state: TrainState, *, train: bool = False) -> nnx.Module:
    """The NNX module that `state` describes (a copy), in train or eval mode."""
    return nnx.merge(model_def.train if train else model_def.eval, state.params, state.model_state, copy=True)


def make_train_step(
    model_def: ModelDef,
    loss: losses.Loss,
    optimizer: optax.GradientTransformation,
    *,
    jit: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """One optimisation step: `(state, batch) -> (new_state, metrics)`.

    `metrics` holds the total loss, each term's unweighted value (`loss/<name>`), the batch
    accuracy and the global norm of the gradient.
    """

    def step(state: TrainState, batch: Batch):
        def loss_of(params):
            return loss(classifier.from_nnx(model_def.train, params, state.model_state), batch)

        (value, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        labels = jnp.asarray(batch[batch_lib.LABEL])
        out = {
            "loss": value,
            "accuracy": jnp.mean(jnp.argmax(aux.logits, -1) == labels),
            "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
            **{f"loss/{name}": v for name, v in aux.terms.items()},
        }
        model_state = aux.state if aux.state is not None else state.model_state
        return TrainState(state.step + 1, params, model_state, opt_state), out

    return jax.jit(step, donate_argnums=0) if jit else step


def make_eval_step(
    model_def: ModelDef, *, jit: bool = True
) -> Callable[[TrainState, Batch], dict[str, Array]]:
    """Per-sample evaluation outputs of a batch, in eval mode: `(state, batch) -> dict`.

    Returns arrays of shape (B,): `logits` (B, K), `ce`, `correct`, and, when the batch carries
    maps, `saliency_inside`: the fraction of the input-gradient energy of the true-class logit that
    falls inside the map (`metrics.fraction_inside`), with `has_map` to select the samples.
    Aggregate with `metrics.summarize`.
    """

    def step(state: TrainState, batch: Batch):
        model = merge(model_def, state)
        images = jnp.asarray(batch[batch_lib.IMAGE])
        labels = jnp.asarray(batch[batch_lib.LABEL])
        batch_lib.check_batch(batch, map_sizes=[images.shape[1:3]] if batch_lib.SALIENCY_MAP in batch else None)
        grads, logits = saliency.input_gradient(model, images, labels)
        out = {
            "logits": logits,
            "ce": -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0],
            "correct": jnp.argmax(logits, -1) == labels,
        }
        if batch_lib.SALIENCY_MAP in batch:
            energy = jnp.sum(grads.astype(jnp.float32) ** 2, axis=-1)
            out["saliency_inside"] = metrics.fraction_inside(energy, jnp.asarray(batch[batch_lib.SALIENCY_MAP]))
            out["has_map"] = batch_lib.map_weights(batch) > 0
        return out

    return jax.jit(step) if jit else step


def evaluate(
    eval_step: Callable[[TrainState, Batch], Mapping[str, Array]], state: TrainState, batches
) -> dict[str, float]:
    """Runs `eval_step` over an iterable of batches and aggregates with `metrics.summarize`."""
    outputs = [jax.device_get(eval_step(state, b)) | {"label": b[batch_lib.LABEL]} for b in batches]
    return metrics.summarize(outputs)
