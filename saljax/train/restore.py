"""The model of a training run, read back from its work directory."""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections

from saljax import checkpoint, models
from saljax import workdir as workdir_lib
from saljax.train.from_config import init_from_config
from saljax.train.state import merge

__all__ = ["load_model"]

_log = logging.getLogger("saljax.train")


def load_model(directory: str | os.PathLike[str], *, step: int | str = "best", with_step: bool = False) -> Any:
    """The model of a finished or running training run, in eval mode, and its config.

    Args:
      directory: the run's work directory (`saljax train --workdir`).
      step: "best" (by the run's `checkpoint.best_metric`, the earliest on ties; the latest if none
        was recorded), "latest", or a step number. When that checkpoint cannot be read, the newest
        readable one is used instead, with a warning naming both steps (the checkpoints are left
        as they are).
      with_step: also return the step of the checkpoint used.

    Returns:
      (nnx.Module in eval mode, ml_collections.ConfigDict), or (module, config, step) with
      `with_step`. Raises CheckpointError (one line naming the path) when the directory, its
      config.json or every checkpoint is missing or unreadable.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise checkpoint.CheckpointError(f"checkpoint directory {directory} does not exist")
    config: ml_collections.ConfigDict = workdir_lib.load_config(directory)
    model_def, target = init_from_config(config)
    ck = config.get("checkpoint", ml_collections.ConfigDict())
    with checkpoint.Checkpointer(directory, best_metric=ck.get("best_metric", ""), best_mode=ck.get("best_mode", "max"),
                                 async_save=False) as checkpointer:
        wanted: int | None
        if step == "best":
            wanted = checkpointer.best_step()
        elif step == "latest":
            wanted = None
        elif isinstance(step, int) and not isinstance(step, bool):
            wanted = step
        else:
            raise ValueError(f"step must be 'best', 'latest' or a step number; got {step!r}")
        try:
            used, state = checkpointer.restore(target, step=wanted)
        except checkpoint.CheckpointError as error:
            if wanted is None:
                raise
            # the checkpointer has logged why it cannot be read
            _log.warning("checkpoint %d of %s cannot be read (%s); using the newest readable checkpoint instead", wanted,
                         directory, type(error).__name__)
            used, state = checkpointer.restore(target)
            _log.warning("loaded checkpoint %d of %s instead of the requested %s (%d)", used, directory, step, wanted)
        else:
            _log.info("loaded checkpoint %d of %s (%s)", used, directory, step)
    model = models.in_mode(merge(model_def, state), train=False)
    return (model, config, used) if with_step else (model, config)
