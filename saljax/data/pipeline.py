"""grain input pipelines over prepared saljax datasets.

A loader yields dicts of numpy arrays with exactly these keys (B = batch size):

- ``image``: float32 (B, H, W, C), in [0, 1] or standardised with ``mean`` / ``std``
- ``label``: int32 (B,)
- ``saliency_map``: float32 (B, H, W), in [0, 1]
- ``has_map``: bool (B,)
- ``group``: int32 (B,), 0 where the dataset has no groups

The pipeline is a ``grain.MapDataset`` chain: source -> shard -> shuffle -> decode -> augment ->
normalise -> batch -> repeat. Every random choice is derived from ``seed`` and the element's
position, so two loaders with the same arguments yield identical batches, and an iterator's
state (``get_state`` / ``set_state``) resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import grain
import numpy as np
import tensorflow_datasets as tfds

from saljax.data import catalog

BATCH_KEYS = ("image", "label", "saliency_map", "has_map", "group")

# Orbax integration, re-exported so training code needs only saljax.data: use
# ``ocp.args.Composite(data=IteratorCheckpointSave(iterator))`` when saving and
# ``IteratorCheckpointRestore(iterator)`` when restoring.
IteratorCheckpointHandler = grain.checkpoint.CheckpointHandler
IteratorCheckpointSave = getattr(grain.checkpoint, "CheckpointSave", None)
IteratorCheckpointRestore = getattr(grain.checkpoint, "CheckpointRestore", None)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Augmentations applied identically to an image and its saliency map.

    Attributes:
      flip: flip left-right with probability 0.5.
      crop_padding: pad by this many pixels on every side (image and map with zeros: padding
        is neither content nor evidence) and crop a random window of the original size;
        0 disables cropping.
    """

    flip: bool = True
    crop_padding: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(
                f"Augment.crop_padding must be a non-negative int; got {self.crop_padding!r}"
            )


@dataclasses.dataclass(frozen=True)
class SaliencyLoader:
    """An iterable of batches; each ``iter()`` starts a fresh, checkpointable iterator.

    Attributes:
      dataset: the underlying ``grain.IterDataset`` (extend it with further grain ops if needed).
      num_examples: examples per epoch in this process's shard.
      batch_size: examples per batch.
      drop_remainder: whether each epoch's last partial batch is dropped.
      num_epochs: passes over the data (None: endless).
    """

    dataset: grain.IterDataset
    num_examples: int
    batch_size: int
    drop_remainder: bool
    num_epochs: int | None

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch in this shard."""
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def to_example(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Keeps the batch keys of a decoded TFDS record and fixes their dtypes.

    Args:
      record: ``image`` (H, W, C) uint8, ``label``, ``saliency_map`` (H, W), ``has_map`` and
        optionally ``group``.

    Returns:
      image uint8 (H, W, C), label int32 (), saliency_map float32 (H, W), has_map bool (),
      group int32 (), all numpy arrays (0-d for the scalars).
    """
    image = np.asarray(record["image"])
    if image.ndim == 2:
        image = image[:, :, None]
    return {
        "image": image,
        "label": np.asarray(record["label"], dtype=np.int32),
        "saliency_map": np.asarray(record["saliency_map"], dtype=np.float32),
        "has_map": np.asarray(record["has_map"], dtype=np.bool_),
        "group": np.asarray(record.get("group", 0), dtype=np.int32),
    }


def augment_example(
    example: dict[str, np.ndarray], rng: np.random.Generator, augment: Augment
) -> dict[str, np.ndarray]:
    """Applies the same random flip and crop to ``image`` (H, W, C) and ``saliency_map`` (H, W)."""
    image, saliency = example["image"], example["saliency_map"]
    if augment.flip and rng.random() < 0.5:
        image, saliency = image[:, ::-1], saliency[:, ::-1]
    p = augment.crop_padding
    if p > 0:
        height, width = saliency.shape
        dy, dx = (int(v) for v in rng.integers(0, 2 * p + 1, size=2))
        image = np.pad(image, ((p, p), (p, p), (0, 0)))[dy : dy + height, dx : dx + width]
        saliency = np.pad(saliency, p)[dy : dy + height, dx : dx + width]
    return {
        **example,
        "image": np.ascontiguousarray(image),
        "saliency_map": np.ascontiguousarray(saliency),
    }


def normalize_example(
    example: dict[str, np.ndarray],
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """uint8 image -> float32 in [0, 1], then ``(x - mean) / std`` per channel when given."""
    image = example["image"].astype(np.float32) / np.float32(255.0)
    if mean is not None:
        image = image - mean
    if std is not None:
        image = image / std
    return {**example, "image": image.astype(np.float32)}


def _channel_stats(value: float | Sequence[float] | None, name: str) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float32).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} must be a number or one number per channel; got {value!r}")
    if name == "std" and np.any(array <= 0):
        raise ValueError(f"std must be positive; got {value!r}")
    return array


def _ensure_absl_flags_parsed() -> None:
    """grain reads absl flags; mark them parsed so programs not run by absl.app work too."""
    from absl import flags  # only for worker processes, which grain starts under absl

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# A split is decoded once and kept in memory when it is this small: TFDS decodes every record in
# Python (about 0.3 ms an example), which would otherwise dominate the steps of small models.
IN_MEMORY_BYTES = 256 * 2**20


class _DecodedSplit:
    """The decoded examples of one split, read once; random access like the TFDS data source."""

    def __init__(self, source: Sequence[Mapping[str, Any]]) -> None:
        self._examples = [source[i] for i in range(len(source))]

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self._examples[index]


def _example_bytes(example: Mapping[str, Any]) -> int:
    return sum(np.asarray(v).nbytes for v in example.values())


@functools.lru_cache(maxsize=4)
def _decoded_split(builder: tfds.core.DatasetBuilder, split: str) -> _DecodedSplit:
    # Keyed by the builder object: evaluation makes a loader per evaluation over the same builder,
    # and a prepared split never changes under it (a rebuild makes a new builder).
    return _DecodedSplit(builder.as_data_source(split))


def _data_source(
    source: tfds.core.DatasetBuilder | str | Sequence[Mapping[str, Any]],
    split: str,
    data_dir: str | os.PathLike[str] | None,
    config: str | tfds.core.BuilderConfig | None,
    config_overrides: Mapping[str, Any] | None,
) -> Sequence[Mapping[str, Any]]:
    if isinstance(source, str):
        if data_dir is None:
            raise ValueError(f"make_loader got the dataset name {source!r}; it also needs data_dir")
        source = catalog.build(source, data_dir, config, **dict(config_overrides or {}))
    elif config is not None or config_overrides:
        raise ValueError("config and config_overrides apply only when source is a dataset name")
    if isinstance(source, tfds.core.DatasetBuilder):
        splits = sorted(source.info.splits.keys())
        if split not in splits:
            raise ValueError(f"{source.info.full_name} has no split {split!r}; it has {splits}")
        records = source.as_data_source(split)
        if len(records) and len(records) * _example_bytes(records[0]) <= IN_MEMORY_BYTES:
            return cast(Sequence[Mapping[str, Any]], _decoded_split(source, split))
        return records
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(
            "source must be a DatasetBuilder, a dataset name or a random-access sequence of "
            f"examples; got {type(source).__name__}"
        )
    return source


def make_loader(
    source: tfds.core.DatasetBuilder | str | Sequence[Mapping[str, Any]],
    split: str,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool | None = None,
    num_epochs: int | None = 1,
    augment: bool | Augment = False,
    drop_remainder: bool | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    worker_count: int = 0,
    shard_options: grain.sharding.ShardOptions | None = None,
    read_options: grain.ReadOptions | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> SaliencyLoader:
    """A deterministic, shardable, checkpointable batch loader for one split.

    Example::

      loader = make_loader(builder, "train", 32, seed=0, num_epochs=None, augment=True)
      it = iter(loader)
      batch = next(it)                 # dict of numpy arrays, see the module docstring
      state = it.get_state()           # JSON-serialisable dict
      it2 = iter(loader); it2.set_state(state)   # continues exactly where `it` is

    Args:
      source: a prepared ``DatasetBuilder`` (e.g. from ``build``), a dataset name (then
        ``data_dir`` is needed and the dataset is built if missing), or any random-access sequence
        of TFDS-style example dicts.
      split: split name, e.g. "train", "validation", "test", "test_open".
      batch_size: examples per batch.
      seed: seeds shuffling and augmentation (each epoch is shuffled differently).
      shuffle: shuffle examples; default True for "train", False otherwise.
      num_epochs: passes over the data; None repeats forever.
      augment: False, True (``Augment()``: flip + 4 px crop padding) or an ``Augment``.
      drop_remainder: drop each epoch's last partial batch and the examples that do not divide
        evenly across shards (so every process runs the same number of steps); default True for
        "train", False otherwise.
      mean, std: per-channel statistics of the [0, 1] image, applied as ``(x - mean) / std``.
      worker_count: grain worker processes (0: decode in this process, with threads).
      shard_options: which shard this process reads; default
        ``grain.sharding.ShardByJaxProcess`` (shard i of jax.process_count()). Shards are strided
        (example k goes to shard k mod shard_count), disjoint and together cover the split.
      read_options: grain read threads / buffer of batches (default 4 threads, 8 batches ahead).
      data_dir, config, config_overrides: forwarded to ``build`` when ``source`` is a name.

    Returns:
      A ``SaliencyLoader``; iterate it for batches. Iterators support ``get_state()`` /
      ``set_state()`` and Orbax (``IteratorCheckpointSave`` / ``IteratorCheckpointRestore``).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
        raise ValueError(f"num_epochs must be a positive int or None; got {num_epochs!r}")
    if not isinstance(worker_count, (int, np.integer)) or worker_count < 0:
        raise ValueError(f"worker_count must be a non-negative int; got {worker_count!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32); got {seed!r}")
    is_train = split == "train"
    shuffle = is_train if shuffle is None else shuffle
    drop_remainder = is_train if drop_remainder is None else drop_remainder
    augmentation: Augment | None
    if augment is True:
        augmentation = Augment()
    elif augment is False or augment is None:
        augmentation = None
    elif isinstance(augment, Augment):
        augmentation = augment
    else:
        raise TypeError(f"augment must be a bool or an Augment; got {type(augment).__name__}")
    mean_array, std_array = _channel_stats(mean, "mean"), _channel_stats(std, "std")

    data = _data_source(source, split, data_dir, config, config_overrides)
    if len(data) and (mean_array is not None or std_array is not None):
        channels = np.asarray(data[0]["image"]).shape[-1]
        for name, array in (("mean", mean_array), ("std", std_array)):
            if array is not None and array.size not in (1, channels):
                raise ValueError(
                    f"{name} has {array.size} values but the images have {channels} channel(s)"
                )
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)

    ds = grain.MapDataset.source(data)
    count, index = shard_options.shard_count, shard_options.shard_index
    stop = (len(ds) // count) * count if shard_options.drop_remainder else len(ds)
    ds = ds[index:stop:count]
    num_examples = len(ds)
    if num_examples == 0:
        raise ValueError(
            f"split {split!r} has no examples for shard {index} of {count}; "
            f"the split holds {len(data)}"
        )
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.map(to_example)
    if augmentation is not None:
        ds = ds.random_map(functools.partial(augment_example, augment=augmentation))
    ds = ds.map(functools.partial(normalize_example, mean=mean_array, std=std_array))
    # Batch before repeat: each epoch is batched on its own, and the epoch index reaches the
    # shuffle and the augmentation so every epoch differs.
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if len(ds) == 0:
        raise ValueError(
            f"batch_size {batch_size} with drop_remainder=True leaves no batch from the "
            f"{num_examples} examples of split {split!r} in this shard"
        )
    ds = ds.repeat(num_epochs)
    # The elements here are whole batches: grain's default read-ahead of 500 elements would decode
    # 500 batches beyond what training consumes.
    iter_ds = ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return SaliencyLoader(
        dataset=iter_ds,
        num_examples=num_examples,
        batch_size=int(batch_size),
        drop_remainder=bool(drop_remainder),
        num_epochs=num_epochs,
    )


def iterator_state(iterator: grain.DatasetIterator) -> bytes:
    """The iterator's position as JSON bytes (store them next to a model checkpoint)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode()


def restore_iterator(
    iterator: grain.DatasetIterator, state: bytes | str | Mapping[str, Any]
) -> grain.DatasetIterator:
    """Moves a fresh iterator of the same loader to a saved position; returns it."""
    loaded = json.loads(state) if isinstance(state, (bytes, str)) else state
    iterator.set_state(dict(loaded))
    return iterator
