"""`saljax.checkpoint.Checkpointer`: the earliest-step tie rule, resume-invariant retention, moving aside."""

import os

import numpy as np
import pytest

from saljax import checkpoint

METRIC = "validation/accuracy"


def _save_all(directory, history, **kwargs):
    with checkpoint.Checkpointer(directory, async_save=False, **kwargs) as ck:
        for step, value in history:
            ck.save(step, {"w": np.full(2, float(step))}, metrics=None if value is None else {METRIC: value})
        ck.wait()
        return ck.steps(), ck.best_step()


HISTORY = [(1, 0.5), (2, 0.9), (3, None), (4, 0.9), (5, 0.7), (6, 0.9), (7, None)]


@pytest.mark.parametrize("mode, best", [("max", 2), ("min", 1)])
def test_ties_go_to_the_earliest_step(tmp_path, mode, best):
    steps, best_step = _save_all(tmp_path, HISTORY, keep_best=1, keep_latest=1, best_mode=mode)
    assert best_step == best and steps == sorted({best, 7})
    steps, _ = _save_all(tmp_path / "two", HISTORY, keep_best=2, keep_latest=1, best_mode=mode)
    assert steps == ([2, 4, 7] if mode == "max" else [1, 5, 7])


@pytest.mark.parametrize("split_at", [1, 2, 3, 4, 5, 6])
def test_a_resumed_run_keeps_what_an_uninterrupted_run_keeps(tmp_path, split_at):
    expected = _save_all(tmp_path / "whole", HISTORY, keep_best=2, keep_latest=2)
    _save_all(tmp_path / "parts", HISTORY[:split_at], keep_best=2, keep_latest=2)
    assert _save_all(tmp_path / "parts", HISTORY[split_at:], keep_best=2, keep_latest=2) == expected


def test_no_best_metric_keeps_only_the_latest(tmp_path):
    with checkpoint.Checkpointer(tmp_path, async_save=False, best_metric="", keep_latest=2) as ck:
        for step in range(1, 5):
            ck.save(step, {"w": np.ones(2)})
        ck.wait()
        assert ck.steps() == [3, 4] and ck.best_step() is None


def _corrupt(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.write(os.urandom(max(os.path.getsize(path), 1)))


def test_a_corrupt_checkpoint_is_moved_aside_not_deleted(tmp_path, caplog):
    _save_all(tmp_path, [(1, 0.1), (2, 0.2), (3, 0.3)], keep_best=3, keep_latest=3)
    _corrupt(tmp_path / "checkpoints" / "3" / "state")
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        with caplog.at_level("WARNING"):
            step, state = ck.restore({"w": np.zeros(2)}, move_corrupt=True)
        assert step == 2 and np.all(state["w"] == 2.0)
        assert ck.steps() == [1, 2]
    moved = tmp_path / "checkpoints" / "3.corrupt"
    assert moved.is_dir() and "checkpoint 3" in caplog.text and str(moved) in caplog.text
    # read-only restores leave the checkpoint where it is
    _corrupt(tmp_path / "checkpoints" / "2" / "state")
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        assert ck.restore({"w": np.zeros(2)})[0] == 1 and ck.steps() == [1, 2]
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint could be restored"):
            ck.restore({"w": np.zeros(2)}, step=2)


def test_checkpointer_refuses_non_finite_state(tmp_path):
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        with pytest.raises(checkpoint.NonFiniteError, match=r"non-finite values in \['w'\]"):
            ck.save(1, {"w": np.array([1.0, np.nan])})
        with pytest.raises(checkpoint.NonFiniteError, match="validation/accuracy = nan"):
            ck.save(1, {"w": np.ones(2)}, metrics={"validation/accuracy": float("nan")})
        assert ck.steps() == []


def test_keeps_best_by_metric_and_latest(tmp_path):
    with checkpoint.Checkpointer(tmp_path, keep_best=2, keep_latest=1, async_save=False) as ck:
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6), (5, None)]:
            ck.save(step, {"w": np.full(2, float(step))}, metrics=None if acc is None else {"validation/accuracy": acc})
        ck.wait()
        assert ck.steps() == [2, 3, 5] and ck.best_step() == 2
        step, restored = ck.restore({"w": np.zeros(2)}, step=2)
        np.testing.assert_array_equal(restored["w"], [2.0, 2.0])
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint for step 7"):
            ck.restore({"w": np.zeros(2)}, step=7)
