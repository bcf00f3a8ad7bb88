"""The batch that every saliency-guided loss and train step consumes.

A batch is a mapping of arrays with these keys:

| key            | dtype        | shape                      | meaning                                  |
|----------------|--------------|----------------------------|------------------------------------------|
| `image`        | float        | (B, H, W, C)               | the inputs, NHWC                         |
| `label`        | int          | (B,)                       | class indices in [0, K)                  |
| `saliency_map` | float        | (B, H, W) or (B, h, w)     | human map / lesion mask `H`, in [0, 1]   |
| `has_map`      | bool / float | (B,)                       | `m_n`: 1 where sample n carries a map    |

`saliency_map` is needed only by the penalties; `has_map` defaults to all ones. Maps are given at the
image resolution; the CAM losses also accept them at the feature-map resolution (h, w).

Two kinds of checks, for two moments:
- shapes are checked while tracing (`check_batch`, called by every loss), so a wrong rank or size
    fails before XLA sees it, with a message naming the key;
- values (maps outside [0, 1], labels outside [0, K), NaN/inf) cannot be seen while tracing, so
    `validate_batch` checks concrete arrays on the host, where the data pipeline hands them over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Batch = Mapping[str, Array]

IMAGE = "image"
LABEL = "label"
SALIENCY_MAP = "saliency_map"
HAS_MAP = "has_map"


def _shape(batch: Batch, key: str) -> tuple[int, ...]:
    if key not in batch:
        raise ValueError(f"batch has no {key!r} entry (keys: {sorted(batch)}); see saljax.batch for the layout")
    return tuple(np.shape(batch[key]))


def check_batch(
        batch: Batch,
        *,
        needs_map: bool = False,
        map_sizes: Sequence[tuple[int, int]] | None = None,
) -> None:
    """Checks ranks and sizes of a batch; raises ValueError naming the key and the expected form.

    Args:
        batch: see the module docstring.
        needs_map: whether `saliency_map` must be present (if present it is checked anyway).
        map_sizes: the spatial sizes (height, width) a map may have; None accepts any size.
    """
    image = _shape(batch, IMAGE)
    if len(image) != 4:
        raise ValueError(f"batch['image'] must have shape (B, H, W, C) (NHWC); got shape {image}")
    b = image[0]
    label = _shape(batch, LABEL)
    if label != (b,):
        raise ValueError(f"batch['label'] must have shape (B,) = ({b},) to match batch['image'] {image}; got {label}")
    # The dtype without a device transfer: batches arrive as numpy arrays or traced/jax arrays.
    label_dtype = getattr(batch[LABEL], "dtype", None) or np.asarray(batch[LABEL]).dtype
    if not jnp.issubdtype(label_dtype, jnp.integer):
        raise ValueError(f"batch['label'] must hold integer class indices; got dtype {label_dtype}")
    if HAS_MAP in batch and _shape(batch, HAS_MAP) != (b,):
        raise ValueError(f"batch['has_map'] must have shape (B,) = ({b},); got {_shape(batch, HAS_MAP)}")
    if not needs_map and SALIENCY_MAP not in batch:
        return
    smap = _shape(batch, SALIENCY_MAP)
    sizes = [tuple(s) for s in map_sizes] if map_sizes is not None else None
    expected = " or ".join(f"({b}, {sh}, {sw})" for sh, sw in sizes) if sizes else "(B, H, W)"
    if len(smap) != 3:
        raise ValueError(
                f"batch['saliency_map'] must have shape (B, H, W), one map per image without a channel axis,"
                f" i.e. {expected}; got shape {smap}")
    if smap[0] != b:
        raise ValueError(f"batch['saliency_map'] has {smap[0]} maps but batch['image'] has {b} images")
    if sizes is not None and tuple(smap[1:]) not in sizes:
        raise ValueError(f"batch['saliency_map'] must have shape {expected}; got {smap}")


def map_weights(batch: Batch) -> Array:
    """`m_n` as float32 (B,): 1 where sample n carries a saliency map (all ones without `has_map`)."""
    b = np.shape(batch[IMAGE])[0]
    if HAS_MAP not in batch:
        return jnp.ones((b,), jnp.float32)
    return jnp.asarray(batch[HAS_MAP]).astype(jnp.float32)


def validate_batch(batch: Batch, num_classes: int | None = None) -> None:
    """Checks the values of a concrete batch on the host; raises one ValueError listing every problem.

    Checks: shapes (as `check_batch`), finite images, labels in [0, num_classes), finite maps in
    [0, 1], `has_map` in {0, 1}. Call it where batches leave the data pipeline: under `jit` values
    are not visible, so the losses themselves check shapes only.
    """
    check_batch(batch)
    if _shape(batch, IMAGE)[0] == 0:
        raise ValueError("invalid batch: it holds no samples (batch['image'] has shape "
                         f"{_shape(batch, IMAGE)}); a batch needs at least one image")
    problems = []
    image = np.asarray(batch[IMAGE])
    if not np.issubdtype(image.dtype, np.floating) and not np.issubdtype(image.dtype, np.integer):
        problems.append(f"batch['image'] must be numeric; got dtype {image.dtype}")
    elif not np.all(np.isfinite(image)):
        bad = np.unique(np.nonzero(~np.isfinite(image))[0]).tolist()
        problems.append(f"batch['image'] holds NaN or inf values (samples {bad})")
    label = np.asarray(batch[LABEL])
    if num_classes is None:  # without the class count, negative labels are still wrong
        bad = np.nonzero(label < 0)[0].tolist()
        if bad:
            problems.append(f"batch['label'] must be >= 0; samples {bad} have labels {label[bad].tolist()}")
    else:
        bad = np.nonzero((label < 0) | (label >= num_classes))[0].tolist()
        if bad:
            problems.append(
                    f"batch['label'] must lie in [0, {num_classes}); samples {bad} have labels {label[bad].tolist()}")
    if SALIENCY_MAP in batch:
        smap = np.asarray(batch[SALIENCY_MAP], dtype=np.float64)
        flat = smap.reshape(smap.shape[0], -1)
        bad = np.nonzero(~np.all(np.isfinite(flat) & (flat >= 0.0) & (flat <= 1.0), axis=1))[0].tolist()
        if bad:
            problems.append(
                    f"batch['saliency_map'] must hold finite values in [0, 1]; samples {bad} do not"
                    f" (min {np.nanmin(smap):.4g}, max {np.nanmax(smap):.4g})")
    if HAS_MAP in batch:
        has_map = np.asarray(batch[HAS_MAP])
        if not np.all((has_map == 0) | (has_map == 1)):
            problems.append(f"batch['has_map'] must hold 0/1 or booleans; got {np.unique(has_map).tolist()}")
    if problems:
        raise ValueError("invalid batch: " + "; ".join(problems))
