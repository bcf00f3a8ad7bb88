"""Tests of the grain pipeline: batch format, determinism, augmentation, resume, sharding."""

from __future__ import annotations

import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

import saljax.data as sd

tfds.disable_progress_bar()

SIZE = 12


def patch_examples(n: int, channels: int = 3) -> list[dict]:
    """In-memory examples whose map marks exactly a bright patch; ``group`` is the example id."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        y0, x0 = rng.integers(0, SIZE - 4, size=2)
        h, w = rng.integers(2, 5, size=2)
        saliency = np.zeros((SIZE, SIZE), np.float32)
        saliency[y0 : y0 + h, x0 : x0 + w] = 1.0
        image = np.where(saliency[..., None] > 0, 250, 20).astype(np.uint8)
        image = np.repeat(image, channels, axis=-1)
        out.append(
            {"image": image, "label": i % 2, "saliency_map": saliency, "has_map": True, "group": i}
        )
    return out


def ids(batches: list[dict]) -> list[int]:
    return [int(g) for b in batches for g in b["group"]]


def no_sharding() -> grain.sharding.ShardOptions:
    return grain.sharding.NoSharding()


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="session")
def spurious(tmp_path_factory: pytest.TempPathFactory) -> tfds.core.DatasetBuilder:
    return sd.build(
        "spurious_binary",
        tmp_path_factory.mktemp("tfds"),
        image_size=16,
        num_train=20,
        num_validation=6,
        num_test_closed=6,
        num_test_open=6,
    )


def test_batch_format(spurious: tfds.core.DatasetBuilder) -> None:
    loader = sd.make_loader(spurious, "train", 4, seed=0, shuffle=True)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch == 5
    batch = batches[0]
    assert tuple(sorted(batch)) == tuple(sorted(sd.BATCH_KEYS))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (4, 16, 16, 3)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
    assert batch["saliency_map"].dtype == np.float32 and batch["saliency_map"].shape == (4, 16, 16)
    assert batch["has_map"].dtype == np.bool_ and batch["has_map"].shape == (4,)
    assert batch["group"].dtype == np.int32 and batch["group"].shape == (4,)
    images = np.concatenate([b["image"] for b in batches])
    assert images.min() >= 0.0 and images.max() <= 1.0
    source = spurious.as_data_source("train")
    raw = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float32) / 255
    np.testing.assert_allclose(np.sort(images.ravel()), np.sort(raw.ravel()), atol=1e-6)


def test_group_defaults_to_zero_and_mean_std(tmp_path) -> None:
    builder = sd.build(
        "synthetic_distractor", tmp_path, image_size=16, num_train=4, num_validation=2, num_test=2
    )
    plain = next(iter(sd.make_loader(builder, "test", 2)))
    assert plain["group"].tolist() == [0, 0] and plain["image"].shape == (2, 16, 16, 1)
    scaled = next(iter(sd.make_loader(builder, "test", 2, mean=0.5, std=0.25)))
    np.testing.assert_allclose(scaled["image"], (plain["image"] - 0.5) / 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="std must be positive"):
        sd.make_loader(builder, "test", 2, std=0.0)
    with pytest.raises(ValueError, match="mean has 3 values but the images have 1 channel"):
        sd.make_loader(builder, "test", 2, mean=(0.5, 0.5, 0.5))


def test_evaluation_pass_covers_split_once(spurious: tfds.core.DatasetBuilder) -> None:
    loader = sd.make_loader(spurious, "validation", 4)  # no shuffle, keep the remainder
    batches = list(loader)
    assert [len(b["label"]) for b in batches] == [4, 2]
    source = spurious.as_data_source("validation")
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in batches]), [source[i]["label"] for i in range(6)]
    )


def test_shuffle_is_seeded_and_differs_per_epoch() -> None:
    data = patch_examples(10)
    kwargs = dict(shuffle=True, num_epochs=2, drop_remainder=False, shard_options=no_sharding())
    first = ids(list(sd.make_loader(data, "train", 5, seed=1, **kwargs)))
    again = ids(list(sd.make_loader(data, "train", 5, seed=1, **kwargs)))
    other = ids(list(sd.make_loader(data, "train", 5, seed=2, **kwargs)))
    assert first == again and first != other
    assert sorted(first[:10]) == sorted(first[10:]) == list(range(10))
    assert first[:10] != first[10:]


def test_drop_remainder_per_epoch() -> None:
    data = patch_examples(10)
    loader = sd.make_loader(data, "train", 4, num_epochs=2, shard_options=no_sharding())
    batches = list(loader)
    assert loader.drop_remainder and loader.steps_per_epoch == 2
    assert len(batches) == 4 and all(len(b["group"]) == 4 for b in batches)
    assert len(set(ids(batches[:2]))) == 8


def test_augmentation_keeps_image_and_map_aligned() -> None:
    data = patch_examples(16)
    augment = sd.Augment(flip=True, crop_padding=3)
    loader = sd.make_loader(
        data, "train", 8, seed=5, num_epochs=3, augment=augment, shard_options=no_sharding()
    )
    batches = list(loader)
    changed = 0
    for batch in batches:
        for image, saliency, i in zip(batch["image"], batch["saliency_map"], batch["group"]):
            bright = image.mean(axis=-1) > 0.5
            np.testing.assert_array_equal(bright, saliency > 0.5)
            # Padding enters as zeros in both: dark image, map 0.
            assert set(np.unique(saliency)) <= {0.0, 1.0}
            changed += not np.array_equal(saliency, data[i]["saliency_map"])
    assert changed > len(batches) * 8 // 2
    again = list(
        sd.make_loader(
            data, "train", 8, seed=5, num_epochs=3, augment=augment, shard_options=no_sharding()
        )
    )
    assert_same_batches(batches, again)


def test_augment_example_flip_and_crop_exactly() -> None:
    image = np.arange(4 * 5 * 2, dtype=np.uint8).reshape(4, 5, 2)
    saliency = np.arange(20, dtype=np.float32).reshape(4, 5)
    example = {"image": image, "saliency_map": saliency, "label": np.int32(0)}

    class Fixed:
        def __init__(self, flip: float, offsets: tuple[int, int]):
            self._flip, self._offsets = flip, offsets

        def random(self) -> float:
            return self._flip

        def integers(self, low: int, high: int, size: int) -> np.ndarray:
            return np.array(self._offsets)

    flipped = sd.augment_example(example, Fixed(0.1, (1, 1)), sd.Augment(crop_padding=1))
    np.testing.assert_array_equal(flipped["image"], image[:, ::-1])
    np.testing.assert_array_equal(flipped["saliency_map"], saliency[:, ::-1])
    shifted = sd.augment_example(example, Fixed(0.9, (0, 2)), sd.Augment(crop_padding=1))
    # Window starting at padded (0, 2) = original (-1, 1): first row and last column are padding.
    np.testing.assert_array_equal(shifted["saliency_map"][0], 0)
    np.testing.assert_array_equal(shifted["saliency_map"][:, 4], 0)
    np.testing.assert_array_equal(shifted["saliency_map"][1:, :4], saliency[:3, 1:])
    np.testing.assert_array_equal(shifted["image"][1:, :4], image[:3, 1:])
    np.testing.assert_array_equal(shifted["image"][0], 0)


@pytest.mark.parametrize("stop_after", [1, 3, 4])
def test_resume_from_state(stop_after: int) -> None:
    data = patch_examples(10)
    make = lambda: sd.make_loader(  # noqa: E731
        data, "train", 3, seed=7, num_epochs=3, augment=True, shard_options=no_sharding()
    )
    full = list(make())
    assert len(full) == 9
    it = iter(make())
    head = [next(it) for _ in range(stop_after)]
    state = sd.iterator_state(it)
    resumed = sd.restore_iterator(iter(make()), state)
    assert_same_batches(head + list(resumed), full)
    # The dict form works too.
    it2 = iter(make())
    it2.set_state(it.get_state())
    assert_same_batches(list(it2), full[stop_after:])


def test_orbax_checkpoint_round_trip(tmp_path) -> None:
    import orbax.checkpoint as ocp
    data = patch_examples(10)
    loader = sd.make_loader(data, "train", 2, seed=3, num_epochs=None, shard_options=no_sharding())
    it = iter(loader)
    for _ in range(7):
        next(it)
    with ocp.CheckpointManager(os.fspath(tmp_path / "ckpt")) as manager:
        manager.save(7, args=ocp.args.Composite(data=sd.IteratorCheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    restored = iter(loader)
    with ocp.CheckpointManager(os.fspath(tmp_path / "ckpt")) as manager:
        manager.restore(7, args=ocp.args.Composite(data=sd.IteratorCheckpointRestore(restored)))
    assert_same_batches([next(restored) for _ in range(3)], expected)


@pytest.mark.parametrize("drop_remainder", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_disjoint_and_cover(shuffle: bool, drop_remainder: bool) -> None:
    data = patch_examples(11)
    seen = []
    for index in range(2):
        options = grain.sharding.ShardOptions(
            shard_index=index, shard_count=2, drop_remainder=drop_remainder
        )
        loader = sd.make_loader(
            data, "train", 2, seed=0, shuffle=shuffle, drop_remainder=False, shard_options=options
        )
        seen.append(ids(list(loader)))
        assert loader.num_examples == (5 if drop_remainder else 6 - index)
    assert not set(seen[0]) & set(seen[1])
    covered = set(seen[0]) | set(seen[1])
    assert covered == (set(range(10)) if drop_remainder else set(range(11)))


def test_default_sharding_follows_jax_processes() -> None:
    loader = sd.make_loader(patch_examples(6), "validation", 2)  # one JAX process here
    assert loader.num_examples == 6


def test_loader_from_name(tmp_path) -> None:
    loader = sd.make_loader(
        "decoy_digits",
        "test",
        5,
        data_dir=tmp_path,
        config="clean",
        config_overrides=dict(image_size=16, max_examples=20),
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 16, 16, 1)
    assert np.all(batch["saliency_map"] == 1.0)


def test_bad_arguments(spurious: tfds.core.DatasetBuilder) -> None:
    with pytest.raises(ValueError, match="has no split 'test'"):
        sd.make_loader(spurious, "test", 4)
    with pytest.raises(ValueError, match="batch_size"):
        sd.make_loader(spurious, "train", 0)
    with pytest.raises(ValueError, match="needs data_dir"):
        sd.make_loader("decoy_digits", "train", 4)
    with pytest.raises(ValueError, match="leaves no batch"):
        sd.make_loader(spurious, "train", 64)
    with pytest.raises(TypeError, match="augment"):
        sd.make_loader(spurious, "train", 4, augment="flip")


@pytest.mark.slow  # starts grain worker processes
def test_worker_processes_match_in_process(spurious: tfds.core.DatasetBuilder) -> None:
    kwargs = dict(seed=2, augment=True, num_epochs=1)
    expected = list(sd.make_loader(spurious, "train", 4, **kwargs))
    it = iter(sd.make_loader(spurious, "train", 4, worker_count=1, **kwargs))
    try:
        got = [next(it) for _ in range(len(expected))]
    finally:
        it.close()
    assert_same_batches(got, expected)
