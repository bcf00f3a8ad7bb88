"""Jit-compiled train and eval steps for saliency-guided losses on Flax NNX models.

    model_def, state = init_train_state(model, optimizer)
    train_step = make_train_step(model_def, losses.for_method("gradmask", lam=1.0), optimizer)
    eval_step = make_eval_step(model_def)
    state, metrics = train_step(state, batch)

The train step runs the model in train mode (batch statistics, updated once per step: the loss
makes one forward pass), the eval step in eval mode (running statistics).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from saljax import batch as batch_lib
from saljax import classifier, losses, metrics, parallel, saliency
from saljax.train.state import ModelDef, TrainState, merge

__all__ = ["eval_step_fn", "evaluate", "make_eval_step", "make_train_step", "train_step_fn"]

Batch = batch_lib.Batch


def _jit(fn: Callable, mesh: Mesh | None, *, jit: bool, state_in: bool = True, donate: bool = False,
         replicate_out: bool = True) -> Callable:
    """`jax.jit` with the data-parallel shardings: state replicated, batch split over "data"."""
    if not jit:
        return fn
    kwargs: dict[str, Any] = {"donate_argnums": 0} if donate else {}
    if mesh is not None:
        rep, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        kwargs["in_shardings"] = (rep, split) if state_in else (split,)
        kwargs["out_shardings"] = rep if replicate_out else None
    return jax.jit(fn, **kwargs)


def _key_kwargs(loss: Callable[..., Any], key: jax.Array | None, step: jax.Array | int) -> dict[str, Any]:
    """`{"key": fold_in(key, step)}` for a loss that takes a PRNG key (terms that draw random numbers)."""
    try:
        takes_key = "key" in inspect.signature(loss).parameters
    except (TypeError, ValueError):  # no signature to read
        takes_key = False
    if not takes_key:
        return {}
    base = jax.random.key(0) if key is None else key
    return {"key": jax.random.fold_in(base, step)}


def train_step_fn(model_def: ModelDef, loss: losses.Loss, optimizer: optax.GradientTransformation, state: TrainState,
                  batch: Batch, key: jax.Array | None) -> tuple[TrainState, dict[str, jax.Array]]:
    """The body of `make_train_step`'s step, unjitted, with the PRNG `key` an argument (so it can be vmapped)."""
    stateful = bool(getattr(loss, "needs_state", False))
    every = int(getattr(loss, "update_every", 1))
    key_kwargs = _key_kwargs(loss, key, state.step)
    if stateful:
        if state.loss_state is None:
            raise ValueError("the loss has terms that keep state but state.loss_state is None: build the state with"
                             " init_train_state(model, optimizer, loss=loss, images=...)")
        key_kwargs["term_state"] = state.loss_state

    def loss_of(params: Any) -> tuple[jax.Array, Any]:
        return loss(classifier.from_nnx(model_def.train, params, state.model_state), batch, **key_kwargs)

    (value, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    extra: dict[str, jax.Array] = {}
    if every > 1:
        # The gradients of the steps in between are dropped, not accumulated (ActDiff's discriminator).
        apply = (state.step + 1) % every == 0
        params = jax.tree.map(lambda new, old: jnp.where(apply, new, old), params, state.params)
        opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old), opt_state, state.opt_state)
        extra["updated"] = apply.astype(jnp.float32)
    loss_state = state.loss_state
    if stateful:
        loss_state = aux.term_state
        for name, term_state in aux.term_state.items():
            metrics_of = term_state.get("metrics", {}) if isinstance(term_state, dict) else {}
            extra.update({f"loss/{name}/{k}": v for k, v in metrics_of.items()})
    labels = jnp.asarray(batch[batch_lib.LABEL])
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    out = {
        "loss": value,
        "accuracy": jnp.mean(jnp.argmax(aux.logits, -1) == labels),
        "grad_norm": grad_norm,
        "finite": jnp.isfinite(value) & jnp.isfinite(grad_norm),
        **{f"loss/{name}": v for name, v in aux.terms.items()},
        **extra,
    }
    model_state = aux.state if aux.state is not None else state.model_state
    return TrainState(state.step + 1, params, model_state, opt_state, loss_state), out


def make_train_step(
    model_def: ModelDef,
    loss: losses.Loss,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    jit: bool = True,
    key: jax.Array | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One optimisation step: `(state, batch) -> (new_state, metrics)`.

    `metrics` holds the total loss, each term's unweighted value (`loss/<name>`), the batch
    accuracy, the global norm of the gradient and `finite` (loss and gradient free of NaN/inf).
    With a `mesh`, the batch is split over its "data" axis and the state replicated: one program
    for any number of devices and hosts (see `saljax.parallel`). A loss that takes a PRNG `key`
    gets `fold_in(key, state.step)` (default key: `jax.random.key(0)`), so a resumed run draws the
    same numbers as an uninterrupted one.

    A loss with terms that keep state (`loss.needs_state`) reads and updates `state.loss_state`
    (build the state with `init_train_state(..., loss=loss, images=...)`); their metrics appear as
    `loss/<term>/<metric>`. A loss with `update_every = k > 1` applies the optimizer's update to
    the parameters on steps k, 2k, ... only (`state.step + 1` divisible by k); the other steps
    leave parameters and optimizer state as they were and report `updated` 0.
    """

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        return train_step_fn(model_def, loss, optimizer, state, batch, key)

    return _jit(step, mesh, jit=jit, donate=True)


def eval_step_fn(model_def: ModelDef, loss: losses.Loss | None, state: TrainState, batch: Batch,
                 key: jax.Array | None) -> dict[str, jax.Array]:
    """The body of `make_eval_step`'s step, unjitted, with the PRNG `key` an argument (so it can be vmapped)."""
    model = merge(model_def, state)
    images = jnp.asarray(batch[batch_lib.IMAGE])
    labels = jnp.asarray(batch[batch_lib.LABEL])
    batch_lib.check_batch(batch, map_sizes=[(images.shape[1], images.shape[2])] if batch_lib.SALIENCY_MAP in batch else None)
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
    if loss is not None:
        clf = classifier.from_nnx(model_def.eval, state.params, state.model_state)
        kwargs = _key_kwargs(loss, key, 0)
        if getattr(loss, "needs_state", False):
            # Stateful terms evaluate against the current state; their update is dropped.
            kwargs["term_state"] = state.loss_state
        _, aux = loss(clf, batch, **kwargs)
        # CE is reported per sample above; penalties skip samples with has_map = 0 (padding).
        out.update({f"loss/{k}": jnp.full(labels.shape, v) for k, v in aux.terms.items() if k != "ce"})
    return out


def make_eval_step(
    model_def: ModelDef, *, loss: losses.Loss | None = None, mesh: Mesh | None = None, jit: bool = True,
    key: jax.Array | None = None,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Per-sample evaluation outputs of a batch, in eval mode: `(state, batch) -> dict`.

    Returns arrays of shape (B,): `logits` (B, K), `ce`, `correct`, and, when the batch carries
    maps, `saliency_inside`: the fraction of the input-gradient energy of the true-class logit that
    falls inside the map (`metrics.fraction_inside`), with `has_map` to select the samples. With a
    `loss`, each of its terms on the batch in eval mode (`loss/<name>`, the batch value repeated
    per sample so that averaging weighs batches by size; a loss that takes a PRNG key gets the
    same `key` for every batch, default `jax.random.key(0)`). Aggregate with `metrics.summarize`.
    """

    def step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        return eval_step_fn(model_def, loss, state, batch, key)

    return _jit(step, mesh, jit=jit)


def evaluate(
    eval_step: Callable[[TrainState, Batch], Mapping[str, jax.Array]], state: TrainState, batches: Iterable[Batch]
) -> dict[str, float]:
    """Runs `eval_step` over an iterable of batches and aggregates with `metrics.summarize`."""
    outputs = [jax.device_get(eval_step(state, b)) | {"label": b[batch_lib.LABEL]} for b in batches]
    return metrics.summarize(outputs)
