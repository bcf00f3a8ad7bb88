"""Model fields filled in from the dataset (the MLP head's input size), saved and read back.

A config the dataset contradicts is refused in tests/test_bad_input.py.
"""

import json
import os

import pytest
from conftest import TINY

from saljax import cli, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "decoy_digits.py:ce")


@pytest.mark.slow
def test_mlp_head_gets_its_input_size_from_the_dataset(tmp_path):
    args = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "run"), f"dataset.data_dir={str(tmp_path / 'data')!r}",
            "batch_size=8", "eval_batch_size=16", "num_devices=1", "progress=False", "num_steps=2", "eval_every=2",
            *TINY["decoy_digits"], "model.kwargs.head_type='mlp'", "model.kwargs.mlp_hidden=8"]
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["input_size"] == [16, 16] and "input_size" not in saved["model"]["kwargs"]
    model, _ = train.load_model(tmp_path / "run")
    assert model.head_type == "mlp" and model.input_size == (16, 16)
