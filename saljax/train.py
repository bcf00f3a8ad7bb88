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

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from saljax import batch as batch_lib
from saljax import classifier, losses, metrics, parallel, saliency

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


def make_train_step(
    model_def: ModelDef,
    loss: losses.Loss,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """One optimisation step: `(state, batch) -> (new_state, metrics)`.

    `metrics` holds the total loss, each term's unweighted value (`loss/<name>`), the batch
    accuracy, the global norm of the gradient and `finite` (loss and gradient free of NaN/inf).
    With a `mesh`, the batch is split over its "data" axis and the state replicated: one program
    for any number of devices and hosts (see `saljax.parallel`).
    """

    def step(state: TrainState, batch: Batch):
        def loss_of(params):
            return loss(classifier.from_nnx(model_def.train, params, state.model_state), batch)

        (value, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        labels = jnp.asarray(batch[batch_lib.LABEL])
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        out = {
            "loss": value,
            "accuracy": jnp.mean(jnp.argmax(aux.logits, -1) == labels),
            "grad_norm": grad_norm,
            "finite": jnp.isfinite(value) & jnp.isfinite(grad_norm),
            **{f"loss/{name}": v for name, v in aux.terms.items()},
        }
        model_state = aux.state if aux.state is not None else state.model_state
        return TrainState(state.step + 1, params, model_state, opt_state), out

    return _jit(step, mesh, jit=jit, donate=True)


def make_eval_step(
    model_def: ModelDef, *, loss: losses.Loss | None = None, mesh: Mesh | None = None, jit: bool = True
) -> Callable[[TrainState, Batch], dict[str, Array]]:
    """Per-sample evaluation outputs of a batch, in eval mode: `(state, batch) -> dict`.

    Returns arrays of shape (B,): `logits` (B, K), `ce`, `correct`, and, when the batch carries
    maps, `saliency_inside`: the fraction of the input-gradient energy of the true-class logit that
    falls inside the map (`metrics.fraction_inside`), with `has_map` to select the samples. With a
    `loss`, each of its terms on the batch in eval mode (`loss/<name>`, the batch value repeated
    per sample so that averaging weighs batches by size). Aggregate with `metrics.summarize`.
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
        if loss is not None:
            _, aux = loss(classifier.from_nnx(model_def.eval, state.params, state.model_state), batch)
            # CE is reported per sample above; penalties skip samples with has_map = 0 (padding).
            out.update({f"loss/{k}": jnp.full(labels.shape, v) for k, v in aux.terms.items() if k != "ce"})
        return out

    return _jit(step, mesh, jit=jit)


def evaluate(
    eval_step: Callable[[TrainState, Batch], Mapping[str, Array]], state: TrainState, batches
) -> dict[str, float]:
    """Runs `eval_step` over an iterable of batches and aggregates with `metrics.summarize`."""
    outputs = [jax.device_get(eval_step(state, b)) | {"label": b[batch_lib.LABEL]} for b in batches]
    return metrics.summarize(outputs)


# --- the training loop ----------------------------------------------------------------------------


def make_optimizer(config) -> optax.GradientTransformation:
    """The optimizer of `config.optimizer` (adam | sgd, optional L2 weight decay and step decay)."""
    name = config.name
    if config.decay_every:
        lr = optax.exponential_decay(config.learning_rate, config.decay_every, config.decay_factor, staircase=True)
    else:
        lr = config.learning_rate
    if name == "adam":
        opt = optax.adam(lr)
    elif name == "sgd":
        opt = optax.sgd(lr, momentum=config.momentum or None)
    else:
        raise ValueError(f"optimizer.name must be 'adam' or 'sgd'; got {name!r}")
    if config.weight_decay:
        # L2 added to the gradient before the update, as PyTorch's `weight_decay` argument does.
        opt = optax.chain(optax.add_decayed_weights(config.weight_decay), opt)
    return opt


def init_from_config(config) -> tuple[ModelDef, TrainState]:
    """The model definition and a fresh state (step 0) that `config` describes.

    `config.model.num_classes` and `config.model.in_channels` must be set (training fills them in
    from the dataset before writing config.json).
    """
    from saljax import models

    m = config.model
    if m.num_classes is None or m.in_channels is None:
        raise ValueError("config.model.num_classes and config.model.in_channels must be set")
    model = models.create(m.name, num_classes=m.num_classes, in_channels=m.in_channels,
                          rngs=nnx.Rngs(config.seed), dtype=jnp.dtype(m.dtype), **m.kwargs)
    return init_train_state(model, make_optimizer(config.optimizer))


def _eval_batches(builder, split: str, config, mesh: Mesh):
    """Fixed-size, padded batches of a whole split, the same count on every process.

    Padding keeps one compiled shape and lets every process join every collective; `valid` marks
    the real samples.
    """
    import math

    from saljax import data

    processes = jax.process_count()
    local = config.eval_batch_size // processes
    total = builder.info.splits[split].num_examples
    per_process = math.ceil(total / processes)
    loader = data.make_loader(builder, split, local, shuffle=False, num_epochs=1, drop_remainder=False,
                              mean=config.dataset.mean, std=config.dataset.std)
    it = iter(loader)
    template = None
    for _ in range(math.ceil(per_process / local)):
        batch = next(it, None)
        if batch is None:
            batch = {k: np.zeros_like(v[:0]) for k, v in template.items()}
        template = batch
        n = len(batch["label"])
        padded = {k: np.concatenate([v, np.zeros((local - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        padded["valid"] = np.arange(local) < n
        padded["has_map"] = padded["has_map"] & padded["valid"]
        yield parallel.shard_batch(padded, mesh)


def _evaluate_split(eval_step, state, builder, split, config, mesh) -> dict[str, float]:
    outputs = []
    for batch in _eval_batches(builder, split, config, mesh):
        out = jax.device_get(eval_step(state, {k: v for k, v in batch.items() if k != "valid"}))
        outputs.append(out | {"label": np.asarray(jax.device_get(batch["label"])), "valid": jax.device_get(batch["valid"])})
    return metrics.summarize(outputs)


def _check_finite(step: int, out: Mapping[str, Any]) -> None:
    from saljax.checkpoint import NonFiniteError

    if bool(out["finite"]):
        return
    bad = [k for k, v in out.items() if k.startswith("loss") and not np.isfinite(v)]
    where = ", ".join(f"{k} = {float(out[k])}" for k in bad) if bad else f"gradient norm = {float(out['grad_norm'])}"
    raise NonFiniteError(f"non-finite loss at step {step}: {where}. Stopping; no checkpoint holds these values"
                         " (try a lower learning rate or loss weight)")


def train_and_evaluate(config, workdir: str, *, log=print) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates at the end.

    Returns the final metrics of every evaluation split, keyed `<split>/<metric>`.
    """
    import time

    from tqdm import tqdm

    from saljax import checkpoint, data
    from saljax.writers import MetricWriter

    workdir = os.path.abspath(os.path.expanduser(workdir))
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_batch_size(config.batch_size, mesh)
    ds = config.dataset
    builder = data.build(ds.name, os.path.expanduser(ds.data_dir), ds.config or None,
                         manual_dir=ds.manual_dir or None, **ds.overrides)
    features = builder.info.features
    with config.unlocked():
        config.model.num_classes = features["label"].num_classes
        config.model.in_channels = features["image"].shape[-1]
    primary = jax.process_index() == 0
    if primary:
        _warn_if_config_changed(workdir, config, log)
        checkpoint.save_config(workdir, config)

    model_def, state = init_from_config(config)
    optimizer = make_optimizer(config.optimizer)
    loss = losses.for_method(config.method, **config.loss)
    train_step = make_train_step(model_def, loss, optimizer, mesh=mesh)
    eval_step = make_eval_step(model_def, loss=loss, mesh=mesh)
    loader = data.make_loader(builder, ds.train_split, config.batch_size // jax.process_count(), seed=config.seed,
                              num_epochs=None, augment=ds.augment, mean=ds.mean, std=ds.std)
    iterator = iter(loader)
    ck = config.checkpoint
    checkpointer = checkpoint.Checkpointer(workdir, keep_best=ck.keep_best, keep_latest=ck.keep_latest, best_metric=ck.best_metric,
                                           best_mode=ck.best_mode, async_save=ck.async_save)
    start = 0
    if checkpointer.latest_step() is not None:
        start, state = checkpointer.restore(state, data_iterator=iterator)
        log(f"resumed from checkpoint {start} in {workdir}")
    state = parallel.replicate(state, mesh)
    writer = MetricWriter(workdir) if primary else None
    num_classes = config.model.num_classes

    def evaluate(state) -> dict[str, float]:
        results = {}
        for split in ds.eval_splits:
            for k, v in _evaluate_split(eval_step, state, builder, split, config, mesh).items():
                results[f"{split}/{k}"] = v
        return results

    bar = tqdm(total=config.num_steps, initial=start, disable=not (config.progress and primary), unit="step",
               dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 30.0)
    pending = None  # the previous step's metrics, checked while the next step runs
    window_start, window_steps = time.perf_counter(), 0
    last_eval: dict[str, float] = {}
    try:
        for step in range(start + 1, config.num_steps + 1):
            batch = next(iterator)
            batch_lib.validate_batch(batch, num_classes)
            state, out = train_step(state, parallel.shard_batch(batch, mesh))
            if pending is not None:
                _check_finite(*pending)
            pending = (step, out)
            window_steps += 1
            bar.update(1)
            boundary = step == config.num_steps or step % config.eval_every == 0 or step % ck.every == 0
            if step % config.log_every == 0 or boundary:
                fetched = {k: float(v) for k, v in jax.device_get(out).items()}
                _check_finite(step, fetched)
                pending = None
                seconds = time.perf_counter() - window_start
                fetched["images_per_second"] = window_steps * config.batch_size / max(seconds, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                bar.set_postfix(loss=f"{fetched['loss']:.4f}", acc=f"{fetched['accuracy']:.3f}",
                                img_s=f"{fetched['images_per_second']:.0f}")
                if writer:
                    writer.write(step, {f"train/{k}": v for k, v in fetched.items() if k != "finite"})
            if step == config.num_steps or step % config.eval_every == 0:
                last_eval = evaluate(state)
                if writer:
                    writer.write(step, last_eval)
                checkpointer.save(step, state, data_iterator=iterator,
                                  metrics={ck.best_metric: last_eval[ck.best_metric]} if ck.best_metric in last_eval else None)
            elif step % ck.every == 0:
                checkpointer.save(step, state, data_iterator=iterator)
        if pending is not None:
            _check_finite(*jax.device_get(pending))
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        if writer:
            writer.close()
    if not last_eval:  # resumed at or past num_steps
        last_eval = evaluate(state)
    return last_eval


def _warn_if_config_changed(workdir: str, config, log) -> None:
    from saljax import checkpoint

    if not os.path.isfile(os.path.join(workdir, checkpoint.CONFIG_FILE)):
        return
    changed = checkpoint.config_changes(checkpoint.load_config(workdir), config)
    if changed:
        log(f"warning: {workdir} was trained with another config; changed fields: {', '.join(changed)}")
