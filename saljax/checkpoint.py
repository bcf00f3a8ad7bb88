"""Orbax checkpoints of a training run: model, optimizer, step and data-iterator position.

A run's work directory holds

    config.json            the training config (ml_collections, as JSON)
    checkpoints/<step>/    Orbax checkpoints: `state` (the TrainState) and `data` (grain iterator)
    metrics.jsonl          one JSON object per logged step
    tensorboard/           TensorBoard event files

`Checkpointer` saves asynchronously (training goes on while files are written), keeps the newest
checkpoints plus the best `keep_best` by a validation metric, refuses to write non-finite values,
and restores the newest checkpoint that reads back, skipping a corrupt one with a message. Orbax
writes each checkpoint into a temporary directory and renames it when complete, so a process killed
mid-save leaves no checkpoint that looks finished.

All randomness of a run derives from its config's seed (model initialisation) and the data
iterator (shuffling and augmentation are seeded per example), so the state and the iterator
position are all a resume needs to continue bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteError(FloatingPointError):
    """A loss or a parameter became NaN or inf."""


class CheckpointError(RuntimeError):
    """No usable checkpoint could be read."""


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of the leaves of `tree` that hold NaN or inf (empty when all are finite)."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(jax.device_get(leaf))
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            bad.append(jax.tree_util.keystr(path))
    return bad


class Checkpointer:
    """Saves and restores `TrainState`s (and data iterators) under `directory/checkpoints`.

    Args:
      directory: the run's work directory.
      keep_best: how many checkpoints to keep by `best_metric` (besides the latest ones).
      keep_latest: how many of the newest checkpoints to keep; 2 leaves a fallback when the newest
        turns out corrupt.
      best_metric: key of the metrics passed to `save` that ranks checkpoints.
      best_mode: "max" (accuracy, AUC) or "min" (loss).
      async_save: write in a background thread.
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
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min'; got {best_mode!r}")
        if keep_best < 0 or keep_latest < 1:
            raise ValueError(f"keep_best must be >= 0 and keep_latest >= 1; got {keep_best}, {keep_latest}")
        self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
        self.best_metric = best_metric
        self.best_mode = best_mode
        policies = ocp.checkpoint_managers
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep_latest),
            policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=keep_best,
                           keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes Orbax write each checkpoint's metrics to disk, so a resumed run still knows
        # which checkpoints are best; the preservation policy decides what is kept.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda m: m[best_metric], best_mode=best_mode,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(os.path.join(self.directory, CHECKPOINT_DIR), options=options)

    def save(self, step: int, state: Any, *, data_iterator: Any = None, metrics: Mapping[str, float] | None = None) -> None:
        """Starts saving `state` (and the iterator position) as checkpoint `step`.

        Raises NonFiniteError, writing nothing, when a parameter or a metric is NaN or inf.
        """
        bad = non_finite_leaves(state)
        if bad:
            raise NonFiniteError(f"not saving checkpoint {step}: non-finite values in {', '.join(bad[:5])}")
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
            if self.best_metric not in metrics:
                raise KeyError(f"metrics must hold the best_metric {self.best_metric!r}; got {sorted(metrics)}")
            if not np.isfinite(metrics[self.best_metric]):
                raise NonFiniteError(f"not saving checkpoint {step}: {self.best_metric} = {metrics[self.best_metric]}")
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            from saljax.data import IteratorCheckpointSave

            items["data"] = IteratorCheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def steps(self) -> list[int]:
        """The complete checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The kept step with the best `best_metric` (None when no checkpoint carries metrics)."""
        scored = [(s, m[self.best_metric]) for s in self.steps()
                  if (m := self._manager.metrics(s)) and self.best_metric in m]
        if not scored:
            return None
        pick = max if self.best_mode == "max" else min
        return pick(scored, key=lambda item: item[1])[0]

    def restore(self, target: Any, *, data_iterator: Any = None, step: int | None = None) -> tuple[int, Any]:
        """Restores the newest readable checkpoint (or `step`) into the structure of `target`.

        `target` is a state of the same structure (e.g. freshly initialised); shapes and dtypes
        come from it. With `data_iterator`, its position is restored too (in place). A checkpoint
        that fails to read is reported and the previous one tried; CheckpointError when none reads.

        Returns:
          (step, state).
        """
        steps = self.steps()
        candidates = [step] if step is not None else steps[::-1]
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: {steps}")
        if not candidates:
            raise CheckpointError(f"no checkpoint in {os.path.join(self.directory, CHECKPOINT_DIR)}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        errors = []
        for candidate in candidates:
            items = {"state": ocp.args.StandardRestore(abstract)}
            if data_iterator is not None:
                from saljax.data import IteratorCheckpointRestore

                items["data"] = IteratorCheckpointRestore(data_iterator)
            try:
                restored = self._manager.restore(candidate, args=ocp.args.Composite(**items))
                state = restored["state"]
                bad = non_finite_leaves(state)
                if bad:
                    raise CheckpointError(f"non-finite values in {', '.join(bad[:5])}")
            except Exception as error:  # noqa: BLE001 - any failure to read means: try the previous one
                message = f"checkpoint {candidate} in {self._manager.directory} is unreadable or corrupt ({type(error).__name__}: {str(error)[:300]})"
                errors.append(message)
                log.warning("%s; trying an earlier checkpoint", message)
                continue
            if errors:
                log.warning("restored checkpoint %d instead", candidate)
            return candidate, state
        raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_config(directory: str | os.PathLike[str], config: Any) -> None:
    """Writes the training config as JSON (`config.json`)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True) if hasattr(config, "to_json") else json.dumps(config, indent=2))


def config_changes(old: Any, new: Any) -> list[str]:
    """The top-level fields in which two training configs (ConfigDicts or dicts) differ, sorted.

    `model.num_classes` and `model.in_channels` are ignored: training fills them in from the
    dataset, so a config before training and the same config after it compare equal.
    """

    def plain(config: Any) -> dict[str, Any]:
        c = json.loads(config.to_json() if hasattr(config, "to_json") else json.dumps(config, default=str))
        for key in ("num_classes", "in_channels"):
            c.get("model", {}).pop(key, None)
        return c

    a, b = plain(old), plain(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def load_config(directory: str | os.PathLike[str]):
    """The `ml_collections.ConfigDict` a run in `directory` was trained with."""
    import ml_collections

    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: {directory} is not a saljax work directory")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_model(directory: str | os.PathLike[str], *, step: int | str = "best"):
    """The model of a finished or running training run, in eval mode, and its config.

    Args:
      directory: the run's work directory (`saljax train --workdir`).
      step: "best" (by the run's best metric; the latest if none was recorded), "latest", or a
        step number.

    Returns:
      (nnx.Module in eval mode, ml_collections.ConfigDict).
    """
    from flax import nnx

    from saljax import train

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = load_config(directory)
    model_def, target = train.init_from_config(config)
    with Checkpointer(directory, best_metric=config.checkpoint.best_metric,
                      best_mode=config.checkpoint.best_mode, async_save=False) as checkpointer:
        if step == "best":
            step = checkpointer.best_step()
        elif step == "latest":
            step = None
        _, state = checkpointer.restore(target, step=step)
    model = train.merge(model_def, state)
    return nnx.view(model, use_running_average=True), config
