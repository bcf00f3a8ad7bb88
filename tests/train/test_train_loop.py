"""The training loop and `saljax train`: end to end, resume after SIGKILL, checkpoints, guards."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from saljax import checkpoint, cli, config, train, writers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "experiments", "configs")


def _args(dataset, method, workdir, data_dir, *extra):
    return ["train", "--config", os.path.join(CONFIGS, f"{dataset}.py:{method}"), "--workdir", str(workdir),
            f"dataset.data_dir={str(data_dir)!r}", "batch_size=8", "eval_batch_size=16", "num_devices=1",
            *TINY[dataset], *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.mark.parametrize("dataset, method", [
    ("decoy_digits", "gradmask"), ("synthetic_distractor", "rrr"), ("spurious_binary", "dd_paired")])
def test_train_runs_each_benchmark_end_to_end(dataset, method, data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = _args(dataset, method, workdir, data_dir, "num_steps=6", "eval_every=6", "log_every=2",
                 "checkpoint.every=3")
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert "final evaluation" in out.out and "validation/accuracy" in out.out
    assert "6/6" in out.err  # the progress bar
    rows = writers.read_metrics(workdir)
    # every log_every steps, and at each checkpoint (its metrics are checked before saving)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 3, 4, 6]
    assert all(np.isfinite(r["train/loss"]) and r["train/images_per_second"] > 0 for r in rows if "train/loss" in r)
    final = [r for r in rows if "validation/accuracy" in r][-1]
    assert final["step"] == 6 and 0.0 <= final["validation/saliency_inside"] <= 1.0
    if dataset == "spurious_binary":
        assert {"test_closed/roc_auc", "test_open/roc_auc", "validation/loss/dd_paired"} <= set(final)
    assert os.listdir(workdir / "tensorboard")
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["method"] == method and saved["model"]["num_classes"] == (10 if dataset == "decoy_digits" else 2)
    ck = checkpoint.Checkpointer(workdir)
    assert ck.latest_step() == 6
    ck.close()
    model, cfg = train.load_model(workdir)
    assert cfg.method == method and model.num_classes == cfg.model.num_classes


def _final_params(workdir):
    model, _ = train.load_model(workdir, step="latest")
    return jax.tree.map(np.asarray, nnx.state(model))


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(data_dir, tmp_path):
    steps = ["num_steps=240", "eval_every=240", "log_every=40", "checkpoint.every=40"]
    reference = tmp_path / "uninterrupted"
    assert cli.main(_args("decoy_digits", "ce", reference, data_dir, *steps, "progress=False")) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "saljax.cli", *_args("decoy_digits", "ce", killed, data_dir, *steps, "progress=False")]
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt_dir = killed / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [d for d in (os.listdir(ckpt_dir) if ckpt_dir.exists() else []) if d.isdigit()]
        if done and proc.poll() is None:
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ck = checkpoint.Checkpointer(killed)
    interrupted_at = ck.latest_step()
    ck.close()
    assert interrupted_at is not None and interrupted_at < 240
    assert cli.main(_args("decoy_digits", "ce", killed, data_dir, *steps, "progress=False")) == 0
    a, b = _final_params(reference), _final_params(killed)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
    rows = writers.read_metrics(killed)
    assert rows[-1]["step"] == 240


def test_corrupt_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path, caplog):
    workdir = tmp_path / "run"
    assert cli.main(_args("decoy_digits", "ce", workdir, data_dir, "num_steps=4", "eval_every=4",
                          "checkpoint.every=2", "checkpoint.keep_best=1", "progress=False")) == 0
    ck = checkpoint.Checkpointer(workdir)
    assert ck.steps() == [2, 4]
    # Overwrite every data file of the newest checkpoint's state with garbage.
    state_dir = workdir / "checkpoints" / "4" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                size = max(os.path.getsize(path), 1)
                f.write(os.urandom(size))
    cfg = checkpoint.load_config(workdir)
    _, target = train.init_from_config(cfg)
    with caplog.at_level("WARNING"):
        step, _ = ck.restore(target)
    assert step == 2
    assert "checkpoint 4" in caplog.text and "unreadable or corrupt" in caplog.text
    for root, _, files in os.walk(workdir / "checkpoints" / "2"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.write(os.urandom(max(os.path.getsize(path), 1)))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint could be restored"):
        ck.restore(target)
    ck.close()


def test_non_finite_loss_stops_the_run_and_saves_nothing_non_finite(data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli.main(_args("decoy_digits", "gradmask", workdir, data_dir, "num_steps=30", "eval_every=30",
                          "checkpoint.every=1", "log_every=100", "optimizer.learning_rate=1e30", "progress=False"))
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite loss at step" in err and ("loss/ce" in err or "loss/gradmask" in err or "gradient" in err)
    ck = checkpoint.Checkpointer(workdir)
    cfg = checkpoint.load_config(workdir)
    _, target = train.init_from_config(cfg)
    for step in ck.steps():
        _, state = ck.restore(target, step=step)
        assert not checkpoint.non_finite_leaves(state)
    ck.close()


def test_config_overrides_and_errors(tmp_path, capsys):
    cfg = config.load(os.path.join(CONFIGS, "decoy_digits.py:rrr"),
                      ["optimizer.learning_rate=1e-4", "dataset.eval_splits=('test',)", "loss.lam=3", "num_steps=7"])
    assert cfg.method == "rrr" and cfg.optimizer.learning_rate == 1e-4 and cfg.num_steps == 7
    assert cfg.dataset.eval_splits == ("test",) and cfg.loss.lam == 3
    with pytest.raises(ValueError, match="unknown config field 'optimizer.lr'"):
        config.load(os.path.join(CONFIGS, "decoy_digits.py"), ["optimizer.lr=1"])
    with pytest.raises(ValueError, match="must have the form key=value"):
        config.load(os.path.join(CONFIGS, "decoy_digits.py"), ["num_steps"])
    with pytest.raises(ValueError, match="override 'num_steps=abc'"):
        config.load(os.path.join(CONFIGS, "decoy_digits.py"), ["num_steps=abc"])
    assert cli.main(["train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path)]) == 2
    assert "missing.py does not exist" in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        train.load_model(tmp_path / "nowhere")


def test_config_changes_names_fields_and_ignores_what_training_fills_in():
    before = config.load(os.path.join(CONFIGS, "decoy_digits.py:ce"))
    after = config.load(os.path.join(CONFIGS, "decoy_digits.py:ce"), ["num_steps=7"])
    with after.unlocked():
        after.model.num_classes, after.model.in_channels = 10, 1
    assert checkpoint.config_changes(before, after) == ["num_steps"]
    assert checkpoint.config_changes(json.loads(before.to_json()), before) == []
