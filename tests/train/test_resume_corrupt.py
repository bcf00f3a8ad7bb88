"""Resuming past corrupt checkpoints, `load_model`'s fallback, and model fields filled in from the data."""

import json
import logging
import os

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
                                "checkpoint.keep_best=1", "checkpoint.keep_latest=1",
                                "checkpoint.best_metric='validation/count'", *TINY["decoy_digits"], *extra])


def _corrupt(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.write(os.urandom(max(os.path.getsize(path), 1)))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["newest", "oldest"])
def test_training_resumes_past_a_corrupt_checkpoint_of_any_age(data_dir, tmp_path, caplog, which):
    run = tmp_path / "run"
    train.train_and_evaluate(_config(data_dir, "num_steps=4"), run)
    with checkpoint.Checkpointer(run) as ck:
        assert ck.steps() == [2, 4]  # 2: the best (every step ties on validation/count), 4: the latest
    step = 4 if which == "newest" else 2
    _corrupt(run / "checkpoints" / str(step))
    with caplog.at_level(logging.WARNING, logger="saljax"):
        results = train.train_and_evaluate(_config(data_dir, "num_steps=8"), run)
    assert results["final/step"] == 8
    assert (run / "checkpoints" / f"{step}.corrupt").is_dir()
    assert f"checkpoint {step} " in caplog.text and f"{step}.corrupt" in caplog.text
    with checkpoint.Checkpointer(run) as ck:
        if which == "newest":  # resumed from 2, which stays the best
            assert ck.steps() == [2, 8] and results["best/step"] == 2
        else:  # resumed from 4; the corrupt best is found at the end, the next best is 4
            assert ck.steps() == [4, 8] and results["best/step"] == 4
    assert writers.read_metrics(run)[-1]["step"] == 8

    model, cfg, used = train.load_model(run, step="latest", with_step=True)
    assert used == 8 and model.num_classes == cfg.model.num_classes


@pytest.mark.slow
def test_load_model_falls_back_to_the_newest_readable_checkpoint(data_dir, tmp_path, caplog):
    run = tmp_path / "run"
    train.train_and_evaluate(_config(data_dir, "num_steps=6", "checkpoint.keep_latest=2"), run)
    with checkpoint.Checkpointer(run, best_metric="validation/count") as ck:
        assert ck.steps() == [2, 4, 6] and ck.best_step() == 2
    _corrupt(run / "checkpoints" / "2" / "state")
    with caplog.at_level(logging.WARNING, logger="saljax"):
        _, _, used = train.load_model(run, with_step=True)
    assert used == 6 and "loaded checkpoint 6 of" in caplog.text and "instead of the requested best (2)" in caplog.text
    _corrupt(run / "checkpoints" / "6" / "state")
    assert train.load_model(run, step="latest", with_step=True)[2] == 4
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6"]  # loading never moves anything


@pytest.mark.slow
def test_mlp_head_gets_its_input_size_from_the_dataset(data_dir, tmp_path, capsys):
    args = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "run"), f"dataset.data_dir={str(data_dir)!r}",
            "batch_size=8", "eval_batch_size=16", "num_devices=1", "progress=False", "num_steps=2", "eval_every=2",
            *TINY["decoy_digits"], "model.kwargs.head_type='mlp'", "model.kwargs.mlp_hidden=8"]
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["input_size"] == [16, 16] and "input_size" not in saved["model"]["kwargs"]
    model, _ = train.load_model(tmp_path / "run")
    assert model.head_type == "mlp" and model.input_size == (16, 16)
    capsys.readouterr()
    assert cli.main([*args[:4], str(tmp_path / "other"), *args[5:], "model.kwargs.input_size=(28, 28)"]) == 2
    assert "model.kwargs.input_size (28, 28) does not match the dataset's images of 16x16" in capsys.readouterr().err
    assert not (tmp_path / "other" / "config.json").exists()
