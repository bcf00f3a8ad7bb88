"""The training loop: `train_and_evaluate(config, workdir)` trains, checkpoints, resumes, evaluates.

Every evaluation split is evaluated every `eval_every` steps and at the last step. With a
`checkpoint.best_metric` (e.g. "validation/roc_auc"), the checkpoint with the best value of it is
kept, and at the end it is evaluated too: model selection on the validation split, as the papers
report test numbers (e.g. the test ROC AUC of the epoch with the best validation AUC, Viviano et
al., "Saliency is a possible red herring when diagnosing poor generalization", ICLR 2021; the
epoch with the best validation accuracy, Boyd et al., CYBORG, WACV 2023). Ties go to the earliest
step. Checkpoints are written every `checkpoint.every` steps and at the last step; at the evaluations
in between, only those that rank among the `keep_best` best so far (all of them without a
`best_metric`; in a group of runs, all runs' when one of them ranks), so that the latest checkpoint
may be older than the latest evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
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

Batch = batch_lib.Batch

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


def evaluate_splits(eval_step: Callable[[Any, Batch], Mapping[str, Any]], state: Any, builder: Any,
                    config: ml_collections.ConfigDict, mesh: Mesh, *, runs: int | None = None) -> list[dict[str, float]]:
    """`<split>/<metric>` of every evaluation split; one dict, or one per run when `runs` is set.

    With `runs`, `eval_step` evaluates a group of runs at once and every output has a leading axis
    of that size; each run's outputs are summarised on their own.
    """
    results: list[dict[str, float]] = [{} for _ in range(runs or 1)]
    for split in config.dataset.eval_splits:
        outputs: list[list[dict[str, Any]]] = [[] for _ in range(runs or 1)]
        for batch in _eval_batches(builder, split, config, mesh):
            out = jax.device_get(eval_step(state, {k: v for k, v in batch.items() if k != "valid"}))
            extra = {"label": np.asarray(jax.device_get(batch["label"])), "valid": jax.device_get(batch["valid"])}
            for i, run_outputs in enumerate(outputs):
                run_outputs.append({k: v[i] for k, v in out.items()} | extra if runs else out | extra)
        for result, run_outputs in zip(results, outputs, strict=True):
            result.update({f"{split}/{k}": v for k, v in metrics.summarize(run_outputs).items()})
    return results


def _check_finite(step: int, out: Mapping[str, Any], where: str = "") -> None:
    """Raises NonFiniteError naming the loss terms that are NaN/inf at `step` (the first such step).

    `where` (a run's work directory, in a group of runs) starts the message.
    """
    if bool(out["finite"]):
        return
    values = {k: float(v) for k, v in out.items() if k == "loss" or k.startswith("loss/")}
    terms = [k for k, v in values.items() if k != "loss" and not np.isfinite(v)]
    if terms:
        finite = [k for k, v in values.items() if k != "loss" and np.isfinite(v)]
        what = "non-finite term(s) " + ", ".join(f"{k} = {values[k]}" for k in terms)
        if finite:
            what += "; finite: " + ", ".join(f"{k} = {values[k]:.4g}" for k in finite)
    elif not np.isfinite(values["loss"]):
        what = f"loss = {values['loss']}"
    else:
        what = f"gradient norm = {float(out['grad_norm'])} (every loss term finite)"
    raise workdir_lib.NonFiniteError(f"{where}non-finite loss at step {step} (the first such step): {what}. Stopping; no"
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


@dataclasses.dataclass
class Run:
    """One training run of a group: its config, work directory, data iterator and the files it writes.

    `state` is the run's state on the host (fresh, or restored from its newest readable checkpoint)
    and `start` its step; `template` is a fresh state, the structure its checkpoints restore into.
    """

    config: ml_collections.ConfigDict
    path: str
    model_def: Any
    template: TrainState
    state: TrainState
    start: int
    iterator: Any
    checkpointer: checkpoint.Checkpointer
    writer: MetricWriter | None


class Program(Protocol):
    """How a group of runs is placed, stepped and evaluated: one run as is, or several stacked (vmapped)."""

    stacked: bool  # outputs carry a leading axis, one entry per run

    def place(self, states: Sequence[TrainState]) -> Any: ...

    def member(self, state: Any, index: int) -> TrainState: ...

    def step(self, state: Any, batches: Sequence[Batch]) -> tuple[Any, dict[str, jax.Array]]: ...

    def evaluate(self, state: Any) -> list[dict[str, float]]: ...


class SingleProgram:
    """One run's jit-compiled steps, data-parallel over `mesh` (what `saljax train` runs)."""

    stacked = False

    def __init__(self, run: Run, builder: Any, mesh: Mesh):
        config = run.config
        optimizer = make_optimizer(config.optimizer, num_steps=config.num_steps)
        loss = make_loss(config)
        # Losses that draw random numbers get fold_in(key(seed), step): resumes draw the same numbers.
        key = jax.random.key(config.seed)
        self._train_step = make_train_step(run.model_def, loss, optimizer, mesh=mesh, key=key)
        self._eval_step = make_eval_step(run.model_def, loss=loss, mesh=mesh, key=key)
        self._config, self._builder, self._mesh = config, builder, mesh

    def place(self, states: Sequence[TrainState]) -> Any:
        (state,) = states
        return parallel.replicate(state, self._mesh)

    def member(self, state: Any, index: int) -> TrainState:
        return state

    def step(self, state: Any, batches: Sequence[Batch]) -> tuple[Any, dict[str, jax.Array]]:
        (batch,) = batches
        return self._train_step(state, parallel.shard_batch(batch, self._mesh))

    def evaluate(self, state: Any) -> list[dict[str, float]]:
        return evaluate_splits(self._eval_step, state, self._builder, self._config, self._mesh)


def prepare(configs: Sequence[ml_collections.ConfigDict],
            workdirs: Sequence[str | os.PathLike[str]]) -> tuple[list[str], Mesh, Any]:
    """Checks every config and work directory, then builds the (shared) dataset: (paths, mesh, builder).

    The configs must share their `dataset` and `num_devices` (a group of runs reads one dataset).
    """
    for config in configs:
        check_config(config)
    paths = [workdir_lib.check_writable(w) for w in workdirs]
    config = configs[0]
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_batch_size(config.batch_size, mesh)
    builder = data.from_config(config.dataset)
    for c in configs:
        fill_from_dataset(c, builder.info.features, builder.info.splits)
    return paths, mesh, builder


def open_run(config: ml_collections.ConfigDict, path: str, builder: Any, log: Callable[[str], None], *,
             read_ahead: bool = True) -> Run:
    """Saves `config` in `path` and restores the run's newest readable checkpoint (a fresh state if none).

    `read_ahead=False` reads each batch when it is asked for, in the caller's thread, instead of
    with grain's read threads: for runs stepped together, whose pipelines' threads would otherwise
    contend with each other and with the loop for Python's lock (10 runs: ~30% of a CPU group's
    time). The batches are the same either way.
    """
    model_def, state = init_from_config(config)
    if jax.process_index() == 0:
        _warn_if_config_changed(path, config)
        workdir_lib.save_config(path, config)
    ds = config.dataset
    read_options = None if read_ahead else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

    def new_iterator() -> Any:
        loader = data.make_loader(builder, ds.train_split, config.batch_size // jax.process_count(), seed=config.seed,
                                  num_epochs=None, augment=ds.augment, mean=ds.mean, std=ds.std,
                                  read_options=read_options)
        return iter(loader)

    iterator = new_iterator()
    ck = config.checkpoint
    checkpointer = checkpoint.Checkpointer(path, keep_best=ck.keep_best, keep_latest=ck.keep_latest,
                                           best_metric=ck.best_metric, best_mode=ck.best_mode, async_save=ck.async_save,
                                           move_corrupt=True)
    start, template = 0, state
    if checkpointer.latest_step() is not None:
        try:
            start, state = checkpointer.restore(template, data_iterator=iterator)
            log(f"resumed from checkpoint {start} in {path}")
        except checkpoint.CheckpointError as error:
            _log.warning("%s; starting from step 0", error)
            iterator = new_iterator()
    writer = MetricWriter(path) if jax.process_index() == 0 else None
    return Run(config, path, model_def, template, state, start, iterator, checkpointer, writer)


def close_run(run: Run) -> None:
    """Waits for the run's pending checkpoint writes and closes its files."""
    try:
        run.checkpointer.wait()
    finally:
        run.checkpointer.close()
        if run.writer:
            run.writer.close()


def train_group(runs: Sequence[Run], program: Program, *, log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Trains runs that share every setting but their seed (and loss options) in lockstep from their common step.

    Each run reads its own data iterator and writes its own metrics and checkpoints, as it would
    alone; `program` steps all of them at once. Returns each run's results (see
    `train_and_evaluate`). The runs stay open (see `close_run`).
    """
    log = log or _log.info
    config = runs[0].config
    if len({r.start for r in runs}) != 1:
        raise ValueError(f"runs trained together must resume from the same step; got {[r.start for r in runs]}")
    start = runs[0].start
    ck = config.checkpoint
    state = program.place([r.state for r in runs])
    primary = jax.process_index() == 0
    num_classes = config.model.num_classes
    where = [f"{r.path}: " if len(runs) > 1 else "" for r in runs]

    def per_run(out: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{k: v[i] for k, v in out.items()} for i in range(len(runs))] if program.stacked else [dict(out)]

    def check_pending(step: int, out: Mapping[str, Any]) -> None:
        if not bool(np.all(jax.device_get(out["finite"]))):
            for w, o in zip(where, per_run(jax.device_get(out)), strict=True):
                _check_finite(step, o, w)

    def ranked(results: Mapping[str, float]) -> dict[str, float] | None:
        if not ck.best_metric:
            return None
        if ck.best_metric not in results:
            raise ValueError(f"checkpoint.best_metric {ck.best_metric!r} is not among the evaluation's metrics"
                             f" {sorted(results)}")
        return {ck.best_metric: results[ck.best_metric]}

    def save(step: int, state: Any, evaluation: Sequence[Mapping[str, float]] | None = None, *, due: bool) -> None:
        # An evaluation's checkpoint that would not rank among the best is not written unless a save is
        # `due` anyway (or nothing ranks them): Orbax would delete it at the next save, and at a paper's
        # width (an evaluation every epoch, a 100 MB state per run) those writes cost more than the
        # training. The runs of a group save together when one of them ranks, so that an interrupted
        # group resumes as one.
        scores = [ranked(e) for e in evaluation] if evaluation else [None] * len(runs)
        if not (due or not ck.best_metric
                or any(s is not None and r.checkpointer.ranks_among_best(step, s) for r, s in zip(runs, scores))):
            return
        for i, (run, score) in enumerate(zip(runs, scores, strict=True)):
            run.checkpointer.save(step, program.member(state, i), data_iterator=run.iterator, metrics=score)

    bar = tqdm(total=config.num_steps, initial=start, disable=not (config.progress and primary), unit="step",
               dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 30.0)
    pending = None  # the previous step's metrics, checked while the next step runs
    window_start, window_steps = time.perf_counter(), 0
    last_eval: list[dict[str, float]] = []
    final_step = max(start, config.num_steps)
    try:
        for step in range(start + 1, config.num_steps + 1):
            batches = [next(r.iterator) for r in runs]
            for batch in batches:
                batch_lib.validate_batch(batch, num_classes)
            state, out = program.step(state, batches)
            if pending is not None:
                check_pending(*pending)
            pending = (step, out)
            window_steps += 1
            bar.update(1)
            due = step == config.num_steps or step % ck.every == 0  # a regular save
            boundary = due or step % config.eval_every == 0
            if step % config.log_every == 0 or boundary:
                seconds = time.perf_counter() - window_start
                fetched = [{k: float(v) for k, v in o.items()} for o in per_run(jax.device_get(out))]
                for w, f in zip(where, fetched, strict=True):
                    _check_finite(step, f, w)
                pending = None
                for f in fetched:
                    f["images_per_second"] = window_steps * config.batch_size / max(seconds, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                shown = fetched[0]
                bar.set_postfix(loss=f"{shown['loss']:.4f}", acc=f"{shown['accuracy']:.3f}",
                                img_s=f"{shown['images_per_second']:.0f}")
                for run, f in zip(runs, fetched, strict=True):
                    if run.writer:
                        run.writer.write(step, {f"train/{k}": v for k, v in f.items() if k != "finite"})
            if step == config.num_steps or step % config.eval_every == 0:
                last_eval = program.evaluate(state)
                for run, evaluation in zip(runs, last_eval, strict=True):
                    log(f"evaluation of checkpoint {step}{f' of {run.path}' if len(runs) > 1 else ''}:"
                        f" {_format(evaluation)}")
                    if run.writer:
                        run.writer.write(step, evaluation)
                save(step, state, last_eval, due=due)
            elif due:
                save(step, state, due=True)
        if pending is not None:
            check_pending(*pending)
        bar.close()
        for run in runs:
            run.checkpointer.wait()
        if not last_eval:  # resumed at or past num_steps
            last_eval = program.evaluate(state)
        results = [{**e, "final/step": float(final_step)} for e in last_eval]
        if ck.best_metric:
            _add_best(runs, program, state, final_step, last_eval, results)
    finally:
        bar.close()
    return results


def _add_best(runs: Sequence[Run], program: Program, final: Any, final_step: int,
              final_eval: Sequence[dict[str, float]], results: list[dict[str, float]]) -> None:
    """Adds `best/<split>/<metric>` and `best/step` of each run's best checkpoint to its results.

    The best states that are not the final one are evaluated together, in one pass of `program`.
    """
    best = [_best_state(run, final_step) for run in runs]
    if any(b is not None and b[1] is not None for b in best):
        states = [b[1] if b is not None and b[1] is not None else program.member(final, i) for i, b in enumerate(best)]
        evaluations = program.evaluate(program.place([jax.device_get(s) for s in states]))
    else:
        evaluations = list(final_eval)
    for i, b in enumerate(best):
        if b is None:
            continue
        best_eval = final_eval[i] if b[1] is None else evaluations[i]
        results[i].update({f"best/{k}": v for k, v in best_eval.items()})
        results[i]["best/step"] = float(b[0])


def _best_state(run: Run, final_step: int) -> tuple[int, TrainState | None] | None:
    """(step, state) of the run's best checkpoint (state None: the final one); a corrupt one is moved
    aside and the next best used; None when no checkpoint carries the metric."""
    checkpointer = run.checkpointer
    while (step := checkpointer.best_step()) is not None:
        if step == final_step:
            return step, None
        try:
            _, state = checkpointer.restore(run.template, step=step)
        except checkpoint.CheckpointError as error:
            _log.warning("%s", error)
            continue
        return step, state
    _log.warning("no checkpoint carries %s; no best checkpoint to report", checkpointer.best_metric)
    return None


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
    Several seeds of one config train as one program with `saljax.train.train_many`.
    """
    log = log or _log.info
    (path,), mesh, builder = prepare([config], [workdir])
    run = open_run(config, path, builder, log)
    try:
        (results,) = train_group([run], SingleProgram(run, builder, mesh), log=log)
    finally:
        close_run(run)
    return results
