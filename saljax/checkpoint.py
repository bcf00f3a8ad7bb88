"""Orbax checkpoints of a training run: model, optimizer, step and data-iterator position.

`Checkpointer` saves under `<workdir>/checkpoints/<step>/` asynchronously (training goes on while
files are written), keeps the newest checkpoints plus the best `keep_best` by a validation metric,
refuses to write non-finite values, and restores the newest checkpoint that reads back. A corrupt
checkpoint is reported by step and, when asked, moved aside (renamed `<step>.corrupt`, never
deleted). Orbax writes each checkpoint into a temporary directory and renames it when complete, so
a process killed mid-save leaves no checkpoint that looks finished.

Ranking ties: among checkpoints with equal `best_metric`, the earliest step counts as better, both
for which ones are kept and for `best_step`. The rule depends only on the (step, metric) pairs on
disk, so a resumed run keeps, selects and deletes exactly the checkpoints an uninterrupted run
would.

All randomness of a run derives from its config's seed (model initialisation) and the data
iterator (shuffling and augmentation are seeded per example), so the state and the iterator
position are all a resume needs to continue bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp

from saljax.data import IteratorCheckpointRestore, IteratorCheckpointSave
from saljax.workdir import (  # re-exported: these names were importable from here before
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CheckpointError,
    NonFiniteError,
    config_changes,
    load_config,
    save_config,
)

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "CheckpointError",
    "Checkpointer",
    "NonFiniteError",
    "config_changes",
    "load_config",
    "non_finite_leaves",
    "save_config",
]

log = logging.getLogger(__name__)

_METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's per-step metadata (commit time, metrics)
_CORRUPT_SUFFIX = ".corrupt"  # not a step name for Orbax: it reads only digits (or <prefix>_<digits>)


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of the leaves of `tree` that hold NaN or inf (empty when all are finite)."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(jax.device_get(leaf))
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            bad.append(jax.tree_util.keystr(path))
    return bad


def _rank(scored: Sequence[tuple[int, float]], mode: str) -> list[int]:
    """Steps ordered best first: by metric (`mode` "max" or "min"), earlier step first on ties."""
    sign = -1.0 if mode == "max" else 1.0
    return [step for step, _ in sorted(scored, key=lambda item: (sign * item[1], item[0]))]


def _unreadable_metadata(root: str) -> list[tuple[int, str]]:
    """(step, error) of the checkpoints under `root` whose metadata file is not valid JSON."""
    bad = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, _METADATA_FILE)
        if not (name.isdigit() and os.path.isfile(path)):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            bad.append((int(name), f"{type(error).__name__}: {str(error)[:200]}"))
    return bad


def _data_item(handler: Any, iterator: Any) -> Any:
    if handler is None:  # saljax.data leaves it None for grain versions without iterator checkpoints
        raise CheckpointError("the installed grain cannot checkpoint data iterators; upgrade grain")
    return handler(iterator)


def _move_aside(root: str, step: int) -> str:
    source = os.path.join(root, str(step))
    target = source + _CORRUPT_SUFFIX
    n = 1
    while os.path.exists(target):
        target, n = f"{source}{_CORRUPT_SUFFIX}-{n}", n + 1
    os.rename(source, target)
    return target


@dataclasses.dataclass(kw_only=True)
class _BestN:
    """Orbax preservation policy: keeps the `n` best checkpoints by metric, earliest step on ties.

    Unlike Orbax's own `BestN` (which keeps the later of tied checkpoints, in whatever order it
    holds them), the decision depends only on each checkpoint's step and metric.
    """

    get_metric_fn: Callable[[Any], float]
    mode: str
    n: int

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        scored = [(info.step, float(self.get_metric_fn(info.metrics))) for info in checkpoints if info.metrics]
        keep = set(_rank(scored, self.mode)[: self.n])
        return [info.step in keep for info in checkpoints]


class Checkpointer:
    """Saves and restores `TrainState`s (and data iterators) under `directory/checkpoints`.

    Args:
      directory: the run's work directory.
      keep_best: how many checkpoints to keep by `best_metric` (besides the latest ones).
      keep_latest: how many of the newest checkpoints to keep; 2 leaves a fallback when the newest
        turns out corrupt.
      best_metric: key of the metrics passed to `save` that ranks checkpoints; "" ranks none.
      best_mode: "max" (accuracy, AUC) or "min" (loss).
      async_save: write in a background thread.
      move_corrupt: move corrupt checkpoints aside (`move_aside`) when they are found, on opening
        (an unreadable `_CHECKPOINT_METADATA`, which Orbax cannot open the directory past) and in
        `restore`. Without it, opening a directory with such a checkpoint raises CheckpointError.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_best: int = 1,
        keep_latest: int = 2,
        best_metric: str = "validation/accuracy",
        best_mode: str = "max",
        async_save: bool = True,
        move_corrupt: bool = False,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min'; got {best_mode!r}")
        if keep_best < 0 or keep_latest < 1:
            raise ValueError(f"keep_best must be >= 0 and keep_latest >= 1; got {keep_best}, {keep_latest}")
        self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.move_corrupt = move_corrupt
        root = os.path.join(self.directory, CHECKPOINT_DIR)
        for step, error in _unreadable_metadata(root):
            message = f"checkpoint {step} in {root} is corrupt (its {_METADATA_FILE}: {error})"
            if not move_corrupt:
                raise CheckpointError(f"{message}; rename or remove {os.path.join(root, str(step))}")
            log.warning("%s; moved aside to %s", message, _move_aside(root, step))
        policies = ocp.checkpoint_managers
        policy: Any = policies.LatestN(n=keep_latest)
        kwargs: dict[str, Any] = {}
        if best_metric:
            metric_of = self._metric_of
            policy = policies.AnyPreservationPolicy([policy, _BestN(get_metric_fn=metric_of, mode=best_mode, n=keep_best)])
            # best_fn makes Orbax write each checkpoint's metrics to disk, so a resumed run still
            # knows which checkpoints are best; the preservation policy decides what is kept.
            kwargs = {"best_fn": metric_of, "best_mode": best_mode}
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, **kwargs)
        self._manager = ocp.CheckpointManager(root, options=options)
        self.keep_best = keep_best
        self._scores: dict[int, float] | None = None  # step -> best_metric of the ranked checkpoints; read on first use

    def _metric_of(self, metrics: Mapping[str, float]) -> float:
        return metrics[self.best_metric]

    def save(self, step: int, state: Any, *, data_iterator: Any = None, metrics: Mapping[str, float] | None = None) -> None:
        """Starts saving `state` (and the iterator position) as checkpoint `step`.

        Raises NonFiniteError, writing nothing, when a parameter or a metric is NaN or inf.
        """
        bad = non_finite_leaves(state)
        if bad:
            raise NonFiniteError(f"not saving checkpoint {step}: non-finite values in {', '.join(bad[:5])}")
        score = None
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
            score = self._metric_value(step, metrics)
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = _data_item(IteratorCheckpointSave, data_iterator)
        scores = self._ranked() if self.best_metric else None  # read before this save is in flight
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        if scores is not None and score is not None:
            scores[step] = score

    def _ranked(self) -> dict[int, float]:
        """step -> best_metric of the ranked checkpoints: read from disk on first use (before any save
        of this object is in flight), then kept up to date by `save` and `move_aside`."""
        if self._scores is None:
            self._scores = {s: float(self._metric_of(m)) for s in self.steps()
                            if (m := self._metrics(s)) and self.best_metric in m}
        return self._scores

    def _metric_value(self, step: int, metrics: Mapping[str, float]) -> float:
        """`metrics[best_metric]`; KeyError without it, NonFiniteError when it is NaN or inf."""
        if self.best_metric not in metrics:
            raise KeyError(f"metrics must hold the best_metric {self.best_metric!r}; got {sorted(metrics)}")
        value = float(self._metric_of(metrics))
        if not np.isfinite(value):
            raise NonFiniteError(f"not saving checkpoint {step}: {self.best_metric} = {value}")
        return value

    def ranks_among_best(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Whether checkpoint `step` with `metrics` would be kept among the `keep_best` best.

        That is: fewer than `keep_best` checkpoints are ranked yet, or its `best_metric` is strictly
        better than the `keep_best`-th best so far (a tie goes to the earlier step). The training
        loop saves an evaluation's checkpoint only then (or when a save is due anyway): one that
        would be deleted at once costs a full write. False without `best_metric` or `keep_best`.
        Raises as `save` would for these metrics (KeyError, NonFiniteError).
        """
        if not self.best_metric or not self.keep_best:
            return False
        scored = [(s, v) for s, v in self._ranked().items() if s != step]
        scored.append((step, self._metric_value(step, metrics)))
        return step in _rank(scored, self.best_mode)[: self.keep_best]

    def _restore_state(self, step: int, abstract: Any, data_iterator: Any) -> Any:
        """Checkpoint `step` in the structure of `abstract` (and the iterator position, in place)."""

        def restore(item: Any) -> Any:
            items: dict[str, Any] = {"state": ocp.args.StandardRestore(item)}
            if data_iterator is not None:
                items["data"] = _data_item(IteratorCheckpointRestore, data_iterator)
            return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

        try:
            return restore(abstract)
        except ValueError as error:
            # A checkpoint written before a NamedTuple field existed (TrainState.loss_state) lacks it:
            # when the target's value of that field is None, read the others and keep None.
            fields = getattr(abstract, "_fields", ())
            present = {f: getattr(abstract, f) for f in fields if getattr(abstract, f) is not None}
            if "do not match" not in str(error) or len(present) == len(fields):
                raise
            try:
                return abstract._replace(**restore(present))
            except Exception:  # noqa: BLE001 - the first error is the one to report
                raise error from None

    def steps(self) -> list[int]:
        """The complete checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _metrics(self, step: int) -> Mapping[str, float] | None:
        try:
            return self._manager.metrics(step)
        except Exception as error:  # noqa: BLE001 - unreadable metrics leave the checkpoint unranked
            log.warning("checkpoint %d: its metrics are unreadable (%s: %s)", step, type(error).__name__, error)
            return None

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric`, the earliest on ties (None when none is ranked)."""
        if not self.best_metric:
            return None
        scored = [(s, float(m[self.best_metric])) for s in self.steps()
                  if (m := self._metrics(s)) and self.best_metric in m]
        return _rank(scored, self.best_mode)[0] if scored else None

    def move_aside(self, step: int) -> str:
        """Renames checkpoint `step` to `<step>.corrupt` (never deletes it); returns the new path."""
        target = _move_aside(os.fspath(self._manager.directory), step)
        self._manager.reload()
        self._scores = None  # re-read: a checkpoint the policy had deleted may now rank among the best
        return target

    def restore(self, target: Any, *, data_iterator: Any = None, step: int | None = None,
                move_corrupt: bool | None = None) -> tuple[int, Any]:
        """Restores the newest readable checkpoint (or `step`) into the structure of `target`.

        `target` is a state of the same structure (e.g. freshly initialised); shapes and dtypes
        come from it. With `data_iterator`, its position is restored too (in place). A checkpoint
        that fails to read is reported (a warning naming its step) and, without `step`, the
        previous one tried; with `move_corrupt`, it is also moved aside (`move_aside`) so that
        later runs and Orbax's clean-up no longer see it (default: the constructor's
        `move_corrupt`). CheckpointError when none reads.

        Returns:
          (step, state).
        """
        move_corrupt = self.move_corrupt if move_corrupt is None else move_corrupt
        steps = self.steps()
        candidates = [step] if step is not None else steps[::-1]
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: {steps}")
        if not candidates:
            raise CheckpointError(f"no checkpoint in {os.path.join(self.directory, CHECKPOINT_DIR)}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        errors = []
        for candidate in candidates:
            try:
                state = self._restore_state(candidate, abstract, data_iterator)
                bad = non_finite_leaves(state)
                if bad:
                    raise CheckpointError(f"non-finite values in {', '.join(bad[:5])}")
            except Exception as error:  # noqa: BLE001 - any failure to read means: try the previous one
                message = (f"checkpoint {candidate} in {self._manager.directory} is unreadable or corrupt"
                           f" ({type(error).__name__}: {str(error)[:300]})")
                errors.append(message)
                if move_corrupt:
                    message += f"; moved aside to {self.move_aside(candidate)}"
                log.warning("%s%s", message, "; trying an earlier checkpoint" if step is None else "")
                continue
            if errors:
                log.warning("restored checkpoint %d instead", candidate)
            return candidate, state
        raise CheckpointError(f"no checkpoint could be restored ({len(errors)} tried): " + "; ".join(errors))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
