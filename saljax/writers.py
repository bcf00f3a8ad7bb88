"""Metric writers of a training run: JSON lines and TensorBoard event files (no TensorFlow)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from tensorboardX import SummaryWriter  # writes event files without TensorFlow

from saljax.workdir import METRICS_FILE

__all__ = ["MetricWriter", "read_metrics"]


class MetricWriter:
    """Appends `{"step": ..., **metrics}` to `metrics.jsonl` and to TensorBoard under `tensorboard/`.

    Only scalars are written; NaN and inf are written as JSON null/strings so the file stays valid.
    """

    def __init__(self, directory: str | os.PathLike[str], *, tensorboard: bool = True):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, METRICS_FILE)
        self._file = open(self.path, "a")  # noqa: SIM115 - open as long as the writer; closed by close()
        self._tb: SummaryWriter | None = None
        if tensorboard:
            self._tb = SummaryWriter(logdir=os.path.join(directory, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else str(value)
            if self._tb is not None:
                self._tb.add_scalar(key, value, int(step))
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.jsonl`."""
    with open(os.path.join(directory, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
