"""The dataset registry, the old import paths of the builder modules, and ``from_config``."""

from __future__ import annotations

import importlib
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import saljax.data as sd
from saljax import config as saljax_config
from saljax.data import registry

tfds.disable_progress_bar()

EXPECTED = {"decoy_digits", "decoy_mnist", "red_herring", "saliency_folder", "spurious_binary", "synthetic_distractor"}


def test_one_registry_lists_every_builder() -> None:
    assert set(registry.names()) == EXPECTED
    assert sd.DATASET_NAMES == registry.names()
    for name in registry.names():
        cls = registry.builder_class(name)
        assert cls.name == name and tfds.builder_cls(name) is cls
    with pytest.raises(ValueError, match="unknown saljax dataset 'mnist'"):
        registry.builder_class("mnist")


def test_a_name_registers_once() -> None:
    class DecoyMnist(sd.DecoyMnist, skip_registration=True):
        pass

    with pytest.raises(ValueError, match="already registered"):
        registry.register(DecoyMnist)
    assert registry.register(sd.DecoyMnist) is sd.DecoyMnist  # the same class again is fine


def test_group_names() -> None:
    assert registry.group_names("spurious_binary") == ("bona_fide", "checker", "stripes", "dots", "grain")
    assert registry.group_names("red_herring") is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_module_paths_still_import(name: str) -> None:
    module = importlib.import_module(f"saljax.data.{name}")
    assert module is importlib.import_module(f"saljax.data.builders.{name}")
    assert getattr(sd, name) is module
    assert registry.builder_class(name).__module__ == module.__name__


TINY = {"num_train": 8, "num_validation": 4, "num_test": 4}


def test_from_config_reads_a_training_config_section(tmp_path) -> None:
    section = saljax_config.defaults().dataset
    with section.unlocked():
        section.name = "red_herring"
        section.config = ""
        section.overrides = ml_collections.ConfigDict(TINY)
        section.data_dir = os.fspath(tmp_path)
    builder = sd.from_config(section)
    assert builder.info.full_name.startswith("red_herring/default_")
    assert builder.info.splits["train"].num_examples == 8
    same = sd.from_config({"name": "red_herring/default", "data_dir": tmp_path, "overrides": TINY})
    assert same.data_path == builder.data_path
    clean = sd.from_config({"name": "decoy_mnist", "config": "clean", "data_dir": tmp_path,
                            "overrides": {"num_train": 10, "num_validation": 10, "num_test": 10}})
    assert clean.builder_config.decoy is False


def test_default_names_the_builders_default_config(tmp_path) -> None:
    assert sd.resolve_config("decoy_mnist", "default").name == "default"
    folder = tmp_path / "scans"
    (folder / "img").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((4, 4), 50 * i, np.uint8)).save(folder / "img" / f"{i}.png")
    (folder / "saliency.csv").write_text("image,label\nimg/0.png,no\nimg/1.png,yes\n")
    # A training config's default config name works for the folder, whose default config is "csv".
    builder = sd.from_config({"name": "saliency_folder", "config": "default", "data_dir": tmp_path / "data",
                              "manual_dir": folder})
    assert builder.builder_config.name.startswith("scans_")
    assert builder.builder_config.description.startswith("The 'csv' config with")


@pytest.mark.parametrize(
    "section, needle",
    [
        ({"data_dir": "/tmp"}, "dataset.name must be"),
        ({"name": "red_herring"}, "dataset.data_dir"),
        ({"name": "decoy_mnist/clean", "config": "default", "data_dir": "/tmp"}, "give one of them"),
        ({"name": "red_herring", "data_dir": "/tmp", "overrides": [1]}, "dataset.overrides must be a mapping"),
        ({"name": "mnist", "data_dir": "/tmp"}, "unknown saljax dataset"),
        ({"name": "red_herring", "data_dir": "/tmp", "overrides": {"num_trian": 3}}, "unknown config field"),
    ],
)
def test_from_config_rejects_bad_sections(section: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        sd.from_config(section)
