"""Protocol statistics of the ``red_herring`` builder (Viviano et al., 2021) on a tiny build."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import ndimage

import saljax.data as sd
from saljax.data import red_herring as rh

tfds.disable_progress_bar()

TINY = dict(num_train=40, num_validation=16, num_test=16)
SPLITS = ("train", "validation", "test")
LEFT = np.s_[23:25, 3:6]
RIGHT = np.s_[23:25, 22:25]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tfds.core.DatasetBuilder:
    return sd.build("red_herring", os.fspath(tmp_path_factory.mktemp("tfds")), **TINY)


def examples(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def test_defaults_follow_the_paper() -> None:
    config = rh.RedHerring.builder_configs["default"]
    assert (config.num_train, config.num_validation, config.num_test) == (500, 128, 128)
    assert len({config.train_seed, config.validation_seed, config.test_seed}) == 3
    assert config.mask_sigma == 0.5 and rh.blur_radius(config.mask_sigma) == 2


def test_splits_sizes_balance_and_binary_images(built: tfds.core.DatasetBuilder) -> None:
    assert built.info.features["label"].names == ["one_cross", "two_crosses"]
    for split, n in zip(SPLITS, TINY.values()):
        exs = examples(built, split)
        assert len(exs) == n
        assert np.bincount([e["label"] for e in exs], minlength=2).tolist() == [n // 2, n // 2]
        for e in exs:
            assert e["image"].shape == (28, 28, 1) and e["image"].dtype == np.uint8
            assert set(np.unique(e["image"])) <= {0, 255}
            assert set(np.unique(e["saliency_map"])) <= {0.0, 1.0} and e["has_map"]


@pytest.mark.parametrize("split", SPLITS)
def test_distractor_side_and_left_right_flip(built: tfds.core.DatasetBuilder, split: str) -> None:
    flipped = split != "train"
    for e in examples(built, split):
        image = e["image"][:, :, 0] > 0
        # Train: class 0 left, class 1 right; validation and test: the other side.
        on_left = (e["label"] == 0) != flipped
        here, other = (LEFT, RIGHT) if on_left else (RIGHT, LEFT)
        assert image[here].all(), (split, e["label"])
        assert not image[other].any(), (split, e["label"])


@pytest.mark.parametrize("split", SPLITS)
def test_class_is_the_cross_count_and_map_covers_crosses_only(built: tfds.core.DatasetBuilder, split: str) -> None:
    for e in examples(built, split):
        image = e["image"][:, :, 0] > 0
        saliency = e["saliency_map"] > 0
        rect = np.zeros_like(image)
        rect[LEFT] = rect[RIGHT] = True
        crosses = image & ~rect
        components, count = ndimage.label(crosses, structure=np.ones((3, 3)))
        assert count == e["label"] + 1
        for k in range(1, count + 1):
            assert (components == k).sum() in (5, 9)  # plus signs of half-arm 1 or 2
        assert saliency[crosses].all()  # the map covers every cross pixel
        assert not saliency[rect].any()  # and never the distractor (either side)
        # Dilation by a Gaussian blur of sigma 0.5 (radius 2): exactly the crosses grown by 2 px.
        assert np.array_equal(saliency, ndimage.binary_dilation(crosses, np.ones((5, 5), bool)))


def test_dilate_by_blur_matches_square_dilation() -> None:
    mask = np.zeros((28, 28), bool)
    mask[10, 10] = True
    for sigma, radius in ((0.25, 1), (0.5, 2), (1.0, 4)):
        grown = rh.dilate_by_blur(mask, sigma)
        assert grown.sum() == (2 * radius + 1) ** 2
        assert grown[10 - radius, 10 - radius] and not grown[10 - radius - 1, 10]


def test_dilate_by_blur_matches_scipy_gaussian_filter() -> None:
    rng = np.random.default_rng(0)
    for sigma in (0.25, 0.5, 0.8):
        mask = rng.random((28, 28)) < 0.02
        mask[0, 27] = True  # a pixel at the border
        # skimage.filters.gaussian (the paper's blur) is scipy's gaussian_filter with mode "nearest".
        expected = ndimage.gaussian_filter(mask.astype(float), sigma, mode="nearest") > 0
        assert np.array_equal(rh.dilate_by_blur(mask, sigma), expected), sigma


def test_splits_differ_and_build_is_deterministic(built: tfds.core.DatasetBuilder, tmp_path) -> None:
    again = sd.build("red_herring", os.fspath(tmp_path / "a"), **TINY)
    for split in SPLITS:
        a, b = examples(built, split), examples(again, split)
        assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    hashes = {s: {e["image"].tobytes() for e in examples(built, s)} for s in SPLITS}
    assert not hashes["train"] & hashes["test"] and not hashes["validation"] & hashes["test"]
    other = sd.build("red_herring", os.fspath(tmp_path / "b"), test_seed=7, **TINY)
    assert {e["image"].tobytes() for e in examples(other, "test")} != hashes["test"]
    assert {e["image"].tobytes() for e in examples(other, "train")} == hashes["train"]


def test_loader_batches(built: tfds.core.DatasetBuilder) -> None:
    batch = next(iter(sd.make_loader(built, "test", 8)))
    assert batch["image"].shape == (8, 28, 28, 1) and set(np.unique(batch["image"])) <= {0.0, 1.0}
    assert batch["saliency_map"].shape == (8, 28, 28) and batch["has_map"].all()
    assert set(batch["label"].tolist()) <= {0, 1}


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="mask_sigma"):
        rh.RedHerringConfig(name="x", mask_sigma=0.0)
    with pytest.raises(ValueError, match="num_test"):
        rh.RedHerringConfig(name="x", num_test=0)
