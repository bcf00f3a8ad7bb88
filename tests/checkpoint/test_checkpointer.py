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


@pytest.mark.parametrize("mode, keep_best, ranked, kept", [
    ("max", 1, [1, 2, 5], [5]), ("max", 2, [1, 2, 3, 5], [2, 5]),
    ("min", 1, [1, 6], [6]), ("min", 2, [1, 2, 4, 6], [1, 6]),
])
def test_ranks_among_best_is_what_the_policy_would_keep(tmp_path, mode, keep_best, ranked, kept):
    # Each step is asked before it is saved. Ties go to the earlier step (3 does not beat 2 for
    # "max", 7 does not beat 1 for "min"); whatever the policy keeps by metric was ranked when saved,
    # so skipping the steps that were not changes nothing it keeps.
    history = [(1, 0.5), (2, 0.9), (3, 0.9), (4, 0.7), (5, 0.95), (6, 0.1), (7, 0.5)]
    with checkpoint.Checkpointer(tmp_path, keep_best=keep_best, keep_latest=1, best_mode=mode, async_save=False) as ck:
        asked = []
        for step, value in history:
            if ck.ranks_among_best(step, {METRIC: value}):
                asked.append(step)
            ck.save(step, {"w": np.full(2, float(step))}, metrics={METRIC: value})
        ck.wait()
        assert asked == ranked and ck.steps() == [*kept, 7]


def test_ranks_among_best_reads_the_checkpoints_already_on_disk(tmp_path):
    with checkpoint.Checkpointer(tmp_path, keep_best=1, keep_latest=1, async_save=False) as ck:
        assert ck.ranks_among_best(1, {METRIC: 0.2})  # nothing ranked yet
        ck.save(1, {"w": np.ones(2)}, metrics={METRIC: 0.6})
        ck.save(2, {"w": np.ones(2)}, metrics={METRIC: 0.4})
    with checkpoint.Checkpointer(tmp_path, keep_best=1, keep_latest=1, async_save=False) as ck:  # a resume
        assert not ck.ranks_among_best(3, {METRIC: 0.6})  # a tie: the earlier step stays the best
        assert ck.ranks_among_best(3, {METRIC: 0.61})
        assert ck.move_aside(1).endswith("1.corrupt")  # the best gone, 2 is the one to beat
        assert ck.ranks_among_best(3, {METRIC: 0.5}) and not ck.ranks_among_best(3, {METRIC: 0.3})
    with checkpoint.Checkpointer(tmp_path, keep_best=0, async_save=False) as ck:
        assert not ck.ranks_among_best(3, {METRIC: 1.0})
    with checkpoint.Checkpointer(tmp_path, best_metric="", async_save=False) as ck:
        assert not ck.ranks_among_best(3, {METRIC: 1.0})


def test_ranks_among_best_refuses_what_save_refuses(tmp_path):
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        with pytest.raises(KeyError, match="metrics must hold the best_metric 'validation/accuracy'"):
            ck.ranks_among_best(1, {"validation/ce": 0.3})
        with pytest.raises(checkpoint.NonFiniteError, match="validation/accuracy = nan"):
            ck.ranks_among_best(1, {METRIC: float("nan")})
        with pytest.raises(checkpoint.NonFiniteError, match="validation/accuracy = inf"):
            ck.save(1, {"w": np.ones(2)}, metrics={METRIC: float("inf")})
        assert ck.steps() == []
