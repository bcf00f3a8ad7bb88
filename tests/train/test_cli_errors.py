"""Bad input to `saljax train`/`explain`: one line on stderr, exit code 2, nothing written first."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY

from saljax import checkpoint, cli, train, workdir
from saljax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "decoy_digits.py")


def _train(tmp_path, *overrides, config=CONFIG + ":gradmask", workdir_path=None, data_dir=None):
    data_dir = data_dir or tmp_path / "data"
    workdir_path = workdir_path or tmp_path / "run"
    return ["train", "--config", config, "--workdir", str(workdir_path), f"dataset.data_dir={str(data_dir)!r}",
            "batch_size=8", "eval_batch_size=16", "num_devices=1", "progress=False", *TINY["decoy_digits"], *overrides]


def _fails(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("override, message", [
    ("method='nope'", "method must be one of"),
    ("eval_every=0", "eval_every must be an integer >= 1; got 0"),
    ("batch_size=0", "batch_size must be an integer >= 1; got 0"),
    ("num_steps=0", "num_steps must be an integer >= 1; got 0"),
    ("num_steps=-3", "num_steps must be an integer >= 1; got -3"),
    ("model.name='vgg'", "model.name must be one of simple_cnn"),
    ("dataset.name='mnist'", "dataset.name must be one of decoy_digits"),
    ("loss.lamm=3.0", "lamm"),
    ("optimizer.name='adamx'", "optimizer.name must be one of adam | adamw | sgd | lamb | lars"),
    ("checkpoint.best_metric='train/accuracy'", "checkpoint.best_metric must be <split>/<metric>"),
    ("model.kwargs.widht=3", "model.kwargs ['widht'] are not arguments of model 'simple_cnn'"),
    ("model.kwargs.in_channels=3", "model.kwargs ['in_channels'] are set by saljax"),
    ("dataset.overrides.image_sise=8", "image_sise"),
])
def test_bad_config_fails_before_writing_anything(tmp_path, capsys, override, message):
    _fails(capsys, _train(tmp_path, override), message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_bad_workdir_and_config_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _fails(capsys, _train(tmp_path, workdir_path=tmp_path / "file"), "is a file, not a directory")
    _fails(capsys, _train(tmp_path, workdir_path=tmp_path / "file" / "run"), "is a file")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _fails(capsys, _train(tmp_path, workdir_path=locked / "run"), "is not writable")
    elif os.path.isdir("/sys") and not os.access("/sys/saljax-test", os.F_OK):
        _fails(capsys, _train(tmp_path, workdir_path="/sys/saljax-test/run"), "is not writable")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=None):\n    return {'seed': 1\n")
    _fails(capsys, _train(tmp_path, config=str(bad)), f"config file {bad}: syntax error at line 2")
    bad.write_text("def get_config(arg=None):\n    raise KeyError('x')\n")
    _fails(capsys, _train(tmp_path, config=str(bad)), "get_config(None) failed: KeyError")
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_debug_shows_the_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="method must be one of"):
        cli.main(["--debug", *_train(tmp_path, "method='nope'")])
    with pytest.raises(ValueError, match="method must be one of"):
        cli.main([*_train(tmp_path, "method='nope'"), "--debug"])
    monkeypatch.setenv("SALJAX_DEBUG", "1")
    with pytest.raises(ValueError, match="method must be one of"):
        cli.main(_train(tmp_path, "method='nope'"))


def test_through_a_subprocess_exit_code_2_and_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "saljax.cli", *_train(tmp_path, "num_steps=0")], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "saljax train: num_steps must be an integer >= 1; got 0"


def test_explain_on_a_corrupt_config_json_names_the_file(tmp_path, capsys):
    (tmp_path / workdir.CONFIG_FILE).write_text('{"method": "ce", ')
    assert cli.main(["explain", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / workdir.CONFIG_FILE} is corrupt or unreadable" in err and "Traceback" not in err
    with pytest.raises(checkpoint.CheckpointError, match="config.json is corrupt"):
        workdir.load_config(tmp_path)
    (tmp_path / workdir.CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(checkpoint.CheckpointError, match="expected a JSON object"):
        train.load_model(tmp_path)


def test_non_finite_stop_names_the_term_that_went_non_finite():
    out = {"finite": False, "loss": np.nan, "loss/ce": 0.5, "loss/gradmask": np.inf, "grad_norm": np.nan}
    with pytest.raises(workdir.NonFiniteError,
                       match=r"step 7 \(the first such step\): non-finite term\(s\) loss/gradmask = inf; finite: loss/ce = 0.5"):
        loop._check_finite(7, out)
    with pytest.raises(workdir.NonFiniteError, match="gradient norm = nan"):
        loop._check_finite(3, {"finite": False, "loss": 1.0, "loss/ce": 1.0, "grad_norm": np.nan})
    loop._check_finite(3, {"finite": True, "loss": 1.0, "grad_norm": 1.0})


def test_verbosity_switch_and_silenced_tfds_warning(caplog):
    args = cli.build_parser().parse_args(["-q", "demo"])
    assert args.verbosity == "warning"
    assert cli.build_parser().parse_args(["demo", "-v"]).verbosity == "debug"
    assert cli.build_parser().parse_args(["--verbosity", "error", "demo"]).verbosity == "error"
    cli._setup_logging("warning")
    assert logging.getLogger("saljax").level == logging.WARNING
    with caplog.at_level(logging.WARNING):
        logging.getLogger("absl").warning("Using custom data configuration: %s", "x")
        logging.getLogger("absl").warning("another warning")
    assert "custom data configuration" not in caplog.text and "another warning" in caplog.text
    cli._setup_logging("info")
