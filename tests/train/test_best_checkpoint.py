"""Best-validation checkpoint selection in `train_and_evaluate`: results, printing, resume invariance."""

import os

import numpy as np
import pytest
from conftest import TINY

from saljax import checkpoint, cli, config, train, writers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "decoy_digits.py:ce")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _config(data_dir, *extra):
    return config.load(CONFIG, [f"dataset.data_dir={str(data_dir)!r}", "batch_size=8", "eval_batch_size=16",
                                "num_devices=1", "progress=False", "eval_every=2", "checkpoint.every=2",
                                "checkpoint.keep_best=1", "checkpoint.keep_latest=1", *TINY["decoy_digits"], *extra])


def _kept(workdir):
    with checkpoint.Checkpointer(workdir) as ck:
        return ck.steps()


@pytest.mark.slow
def test_best_checkpoint_is_evaluated_and_a_resume_selects_the_same_one(data_dir, tmp_path):
    # validation/count is the same at every evaluation: every checkpoint ties, the earliest wins.
    tie = ["checkpoint.best_metric='validation/count'"]
    whole = train.train_and_evaluate(_config(data_dir, "num_steps=8", *tie), tmp_path / "whole")
    assert whole["final/step"] == 8 and whole["best/step"] == 2
    assert _kept(tmp_path / "whole") == [2, 8]
    evaluations = {r["step"]: r for r in writers.read_metrics(tmp_path / "whole") if "validation/accuracy" in r}
    for key in ("validation/accuracy", "validation/ce", "test/accuracy"):
        assert whole[f"best/{key}"] == pytest.approx(evaluations[2][key], rel=1e-6)
        assert whole[key] == pytest.approx(evaluations[8][key], rel=1e-6)

    parts = tmp_path / "parts"
    half = train.train_and_evaluate(_config(data_dir, "num_steps=4", *tie), parts)
    assert half["best/step"] == 2 and _kept(parts) == [2, 4]
    resumed = train.train_and_evaluate(_config(data_dir, "num_steps=8", *tie), parts)
    assert _kept(parts) == _kept(tmp_path / "whole")
    assert resumed == whole  # bit for bit: same steps, same data order, same selection

    # the default metric ranks by validation accuracy; best/* is that checkpoint's evaluation
    acc = train.train_and_evaluate(_config(data_dir, "num_steps=8", "optimizer.learning_rate=0.01"), tmp_path / "acc")
    rows = {r["step"]: r["validation/accuracy"] for r in writers.read_metrics(tmp_path / "acc") if "validation/accuracy" in r}
    best = min((-v, s) for s, v in rows.items())[1]
    assert acc["best/step"] == best and acc["best/validation/accuracy"] == pytest.approx(rows[best])


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
