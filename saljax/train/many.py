"""Many runs of one config (seeds, or values of one numeric loss option) trained as one vmapped program.

    results = train_many([cfg_seed0, cfg_seed1, cfg_seed2], ["runs/s0", "runs/s1", "runs/s2"])

Runs that differ only in `seed` and in at most one numeric `loss` option (e.g. `loss.lam`) share
the model's shapes, the data's shapes and every setting of the loop, so their states stack along
a leading axis and one jit-compiled program steps them all: parameters, optimizer
state, BatchNorm statistics, the PRNG key of the loss and the data order are per run (each run
reads the batches its own `saljax train` would read), and so is the loss option's value. The
training loop is `saljax.train.loop`'s, so each run's work directory gets the checkpoints (with
the data iterator's position), best-checkpoint choice, `config.json` and metrics a separate run
writes, and a run can be resumed, inspected or explained alone.

The program batches the runs with `jax.vmap` (form "vmap": what fills an accelerator, the
default on GPU and TPU) or steps them one after another inside itself with `jax.lax.map` (form
"map"). On CPU the default is separate runs: there XLA's batched convolutions and matmuls made
one program slower than the runs one after another (benchmarks/MANY_SEEDS.md).

Runs that cannot stack (other differences, several processes, a loss whose option is not a
traceable number) train one after another with `train_and_evaluate`, with the reason logged. A
group whose runs were stopped at different checkpoints resumes as sub-groups, one per step.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from saljax import losses, parallel
from saljax.train import loop
from saljax.train.from_config import make_loss
from saljax.train.optimizer import make_optimizer
from saljax.train.state import ModelDef, TrainState
from saljax.train.steps import eval_step_fn, train_step_fn

__all__ = ["FORMS", "StackedProgram", "make_many_eval_step", "make_many_train_step", "stacking", "train_many"]

_log = logging.getLogger("saljax.train")

Batch = loop.Batch
# Errors of a loss built or applied with a traced option value: the option must then be a Python number.
#: How a program steps its runs: "vmap" batched, "map" one after another inside the program, "auto" by backend.
FORMS = ("auto", "vmap", "map")
_CPU_REASON = ("on CPU, separate runs stepped faster than one program (benchmarks/MANY_SEEDS.md);"
               " form 'vmap' or 'map' (saljax experiment --vmap-form) forces one")
_TRACE_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
                 jax.errors.TracerArrayConversionError, TypeError)


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stacking(configs: Sequence[ml_collections.ConfigDict]) -> tuple[str | None, str]:
    """Whether `configs` can train as one vmapped program: `(option, why_not)`.

    `option` is the `loss` option whose value differs between the configs (None when they differ
    only in `seed`); `why_not` is "" when they can stack, else the reason they cannot (one line).
    """
    if len(configs) < 2:
        return None, "a single run"
    if jax.process_count() > 1:
        return None, "runs of several processes train one after another"
    plain = [_plain(c) for c in configs]
    rest = [{k: v for k, v in p.items() if k not in ("seed", "loss")} for p in plain]
    for other in rest[1:]:
        changed = sorted(k for k in set(rest[0]) | set(other) if rest[0].get(k) != other.get(k))
        if changed:
            return None, f"the runs differ in {', '.join(changed)} (only seed and one loss option may differ)"
    names = {tuple(sorted(p["loss"])) for p in plain}
    if len(names) > 1:
        return None, "the runs set different loss options"
    varying = sorted({k for p in plain for k in p["loss"] if p["loss"][k] != plain[0]["loss"][k]})
    if len(varying) > 1:
        return None, f"the runs differ in several loss options {varying} (one may differ)"
    if not varying:
        return None, ""
    option = varying[0]
    if not all(_is_number(p["loss"][option]) for p in plain):
        return None, f"loss.{option} is not a number in every run"
    return option, ""


def _loss_at(config: ml_collections.ConfigDict, option: str | None, value: jax.Array) -> losses.Loss:
    """The loss of `config` with `loss.<option>` set to `value` (a traced scalar inside the program)."""
    if option is None:
        return make_loss(config)
    options = dict(config.loss)
    options[option] = value
    return losses.for_method(config.method, **options)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _float_dtype(tree: Any) -> Any:
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    return jnp.result_type(leaves[0]) if leaves else jnp.float32


def _train(model_def: ModelDef, loss_at: Callable[[jax.Array], losses.Loss], optimizer: optax.GradientTransformation,
           state: TrainState, batch: Batch, key: jax.Array, value: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    return train_step_fn(model_def, loss_at(value), optimizer, state, batch, key)


def _eval(model_def: ModelDef, loss_at: Callable[[jax.Array], losses.Loss], state: TrainState, batch: Batch,
          key: jax.Array, value: jax.Array) -> dict[str, jax.Array]:
    return eval_step_fn(model_def, loss_at(value), state, batch, key)


def _resolve_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {' | '.join(FORMS)}; got {form!r}")
    return "vmap" if form == "auto" else form


def _over_runs(fn: Callable[..., Any], form: str, in_axes: tuple[int | None, ...]) -> Callable[..., Any]:
    """`fn` applied to every run: `jax.vmap` (batched), or `jax.lax.map` (one run after another in the program)."""
    if _resolve_form(form) == "vmap":
        return jax.vmap(fn, in_axes=in_axes)

    def mapped(*args: Any) -> Any:
        shared = [a if axis is None else None for a, axis in zip(args, in_axes, strict=True)]
        per_run = tuple(a for a, axis in zip(args, in_axes, strict=True) if axis is not None)

        def one(xs: tuple[Any, ...]) -> Any:
            it = iter(xs)
            return fn(*[next(it) if axis is not None else a for a, axis in zip(shared, in_axes, strict=True)])

        return jax.lax.map(one, per_run)

    return mapped


def make_many_train_step(
    model_def: ModelDef, loss_at: Callable[[jax.Array], losses.Loss], optimizer: optax.GradientTransformation, *,
    mesh: Mesh | None = None, form: str = "vmap",
) -> Callable[[TrainState, Batch, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`make_train_step` for R runs at once: `(states, batches, keys, values) -> (new_states, metrics)`.

    `states` are R `TrainState`s stacked along a leading axis, `batches` (R, B, ...) one batch per
    run, `keys` (R,) each run's PRNG key (`jax.random.key(seed)`) and `values` (R,) the value each
    run's loss is built with, `loss_at(value)` (ignored by a `loss_at` that builds one loss);
    every metric gets a leading axis R. One jit-compiled program (the states are donated); with a
    `mesh`, each run's batch is split over its "data" axis. `form` (see `FORMS`): "vmap" batches
    the runs' operations (`jax.vmap`), "map" runs them one after another inside the program
    (`jax.lax.map`); "auto" is "vmap".
    """
    step = _over_runs(functools.partial(_train, model_def, loss_at, optimizer), form, (0, 0, 0, 0))
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    rep = parallel.replicated(mesh)
    return jax.jit(step, donate_argnums=0, out_shardings=rep,
                   in_shardings=(rep, NamedSharding(mesh, PartitionSpec(None, "data")), rep, rep))


def make_many_eval_step(
    model_def: ModelDef, loss_at: Callable[[jax.Array], losses.Loss], *, mesh: Mesh | None = None, form: str = "vmap",
) -> Callable[[TrainState, Batch, jax.Array, jax.Array], dict[str, jax.Array]]:
    """`make_eval_step` for R stacked runs on one shared batch: `(states, batch, keys, values) -> outputs (R, B, ...)`."""
    step = _over_runs(functools.partial(_eval, model_def, loss_at), form, (0, None, 0, 0))
    if mesh is None:
        return jax.jit(step)
    rep = parallel.replicated(mesh)
    return jax.jit(step, out_shardings=rep, in_shardings=(rep, parallel.batch_sharding(mesh), rep, rep))


class StackedProgram:
    """The jit-compiled train and eval steps of a group of runs, vmapped or mapped (see the module docstring).

    States carry a leading axis of size `len(runs)`; a train step takes one batch per run, stacked
    (R, B, ...), and an eval step one batch shared by all runs. Each run's PRNG key is
    `jax.random.key(seed)` as in a separate run, and its value of `loss.<option>` enters the loss as
    a traced scalar of the parameters' dtype (a separate run multiplies by a Python float instead:
    the same numbers in the parameters' precision).
    """

    stacked = True

    def __init__(self, runs: Sequence[loop.Run], option: str | None, builder: Any, mesh: Mesh, *, form: str = "auto"):
        config, model_def = runs[0].config, runs[0].model_def
        optimizer = make_optimizer(config.optimizer, num_steps=config.num_steps)
        self._keys = jnp.stack([jax.random.key(r.config.seed) for r in runs])
        dtype = _float_dtype(runs[0].template.params)
        self._values = jnp.asarray([r.config.loss[option] if option else 0.0 for r in runs], dtype)

        def loss_at(value: jax.Array) -> losses.Loss:
            return _loss_at(config, option, value)

        self._batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))  # (runs, batch, ...)
        self.form = _resolve_form(form)
        self._train = make_many_train_step(model_def, loss_at, optimizer, mesh=mesh, form=self.form)
        self._eval = make_many_eval_step(model_def, loss_at, mesh=mesh, form=self.form)
        self._train_fn = _over_runs(functools.partial(_train, model_def, loss_at, optimizer), self.form, (0, 0, 0, 0))
        self._config, self._builder, self._mesh, self._size = config, builder, mesh, len(runs)

    def traces(self, states: Sequence[TrainState], batches: Sequence[Batch]) -> bool:
        """Whether the step traces with the option as a traced value (a loss may need a Python number)."""
        try:
            jax.eval_shape(self._train_fn, _stack(states), _stack(batches), self._keys, self._values)
        except _TRACE_ERRORS as error:
            _log.info("the loss does not take a traced value (%s: %s)", type(error).__name__, str(error).splitlines()[0])
            return False
        return True

    def place(self, states: Sequence[TrainState]) -> Any:
        return parallel.replicate(_stack(states), self._mesh)

    def member(self, state: Any, index: int) -> TrainState:
        return jax.tree.map(lambda leaf: leaf[index], state)

    def step(self, state: Any, batches: Sequence[Batch]) -> tuple[Any, dict[str, jax.Array]]:
        stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        return self._train(state, jax.device_put(stacked, self._batch_sharding), self._keys, self._values)

    def evaluate(self, state: Any) -> list[dict[str, float]]:
        def step(state: Any, batch: Batch) -> Any:
            return self._eval(state, batch, self._keys, self._values)

        return loop.evaluate_splits(step, state, self._builder, self._config, self._mesh, runs=self._size)


def _check_arguments(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str | os.PathLike[str]]) -> None:
    if not configs:
        raise ValueError("train_many needs at least one config")
    if len(configs) != len(workdirs):
        raise ValueError(f"train_many got {len(configs)} configs but {len(workdirs)} work directories")
    paths = [os.path.abspath(os.path.expanduser(os.fspath(w))) for w in workdirs]
    if len(set(paths)) != len(paths):
        raise ValueError(f"train_many needs one work directory per run; got duplicates in {paths}")


def train_many(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str | os.PathLike[str]], *,
               vmap: bool = True, form: str = "auto", log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Trains each config in its work directory, as one vmapped program where they stack (`stacking`).

    Args:
      configs: training configs that differ in `seed` and at most one numeric `loss` option
        (others train one after another).
      workdirs: one work directory per config; each gets what `saljax train` writes, and an
        unfinished run resumes from its newest readable checkpoint.
      vmap: False trains the runs one after another (`train_and_evaluate`).
      form: how the one program steps its runs (`FORMS`): "vmap" batches them (`jax.vmap`; what
        fills an accelerator), "map" runs them one after another inside the program
        (`jax.lax.map`); "auto" (default) is "vmap" on GPU and TPU and separate runs on CPU, where
        XLA's batched convolutions and matmuls made one program slower than separate runs
        (benchmarks/MANY_SEEDS.md).
      log: receives progress messages, including why runs do not stack (default: the
        "saljax.train" logger at INFO).

    Returns:
      Each run's results, as `train_and_evaluate` returns them, in the order of `configs`.
    """
    log = log or _log.info
    _check_arguments(configs, workdirs)
    _resolve_form(form)
    option, why_not = stacking(configs)
    if form == "auto" and jax.default_backend() == "cpu" and not why_not:
        why_not = _CPU_REASON
    if not vmap or why_not:
        if vmap and len(configs) > 1:
            log(f"training {len(configs)} runs one after another: {why_not}")
        return [loop.train_and_evaluate(c, w, log=log) for c, w in zip(configs, workdirs, strict=True)]
    paths, mesh, builder = loop.prepare(configs, workdirs)
    runs: list[loop.Run] = []
    results: list[dict[str, float] | None] = [None] * len(configs)
    try:
        for config, path in zip(configs, paths, strict=True):
            runs.append(loop.open_run(config, path, builder, log, read_ahead=len(configs) == 1))
        for start in sorted({r.start for r in runs}):  # runs stopped at different checkpoints: one group per step
            members = [i for i, r in enumerate(runs) if r.start == start]
            for indices, done in _train_members([runs[i] for i in members], members, option, builder, mesh, log, form):
                for i, result in zip(indices, done, strict=True):
                    results[i] = result
    finally:
        for run in runs:
            loop.close_run(run)
    return [r for r in results if r is not None]


def _train_members(runs: Sequence[loop.Run], indices: Sequence[int], option: str | None, builder: Any, mesh: Mesh,
                   log: Callable[[str], None], form: str) -> list[tuple[list[int], list[dict[str, float]]]]:
    """Trains runs that resume from the same step: stacked, or one by one when the loss cannot trace."""
    if len(runs) > 1:
        program = StackedProgram(runs, option, builder, mesh, form=form)
        if option is None or program.traces([r.state for r in runs], [_first_batch(r) for r in runs]):
            log(f"training {len(runs)} runs as one program ({program.form}) from step {runs[0].start}")
            return [(list(indices), loop.train_group(runs, program, log=log))]
        log(f"training {len(runs)} runs one after another: loss.{option} must be a Python number for this loss")
    return [([i], loop.train_group([r], loop.SingleProgram(r, builder, mesh), log=log))
            for i, r in zip(indices, runs, strict=True)]


def _first_batch(run: loop.Run) -> Batch:
    """The shapes of a batch of `run`, from a fresh iterator (the run's own keeps its position)."""
    state = run.iterator.get_state()
    batch = {k: jnp.asarray(v) for k, v in next(run.iterator).items()}
    run.iterator.set_state(state)
    return batch
