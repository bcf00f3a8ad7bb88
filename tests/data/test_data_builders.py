"""Tests of the saljax TFDS builders (tiny configs, built offline into temporary directories)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

import saljax.data as sd
from saljax.data import decoy_digits, spurious_binary, synthetic_distractor

tfds.disable_progress_bar()

TINY = {
    "decoy_digits": dict(image_size=16, max_examples=60),
    "synthetic_distractor": dict(image_size=16, num_train=12, num_validation=4, num_test=12),
    "spurious_binary": dict(
        image_size=16, num_train=24, num_validation=4, num_test_closed=40, num_test_open=12
    ),
}
SPLITS = {
    "decoy_digits": ("train", "validation", "test"),
    "synthetic_distractor": ("train", "validation", "test"),
    "spurious_binary": ("train", "validation", "test_closed", "test_open"),
}
CHANNELS = {"decoy_digits": 1, "synthetic_distractor": 1, "spurious_binary": 3}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.fspath(tmp_path_factory.mktemp("tfds"))


def examples(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def record_bytes(builder: tfds.core.DatasetBuilder) -> dict[str, bytes]:
    paths = sorted(glob.glob(os.path.join(os.fspath(builder.data_path), "*.array_record*")))
    assert paths, f"no array_record files in {builder.data_path}"
    return {os.path.basename(p): Path(p).read_bytes() for p in paths}


@pytest.mark.parametrize("name", sd.DATASET_NAMES)
def test_registered_with_tfds(name: str, tmp_path) -> None:
    # The folder's registered config leaves classes, size and channels to inference from the CSV.
    config = sd.SaliencyFolderConfig(name="explicit", class_names=("a", "b"), image_size=8, channels=1) \
        if name == "saliency_folder" else None
    builder = tfds.builder(name, data_dir=os.fspath(tmp_path), config=config)
    assert builder.info.file_format.value == "array_record"
    features = builder.info.features
    assert {"image", "label", "saliency_map", "has_map"} <= set(features.keys())
    assert features["image"].np_dtype == np.uint8
    assert features["saliency_map"].np_dtype == np.float32
    assert features["saliency_map"].shape == features["image"].shape[:2]
    assert "saliency_map" in builder.info.description
    assert str(builder.VERSION) in builder.RELEASE_NOTES


def test_named_config_via_tfds(tmp_path) -> None:
    builder = tfds.builder("decoy_digits/clean", data_dir=os.fspath(tmp_path))
    assert builder.builder_config.decoy is False


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_build_features(name: str, data_dir: str) -> None:
    builder = sd.build(name, data_dir, **TINY[name])
    assert set(builder.info.splits.keys()) == set(SPLITS[name])
    for split in SPLITS[name]:
        for ex in examples(builder, split):
            assert ex["image"].shape == (16, 16, CHANNELS[name]) and ex["image"].dtype == np.uint8
            assert ex["saliency_map"].shape == (16, 16)
            assert ex["saliency_map"].dtype == np.float32
            assert 0.0 <= ex["saliency_map"].min() and ex["saliency_map"].max() <= 1.0
            assert ex["has_map"] and ex["saliency_map"].max() == 1.0
            assert 0 <= ex["label"] < builder.info.features["label"].num_classes
    # Building again with the same parameters reuses the prepared data.
    again = sd.build(name, data_dir, **TINY[name])
    assert again.data_path == builder.data_path


@pytest.mark.parametrize("name", list(TINY))
def test_seed_determines_bytes(name: str, tmp_path) -> None:
    first = record_bytes(sd.build(name, tmp_path / "a", seed=3, **TINY[name]))
    second = record_bytes(sd.build(name, tmp_path / "b", seed=3, **TINY[name]))
    other = record_bytes(sd.build(name, tmp_path / "c", seed=4, **TINY[name]))
    assert first == second
    assert all(first[k] != other[k] for k in first)


def test_overrides_get_their_own_config_name(data_dir: str) -> None:
    small = sd.resolve_config("decoy_digits", image_size=16)
    assert small.name.startswith("default_") and small.image_size == 16
    assert small.description == "The 'default' config with image_size=16."  # not the base's size
    assert sd.resolve_config("decoy_digits", image_size=16).name == small.name
    assert sd.resolve_config("decoy_digits", image_size=20).name != small.name
    assert sd.resolve_config("decoy_digits").name == "default"
    assert sd.resolve_config("decoy_digits/clean", image_size=16).name.startswith("clean_")
    with pytest.raises(ValueError, match="unknown config field"):
        sd.resolve_config("decoy_digits", image_sise=16)
    with pytest.raises(ValueError, match="image_size"):
        sd.resolve_config("decoy_digits", image_size=2)
    with pytest.raises(ValueError, match="unknown saljax dataset"):
        sd.build("mnist", data_dir)


# --- decoy_digits ---------------------------------------------------------------------------


def swatch(ex: dict) -> tuple[tuple[int, int], np.ndarray]:
    """(corner of the swatch, its pixel values), read from the map."""
    ys, xs = np.nonzero(ex["saliency_map"] == 0)
    return (ys.min(), xs.min()), ex["image"][ys, xs, 0]


def test_decoy_protocol(data_dir: str) -> None:
    builder = sd.build("decoy_digits", data_dir, image_size=16, max_examples=200)
    size, s = 16, decoy_digits.swatch_size(16)
    assert s == 2
    corners = set()
    for split in ("train", "validation"):
        for ex in examples(builder, split):
            (y0, x0), values = swatch(ex)
            assert values.size == s * s
            assert (y0, x0) in {(0, 0), (0, size - s), (size - s, 0), (size - s, size - s)}
            assert np.all(values == 255 - 25 * ex["label"])
            corners.add((y0, x0))
    assert len(corners) == 4
    test = examples(builder, "test")
    shades = [int(swatch(ex)[1][0]) for ex in test]
    assert all(np.all(swatch(ex)[1] == shade) for ex, shade in zip(test, shades))
    assert set(shades) <= {255 - 25 * r for r in range(10)}
    matches = np.mean([shade == 255 - 25 * ex["label"] for ex, shade in zip(test, shades)])
    assert matches < 0.4  # A random digit matches the label about 10% of the time.
    assert len(set(shades)) >= 5


def test_decoy_split_is_stratified_and_disjoint(data_dir: str) -> None:
    builder = sd.build("decoy_digits", data_dir, image_size=16, max_examples=200)
    counts = {s: builder.info.splits[s].num_examples for s in ("train", "validation", "test")}
    assert counts == {"train": 120, "validation": 40, "test": 40}
    labels = [ex["label"] for ex in examples(builder, "train")]
    assert np.bincount(labels, minlength=10).tolist() == [12] * 10
    config = sd.resolve_config("decoy_digits", image_size=16)
    parts = decoy_digits.split_indices(np.repeat(np.arange(10), 30), config)
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == len(set(joined.tolist())) == 300


def test_decoy_clean_config(data_dir: str) -> None:
    builder = sd.build("decoy_digits", data_dir, config="clean", image_size=16, max_examples=30)
    decoyed = sd.build("decoy_digits", data_dir, image_size=16, max_examples=30)
    for clean_ex, decoy_ex in zip(examples(builder, "train"), examples(decoyed, "train")):
        assert np.all(clean_ex["saliency_map"] == 1.0)
        # Same digits, same positions: the images differ only on the swatch.
        differ = np.any(clean_ex["image"] != decoy_ex["image"], axis=-1)
        assert np.all(decoy_ex["saliency_map"][differ] == 0.0)


def test_map_fraction_withholds_training_maps(data_dir: str) -> None:
    builder = sd.build("decoy_digits", data_dir, image_size=16, max_examples=60, map_fraction=0.5)
    train = examples(builder, "train")
    without = [ex for ex in train if not ex["has_map"]]
    assert 0 < len(without) < len(train)
    assert all(np.all(ex["saliency_map"] == 0) for ex in without)
    assert all(ex["has_map"] for ex in examples(builder, "test"))


# --- synthetic_distractor -------------------------------------------------------------------


def bar_code(ex: dict) -> int:
    """Which top corner holds the bright bar: 0 left, 1 right."""
    image = ex["image"][..., 0].astype(float)
    top = image[: 16 // 8 + 1]
    return int(top[:, 8:].mean() > top[:, :8].mean())


def test_distractor_agrees_in_training_and_flips_at_test(data_dir: str) -> None:
    builder = sd.build("synthetic_distractor", data_dir, **TINY["synthetic_distractor"])
    for split in ("train", "validation", "test"):
        exs = examples(builder, split)
        codes = np.array([bar_code(ex) for ex in exs])
        labels = np.array([ex["label"] for ex in exs])
        expected = 1 - labels if split == "test" else labels
        assert np.array_equal(codes, expected), split
        for ex in exs:
            # The lesion never reaches the rows of the bar.
            assert np.all(ex["saliency_map"][:3] == 0)
    assert set(labels.tolist()) == {0, 1}
    assert synthetic_distractor.CLASS_NAMES == tuple(builder.info.features["label"].names)


def test_distractor_flip_validation_flips_only_validation(data_dir: str) -> None:
    plain = sd.build("synthetic_distractor", data_dir, **TINY["synthetic_distractor"])
    flipped = sd.build("synthetic_distractor", data_dir, flip_validation=True, **TINY["synthetic_distractor"])
    for split in ("train", "validation", "test"):
        for a, b in zip(examples(plain, split), examples(flipped, split), strict=True):
            assert a["label"] == b["label"] and np.array_equal(a["saliency_map"], b["saliency_map"])
            assert bar_code(b) == (1 - b["label"] if split != "train" else b["label"]), split
            if split != "validation":
                assert np.array_equal(a["image"], b["image"]), split


# --- spurious_binary ------------------------------------------------------------------------


def has_cue(ex: dict) -> bool:
    image = ex["image"].astype(int)
    magenta = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] > 200)
    return bool(np.any(magenta & (ex["saliency_map"] == 0)))


def test_spurious_cue_groups_and_open_set(data_dir: str) -> None:
    builder = sd.build(
        "spurious_binary",
        data_dir,
        cue_correlation=1.0,
        holdout_groups=(2,),
        **TINY["spurious_binary"],
    )
    assert builder.info.features["group"].names == list(spurious_binary.GROUP_NAMES)
    for split in ("train", "validation"):
        for ex in examples(builder, split):
            assert has_cue(ex) == (ex["label"] == 1), split
    closed = examples(builder, "test_closed")
    agree = np.mean([has_cue(ex) == (ex["label"] == 1) for ex in closed])
    assert 0.2 < agree < 0.8  # The cue is independent of the label at test.
    groups = {
        split: {int(ex["group"]) for ex in examples(builder, split) if ex["label"] == 1}
        for split in SPLITS["spurious_binary"]
    }
    assert groups["train"] == {1, 3, 4} and groups["test_closed"] == {1, 3, 4}
    assert groups["test_open"] == {2}
    for split in SPLITS["spurious_binary"]:
        assert all(ex["group"] == 0 for ex in examples(builder, split) if ex["label"] == 0)


def test_spurious_cue_is_a_corner_patch_outside_the_map(data_dir: str) -> None:
    builder = sd.build("spurious_binary", data_dir, **TINY["spurious_binary"])
    patch = 2  # round(16 / 8)
    found = 0
    for ex in examples(builder, "test_closed"):
        if not has_cue(ex):
            continue
        found += 1
        image = ex["image"].astype(int)
        magenta = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] > 200)
        ys, xs = np.nonzero(magenta & (ex["saliency_map"] == 0))
        y0, x0 = ys.min(), xs.min()
        assert (ys.max() - y0 + 1, xs.max() - x0 + 1) == (patch, patch)
        assert y0 in (1, 16 - 1 - patch) and x0 in (1, 16 - 1 - patch)
        assert np.all(ex["saliency_map"][y0 : y0 + patch, x0 : x0 + patch] == 0)
    assert found > 5
    with pytest.raises(ValueError, match="holdout_groups"):
        sd.resolve_config("spurious_binary", holdout_groups=(1, 2, 3, 4))
