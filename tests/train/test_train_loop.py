"""The training loop and `saljax train`: end to end on each benchmark, config overrides and changes.

Bad input, corrupt checkpoints, NaN stops and kills during saves: tests/test_bad_input.py.
"""

import json
import os

import numpy as np
import pytest
from conftest import TINY

from saljax import checkpoint, cli, config, train, writers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "experiments", "configs")


def _args(dataset, method, workdir, data_dir, *extra):
    return ["train", "--config", os.path.join(CONFIGS, f"{dataset}.py:{method}"), "--workdir", str(workdir),
            f"dataset.data_dir={str(data_dir)!r}", "batch_size=8", "eval_batch_size=16", "num_devices=1",
            *TINY[dataset], *extra]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


# Slow: each trains for 5-8 s on 2 cores (in the fast tier, tests/test_bad_input.py's `trained` fixture trains
# end to end).
@pytest.mark.slow
@pytest.mark.parametrize("dataset, method", [("decoy_digits", "gradmask"), ("synthetic_distractor", "rrr"),
                                             ("spurious_binary", "dd_paired")])
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


def test_config_overrides(tmp_path):
    cfg = config.load(os.path.join(CONFIGS, "decoy_digits.py:rrr"),
                      ["optimizer.learning_rate=1e-4", "dataset.eval_splits=('test',)", "loss.lam=3", "num_steps=7"])
    assert cfg.method == "rrr" and cfg.optimizer.learning_rate == 1e-4 and cfg.num_steps == 7
    assert cfg.dataset.eval_splits == ("test",) and cfg.loss.lam == 3


def test_config_changes_names_fields_and_ignores_what_training_fills_in():
    before = config.load(os.path.join(CONFIGS, "decoy_digits.py:ce"))
    after = config.load(os.path.join(CONFIGS, "decoy_digits.py:ce"), ["num_steps=7"])
    with after.unlocked():
        after.model.num_classes, after.model.in_channels = 10, 1
    assert checkpoint.config_changes(before, after) == ["num_steps"]
    assert checkpoint.config_changes(json.loads(before.to_json()), before) == []
