"""The training loop: `train_and_evaluate(config, workdir)` trains, checkpoints, resumes, evaluates.

Every evaluation split is evaluated every `eval_every` steps and at the last step. With a
`checkpoint.best_metric` (e.g. "validation/roc_auc"), the checkpoint with the best value of it is
kept, and at the end it is evaluated too: model selection on the validation split, as the papers
report test numbers (e.g. the test ROC AUC of the epoch with the best validation AUC, Viviano et
al., "Saliency is a possible red herring when diagnosing poor generalization", ICLR 2021; the
epoch with the best validation accuracy, Boyd et al., CYBORG, WACV 2023). Ties go to the earliest
step.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from saljax import batch as batch_lib
from saljax import checkpoint, data, metrics, parallel
from saljax import workdir as workdir_lib
from saljax.train.from_config import check_config, fill_from_dataset, init_from_config, make_loss
from saljax.train.optimizer import make_optimizer
from saljax.train.state import TrainState
from saljax.train.steps import make_eval_step, make_train_step
from saljax.writers import MetricWriter

__all__ = ["train_and_evaluate"]

_log = logging.getLogger("saljax.train")


def _eval_batches(builder: Any, split: str, config: ml_collections.ConfigDict, mesh: Mesh) -> Iterator[dict[str, Any]]:
    """Fixed-size, padded batches of a whole split, the same count on every process.

    Padding keeps one compiled shape and lets every process join every collective; `valid` marks
    the real samples.
    """
    processes = jax.process_count()
    local = config.eval_batch_size // processes
    total = builder.info.splits[split].num_examples
    per_process = math.ceil(total / processes)
    loader = data.make_loader(builder, split, local, shuffle=False, num_epochs=1, drop_remainder=False,
                              mean=config.dataset.mean, std=config.dataset.std)
    it = iter(loader)
    template: dict[str, Any] = {}
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


def _evaluate_split(eval_step: Callable, state: TrainState, builder: Any, split: str, config: ml_collections.ConfigDict,
                    mesh: Mesh) -> dict[str, float]:
    outputs = []
    for batch in _eval_batches(builder, split, config, mesh):
        out = jax.device_get(eval_step(state, {k: v for k, v in batch.items() if k != "valid"}))
        outputs.append(out | {"label": np.asarray(jax.device_get(batch["label"])), "valid": jax.device_get(batch["valid"])})
    return metrics.summarize(outputs)


def _check_finite(step: int, out: Mapping[str, Any]) -> None:
    """Raises NonFiniteError naming the loss terms that are NaN/inf at `step` (the first such step)."""
    if bool(out["finite"]):
        return
    values = {k: float(v) for k, v in out.items() if k == "loss" or k.startswith("loss/")}
    terms = [k for k, v in values.items() if k != "loss" and not np.isfinite(v)]
    if terms:
        finite = [k for k, v in values.items() if k != "loss" and np.isfinite(v)]
        where = "non-finite term(s) " + ", ".join(f"{k} = {values[k]}" for k in terms)
        if finite:
            where += "; finite: " + ", ".join(f"{k} = {values[k]:.4g}" for k in finite)
    elif not np.isfinite(values["loss"]):
        where = f"loss = {values['loss']}"
    else:
        where = f"gradient norm = {float(out['grad_norm'])} (every loss term finite)"
    raise workdir_lib.NonFiniteError(f"non-finite loss at step {step} (the first such step): {where}. Stopping; no"
                                 " checkpoint holds these values (try a lower learning rate or loss weight)")


def _warn_if_config_changed(path: str, config: ml_collections.ConfigDict) -> None:
    if not os.path.isfile(os.path.join(path, workdir_lib.CONFIG_FILE)):
        return
    try:
        changed = workdir_lib.config_changes(workdir_lib.load_config(path), config)
    except workdir_lib.CheckpointError as error:
        _log.warning("%s; overwriting it", error)
        return
    if changed:
        _log.warning("%s was trained with another config; changed fields: %s", path, ", ".join(changed))


def _format(results: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items()))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str],
                       *, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

    The config is checked (`check_config`) and the work directory tested for writing before any
    file is written or data built; the model fields that follow from the data are filled in
    (`fill_from_dataset`) and the config saved as `config.json`. `log` receives progress messages
    (default: the "saljax.train" logger at INFO); warnings go to that logger.

    Returns the last step's evaluation of every evaluation split, keyed `<split>/<metric>`, and
    `final/step`. With `config.checkpoint.best_metric`, also the evaluation of the best checkpoint
    by that metric (the earliest on ties), keyed `best/<split>/<metric>`, and `best/step`.
    """
    log = log or _log.info
    check_config(config)
    path = workdir_lib.check_writable(workdir)
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_batch_size(config.batch_size, mesh)
    ds = config.dataset
    builder = data.from_config(ds)
    fill_from_dataset(config, builder.info.features, builder.info.splits)
    model_def, state = init_from_config(config)
    primary = jax.process_index() == 0
    if primary:
        _warn_if_config_changed(path, config)
        workdir_lib.save_config(path, config)

    optimizer = make_optimizer(config.optimizer, num_steps=config.num_steps)
    loss = make_loss(config)
    # Losses that draw random numbers get fold_in(key(seed), step): resumes draw the same numbers.
    train_step = make_train_step(model_def, loss, optimizer, mesh=mesh, key=jax.random.key(config.seed))
    eval_step = make_eval_step(model_def, loss=loss, mesh=mesh, key=jax.random.key(config.seed))

    def new_iterator() -> Any:
        loader = data.make_loader(builder, ds.train_split, config.batch_size // jax.process_count(), seed=config.seed,
                                  num_epochs=None, augment=ds.augment, mean=ds.mean, std=ds.std)
        return iter(loader)

    iterator = new_iterator()
    ck = config.checkpoint
    checkpointer = checkpoint.Checkpointer(path, keep_best=ck.keep_best, keep_latest=ck.keep_latest,
                                           best_metric=ck.best_metric, best_mode=ck.best_mode, async_save=ck.async_save,
                                           move_corrupt=True)
    start = 0
    if checkpointer.latest_step() is not None:
        try:
            start, state = checkpointer.restore(state, data_iterator=iterator)
            log(f"resumed from checkpoint {start} in {path}")
        except checkpoint.CheckpointError as error:
            _log.warning("%s; starting from step 0", error)
            iterator = new_iterator()
    template = state
    state = parallel.replicate(state, mesh)
    writer = MetricWriter(path) if primary else None
    num_classes = config.model.num_classes

    def evaluate(state: TrainState) -> dict[str, float]:
        results = {}
        for split in ds.eval_splits:
            for k, v in _evaluate_split(eval_step, state, builder, split, config, mesh).items():
                results[f"{split}/{k}"] = v
        return results

    def ranked(step: int, results: Mapping[str, float]) -> dict[str, float] | None:
        if not ck.best_metric:
            return None
        if ck.best_metric not in results:
            raise ValueError(f"checkpoint.best_metric {ck.best_metric!r} is not among the evaluation's metrics"
                             f" {sorted(results)}")
        return {ck.best_metric: results[ck.best_metric]}

    bar = tqdm(total=config.num_steps, initial=start, disable=not (config.progress and primary), unit="step",
               dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 30.0)
    pending = None  # the previous step's metrics, checked while the next step runs
    window_start, window_steps = time.perf_counter(), 0
    last_eval: dict[str, float] = {}
    final_step = max(start, config.num_steps)
    results: dict[str, float] = {}
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
                log(f"evaluation of checkpoint {step}: {_format(last_eval)}")
                if writer:
                    writer.write(step, last_eval)
                checkpointer.save(step, state, data_iterator=iterator, metrics=ranked(step, last_eval))
            elif step % ck.every == 0:
                checkpointer.save(step, state, data_iterator=iterator)
        if pending is not None:
            _check_finite(*jax.device_get(pending))
        bar.close()
        checkpointer.wait()
        if not last_eval:  # resumed at or past num_steps
            last_eval = evaluate(state)
        results = {**last_eval, "final/step": float(final_step)}
        if ck.best_metric:
            best = _best(checkpointer, template, mesh, final_step, last_eval, evaluate)
            if best is not None:
                best_step, best_eval = best
                results.update({f"best/{k}": v for k, v in best_eval.items()})
                results["best/step"] = float(best_step)
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        if writer:
            writer.close()
    return results


def _best(checkpointer: checkpoint.Checkpointer, template: TrainState, mesh: Mesh, final_step: int,
          final_eval: dict[str, float],
          evaluate: Callable[[TrainState], dict[str, float]]) -> tuple[int, dict[str, float]] | None:
    """(step, evaluation) of the best checkpoint; a corrupt one is moved aside and the next best used."""
    while (step := checkpointer.best_step()) is not None:
        if step == final_step:
            return step, final_eval
        try:
            _, state = checkpointer.restore(template, step=step)
        except checkpoint.CheckpointError as error:
            _log.warning("%s", error)
            continue
        return step, evaluate(parallel.replicate(state, mesh))
    _log.warning("no checkpoint carries %s; no best checkpoint to report", checkpointer.best_metric)
    return None
