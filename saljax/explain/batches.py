"""Incoming batches checked, completed and regrouped into chunks of one compiled shape."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from jax.typing import ArrayLike


def as_numpy_batch(
    batch: Mapping[str, ArrayLike], index: int, map_metrics: bool, num_classes: int
) -> dict[str, np.ndarray]:
    """Checks one incoming batch and fills the optional keys; numpy arrays out."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch {index} must be a dict of arrays (image, label, ...); got {type(batch).__name__}")
    for key in ("image", "label"):
        if key not in batch:
            raise ValueError(f"batch {index} has no {key!r} entry; it has {sorted(batch)}")
    image = np.asarray(batch["image"], np.float32)
    if image.ndim != 4:
        raise ValueError(f"batch {index}: 'image' must have shape (B, H, W, C); got {image.shape}")
    b, h, w, _ = image.shape
    label = np.asarray(batch["label"])
    if label.shape != (b,) or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"batch {index}: 'label' must be integers of shape ({b},); got {label.dtype} {label.shape}")
    bad = np.nonzero((label < 0) | (label >= num_classes))[0]
    if bad.size:
        raise ValueError(
            f"batch {index}: 'label' must lie in [0, num_classes={num_classes}); samples {bad.tolist()} have "
            f"labels {label[bad].tolist()}"
        )
    if "saliency_map" in batch:
        smap = np.asarray(batch["saliency_map"], np.float32)
        if smap.shape != (b, h, w):
            raise ValueError(
                f"batch {index}: 'saliency_map' must have the image size, shape ({b}, {h}, {w}); got {smap.shape}"
            )
        has_map = np.asarray(batch["has_map"], bool) if "has_map" in batch else np.ones((b,), bool)
    elif map_metrics:
        raise ValueError(
            f"batch {index} has no 'saliency_map' entry, so the map metrics cannot be computed; pass "
            "map_metrics=False (saljax explain --no-map-metrics) to explain without human maps"
        )
    else:
        smap, has_map = np.zeros((b, h, w), np.float32), np.zeros((b,), bool)
    if has_map.shape != (b,):
        raise ValueError(f"batch {index}: 'has_map' must have shape ({b},); got {has_map.shape}")
    group = np.asarray(batch["group"], np.int32) if "group" in batch else np.zeros((b,), np.int32)
    if group.shape != (b,):
        raise ValueError(f"batch {index}: 'group' must have shape ({b},); got {group.shape}")
    return {"image": image, "label": label.astype(np.int32), "saliency_map": smap, "has_map": has_map, "group": group}


def no_maps_error(split_name: str, num_images: int) -> ValueError:
    """The error for a split in which no image has a human map (the map metrics need one)."""
    return ValueError(
        f"no sample of split {split_name!r} has a human saliency map (has_map is False for all {num_images} "
        "images), so the map metrics cannot be computed; pass map_metrics=False (saljax explain "
        "--no-map-metrics) to explain without them"
    )


def rebatch(
    batches: Iterable[dict[str, np.ndarray]], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Regroups batches into chunks of exactly `batch_size` (the last one zero-padded): (chunk, valid)."""
    buffer: list[dict[str, np.ndarray]] = []
    count = 0
    shape = None
    for batch in batches:
        if shape is None:
            shape = batch["image"].shape[1:]
        elif batch["image"].shape[1:] != shape:
            raise ValueError(
                f"all images must have one size (H, W, C) = {shape}; a later batch has {batch['image'].shape[1:]}"
            )
        buffer.append(batch)
        count += len(batch["label"])
        while count >= batch_size:
            cat = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
            yield {k: v[:batch_size] for k, v in cat.items()}, batch_size
            rest = {k: v[batch_size:] for k, v in cat.items()}
            count -= batch_size
            buffer = [rest] if count else []
    if count:
        cat = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
        padded = {k: np.concatenate([v, np.zeros((batch_size - count, *v.shape[1:]), v.dtype)]) for k, v in cat.items()}
        yield padded, count


def num_examples(batches: Any) -> int | None:
    """Images the batches hold, when that is known without iterating (for the progress bar)."""
    if getattr(batches, "num_examples", None) is not None and getattr(batches, "num_epochs", 1) is not None:
        return int(batches.num_examples) * int(getattr(batches, "num_epochs", 1) or 1)
    if isinstance(batches, Sequence):
        try:
            return int(sum(len(b["label"]) for b in batches))
        except (KeyError, TypeError):
            return None
    return None
