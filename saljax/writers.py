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
    The file is only appended to, one flushed line per row; a last line that a killed process left
    unfinished is cut off when the next writer opens the file, so every line stays one JSON object.
    """

    def __init__(self, directory: str | os.PathLike[str], *, tensorboard: bool = True):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, METRICS_FILE)
        _drop_unfinished_line(self.path)
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


def _drop_unfinished_line(path: str) -> None:
    """Truncates `path` after its last newline (a write interrupted mid-line leaves text after it)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0 or (f.seek(size - 1) is not None and f.read(1) == b"\n"):  # complete: the usual case
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def read_metrics(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.jsonl`."""
    with open(os.path.join(directory, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
