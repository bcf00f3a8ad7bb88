"""Best-validation checkpoint selection in `train_and_evaluate`: results and printing."""

import os

import numpy as np
import pytest
from conftest import TINY

from saljax import checkpoint, cli, config, train, writers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "decoy_digits.py:ce")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _config(data_dir, *extra):
    return config.load(CONFIG, [f"dataset.data_dir={str(data_dir)!r}", "batch_size=8", "eval_batch_size=16",
                                "num_devices=1", "progress=False", "eval_every=2", "checkpoint.every=2",
                                "checkpoint.keep_best=1", "checkpoint.keep_latest=1", *TINY["decoy_digits"],
                                # four convs: the two-conv tiny model barely learns in 8 steps, and these
                                # tests need validation accuracy that moves (records at different steps)
                                "model.kwargs.channels=(8,8,8,8)", *extra])


@pytest.fixture
def saved_steps(monkeypatch):
    """Work directory name -> the steps `Checkpointer.save` was called with, in order."""
    saved, save = {}, checkpoint.Checkpointer.save

    def recording_save(self, step, *args, **kwargs):
        saved.setdefault(os.path.basename(self.directory), []).append(step)
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", recording_save)
    return saved


def _accuracy_by_step(workdir) -> dict[int, float]:
    return {r["step"]: r["validation/accuracy"] for r in writers.read_metrics(workdir) if "validation/accuracy" in r}


def _best_step(rows: dict[int, float]) -> int:
    """The step of the highest accuracy; ties go to the earliest."""
    return min((-v, s) for s, v in rows.items())[1]


def _records(rows: dict[int, float]) -> set[int]:
    """The steps whose accuracy beats every earlier one."""
    return {s for s in rows if all(rows[s] > rows[t] for t in rows if t < s)}


@pytest.mark.slow
def test_the_default_metric_ranks_by_validation_accuracy(data_dir, tmp_path, saved_steps):
    # best/* is the evaluation of the checkpoint with the best validation accuracy (ties and resumes:
    # tests/test_bad_input.py). With no regular save before the last step, an evaluation's checkpoint
    # is written only when it beats every earlier one.
    acc = train.train_and_evaluate(_config(data_dir, "num_steps=8", "optimizer.learning_rate=0.01",
                                           "checkpoint.every=100"), tmp_path / "acc")
    rows = _accuracy_by_step(tmp_path / "acc")
    best = _best_step(rows)
    assert acc["best/step"] == best and acc["best/validation/accuracy"] == pytest.approx(rows[best])
    assert saved_steps["acc"] == sorted(_records(rows) | {8}), rows  # here [2, 8]: accuracy falls after step 2


@pytest.mark.slow
def test_a_group_saves_its_runs_together_when_one_ranks(data_dir, tmp_path, saved_steps):
    # Two seeds stepped as one program: an evaluation's checkpoints are written for both runs when
    # either run's ranks among its best, so that an interrupted group resumes from one step.
    configs = [_config(data_dir, "num_steps=8", "optimizer.learning_rate=0.03", "checkpoint.every=100", f"seed={s}")
               for s in (0, 2)]
    results = train.train_many(configs, [tmp_path / "s0", tmp_path / "s2"], form="vmap")
    records = []
    for name, result in zip(("s0", "s2"), results, strict=True):
        rows = _accuracy_by_step(tmp_path / name)
        records.append(_records(rows))
        assert result["best/step"] == _best_step(rows)
    assert records[0] != records[1], records  # here {2} and {2, 4, 6}: the runs rank at different steps
    assert saved_steps["s0"] == saved_steps["s2"] == sorted(records[0] | records[1] | {8}), saved_steps


def test_cli_prints_final_and_best_columns(capsys):
    results = {"validation/accuracy": 0.5, "test/accuracy": 0.25, "final/step": 8.0,
               "best/validation/accuracy": 0.75, "best/test/accuracy": 0.5, "best/step": 4.0}
    table = cli.format_results(results, "validation/accuracy")
    header, *rows = table.splitlines()
    assert "final (step 8)" in header and "best by validation/accuracy (step 4)" in header
    assert rows[0].split() == ["test/accuracy", "0.2500", "0.5000"]
    assert rows[1].split() == ["validation/accuracy", "0.5000", "0.7500"]
    only_final = cli.format_results({"validation/accuracy": 0.5, "final/step": 3.0})
    assert "final (step 3)" in only_final and "best" not in only_final
    assert np.isfinite(results["best/step"])
