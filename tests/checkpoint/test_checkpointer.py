"""`saljax.checkpoint.Checkpointer`: what it keeps (ties, resumes and corrupt checkpoints: tests/test_bad_input.py)."""


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


def test_no_best_metric_keeps_only_the_latest(tmp_path):
    with checkpoint.Checkpointer(tmp_path, async_save=False, best_metric="", keep_latest=2) as ck:
        for step in range(1, 5):
            ck.save(step, {"w": np.ones(2)})
        ck.wait()
        assert ck.steps() == [3, 4] and ck.best_step() is None


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


def test_a_checkpoint_written_before_loss_state_existed_still_restores(tmp_path):
    from saljax.train import TrainState

    # TrainState gained `loss_state` (None unless a loss term keeps state): the checkpoints of older
    # runs hold only the other four fields, and must restore into today's TrainState.
    old = {"step": np.array(3, np.int32), "params": {"w": np.full(2, 3.0)}, "model_state": {}, "opt_state": {"m": np.ones(2)}}
    target = TrainState(np.array(0, np.int32), {"w": np.zeros(2)}, {}, {"m": np.zeros(2)})
    with checkpoint.Checkpointer(tmp_path, best_metric="", async_save=False) as ck:
        ck.save(3, old)
        step, restored = ck.restore(target)
        assert step == 3 and isinstance(restored, TrainState) and restored.loss_state is None
        np.testing.assert_array_equal(restored.params["w"], [3.0, 3.0])
        # Today's runs (loss_state None) restore as they were saved.
        ck.save(4, target._replace(step=np.array(4, np.int32)))
        step, restored = ck.restore(target, step=4)
        assert step == 4 and restored.loss_state is None
