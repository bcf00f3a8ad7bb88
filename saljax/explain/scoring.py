"""Scores every map of a split against the human maps and keeps the images to plot (`explain`)."""
from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from saljax import metrics
from saljax.explain.batches import as_numpy_batch, no_maps_error, num_examples, rebatch
from saljax.explain.engine import make_cd_share_fn, make_explain_fn, model_attr, resolve_methods, supports_decomposition
from saljax.explain.settings import (
    MAP_METRICS,
    REGION_METRICS,
    SET_METRICS,
    ExplainConfig,
    ExplainResults,
    Selected,
)


def _margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`z_t - max_{k != t} z_k` (for two classes `z_t - z_f`): (B,)."""
    true = np.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    others = logits.copy()
    np.put_along_axis(others, labels[:, None], -np.inf, axis=1)
    return (true - others.max(axis=1)).astype(np.float64)


def _map_metrics(s: np.ndarray, smap: np.ndarray, has_map: np.ndarray, config: ExplainConfig) -> dict[str, np.ndarray]:
    """Every `MAP_METRICS` value of maps s (B, H, W) against smap; NaN where there is no map."""
    q, t = config.top_q, config.map_threshold
    k = max(1, round(q * s.shape[1] * s.shape[2]))  # top-k intersection: the top-q share of the pixels
    out = {
        "energy_inside": metrics.energy_inside(s, smap),
        "auc": metrics.pixel_auc(s, smap, threshold=t),
        "pointing_game": metrics.pointing_game(s, smap, threshold=t),
        "iou_top_q": metrics.top_q_iou(s, smap, q=q, threshold=t),
        "precision_top_q": metrics.top_q_precision(s, smap, q=q, threshold=t),
        "attribution_localisation": metrics.attribution_localisation(s, smap, threshold=t),
        "top_k_intersection": metrics.top_k_intersection(s, smap, k, threshold=t),
        "relevance_rank_accuracy": metrics.relevance_rank_accuracy(s, smap, threshold=t),
        "relevance_mass_accuracy": metrics.relevance_mass_accuracy(s, smap, threshold=t),
        "energy_pointing_game": metrics.energy_pointing_game(s, smap, threshold=t),
        "saliency_iou": metrics.saliency_iou(s, smap, threshold=t),
    }
    return {k: np.where(has_map, np.asarray(v, np.float64), np.nan) for k, v in out.items()}


class _WrongReason:
    """XIL's WR of one map kind over a split, streamed: the threshold needs every image first.

    `t` is the mean over all images of each normalised map's mean; `WR_n = 100 * sum(A [m > t]) /
    sum(A)` with `A = 1 - H` (the region that must not matter) on images with a map. Only the
    normalised values on `A` are kept until the end (memory grows with the split's `A` pixels).
    """

    def __init__(self) -> None:
        self.mean_sum, self.count = 0.0, 0
        self.kept: list[tuple[np.ndarray, np.ndarray] | None] = []

    def add(self, maps: np.ndarray, smap: np.ndarray, has_map: np.ndarray) -> None:
        normalised = np.asarray(metrics.normalize_maps(maps), np.float32)
        self.mean_sum += float(normalised.mean(axis=(1, 2)).sum())
        self.count += len(normalised)
        for m, h, has in zip(normalised, smap, has_map):
            region = 1.0 - h
            on = region > 0
            self.kept.append((m[on], region[on]) if has and on.any() else None)

    def per_image(self) -> np.ndarray:
        t = self.mean_sum / max(self.count, 1)
        return np.array([np.nan if item is None else 100.0 * float(np.sum(item[1] * (item[0] > t)) / np.sum(item[1]))
                         for item in self.kept])


def _region_metrics(
    d: np.ndarray, smap: np.ndarray | None, config: ExplainConfig
) -> tuple[dict[str, float], np.ndarray, list[metrics.Region]]:
    labels, regions = metrics.top_regions(
        d, smap, q=config.top_q, threshold=config.map_threshold, connectivity=config.connectivity
    )
    values = {
        "num_regions": float(len(regions)),
        "top_region_energy_fraction": regions[0].energy_fraction if regions else float("nan"),
        "top_region_overlap": regions[0].overlap if regions and smap is not None else float("nan"),
    }
    return values, labels, regions


class _Keeper:
    """The indices of the k items with the largest priority seen so far (ties: earlier index first)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[float, int]] = []  # (priority, -index): the smallest is evicted first

    def offer(self, priority: float, index: int) -> tuple[bool, int | None]:
        """Returns (kept, evicted index or None)."""
        if self.k <= 0:
            return False, None
        item = (priority, -index)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
            return True, None
        if item > self.heap[0]:
            evicted = heapq.heappushpop(self.heap, item)
            return True, -evicted[1]
        return False, None

    def indices(self) -> list[int]:
        return [-i for _, i in sorted(self.heap, reverse=True)]


def _default_rank_key(methods: Sequence[str], map_metrics: bool) -> str:
    if map_metrics:
        method = "divergence" if "divergence" in methods else methods[0]
        return f"{method}/energy_inside"
    return "margin"


def _aggregate(per_image: Mapping[str, np.ndarray], methods: Sequence[str]) -> dict[str, Any]:
    def table(select: np.ndarray) -> dict[str, dict[str, dict[str, float | int]]]:
        out: dict[str, dict[str, dict[str, float | int]]] = {
            "model": {
                "correct": metrics.aggregate(per_image["correct"][select]),
                "margin": metrics.aggregate(per_image["margin"][select]),
            }
        }
        if "cd_share" in per_image:
            out["model"]["cd_share"] = metrics.aggregate(per_image["cd_share"][select])
        for method in methods:
            keys = [k for k in per_image if k.startswith(method + "/")]
            if keys:
                out[method] = {k.split("/", 1)[1]: metrics.aggregate(per_image[k][select]) for k in keys}
        return out

    groups = per_image["group"]
    return {
        "split": table(np.ones(len(groups), bool)),
        "groups": {int(g): table(groups == g) for g in np.unique(groups)},
    }


def explain(
    model: nnx.Module,
    batches: Iterable[Mapping[str, ArrayLike]] | Mapping[str, ArrayLike],
    *,
    config: ExplainConfig = ExplainConfig(),
    split_name: str = "split",
    num_images: int = 8,
    rank_by: str = "auto",
    key: jax.Array | None = None,
    progress: bool = True,
) -> ExplainResults:
    """Computes every map and metric over `batches`; writes nothing.

    Args:
      model: an NNX model with `features`, `head`, `num_classes`, `head_type` (eval mode is used).
      batches: an iterable of batch dicts (a `saljax.data.make_loader` loader, a list) or one
        batch: image float (B, H, W, C), label int (B,), and optionally saliency_map (B, H, W) in
        [0, 1], has_map bool (B,), group int (B,). Batches are regrouped into chunks of
        `config.batch_size`.
      config: see `ExplainConfig`.
      split_name: the split's name, for the report.
      num_images: how many images to keep for plotting at each end of the ranking.
      rank_by: the per-image value that ranks the images: "auto" (`divergence/energy_inside`
        when the divergence map and map metrics are computed, else `<first method>/energy_inside`,
        or `margin` without map metrics), "margin", or any `<method>/<metric>` key. Images where it
        is NaN (no map) are not ranked. `divergence/energy_inside` is the fraction of the positive
        divergence inside the human map: the images where the true- and false-class CAMs divide
        most / least on what humans marked (0 when D is nowhere positive: the false class wins
        everywhere).
      key: PRNG key for SmoothGrad (default `jax.random.key(config.seed)`); chunk i uses
        `fold_in(key, i)`.
      progress: show a tqdm progress bar (images).

    Returns:
      An `ExplainResults`.

    Raises:
      ValueError: bad methods for the model (see `resolve_methods`), malformed batches, no batch,
        or, with `config.map_metrics`, batches without `saliency_map` or no sample with a map.
    """
    methods = resolve_methods(model, config.methods)
    config = dataclasses.replace(config, methods=methods)
    if isinstance(batches, Mapping):
        batches = [batches]
    if hasattr(batches, "num_epochs") and batches.num_epochs is None:
        raise ValueError("the loader repeats forever (num_epochs=None); make it with num_epochs=1 to explain a split")
    if rank_by == "auto":
        rank_key = _default_rank_key(methods, config.map_metrics)
    else:
        rank_key = rank_by
        allowed = ["margin"] + [f"{m}/{k}" for m in methods for k in MAP_METRICS
                                if config.map_metrics and k not in SET_METRICS]
        if "divergence" in methods:
            allowed += [f"divergence/{k}" for k in REGION_METRICS]
        if rank_key not in allowed:
            raise ValueError(f"rank_by must be 'auto' or one of {allowed}; got {rank_by!r}")
    num_classes = int(model_attr(model, "num_classes"))
    fn = make_explain_fn(model, methods, config)
    key = jax.random.key(config.seed) if key is None else key

    incoming = (as_numpy_batch(b, i, config.map_metrics, num_classes) for i, b in enumerate(batches))
    columns: dict[str, list[np.ndarray]] = {}
    most, least = _Keeper(num_images), _Keeper(num_images)
    kept: dict[int, Selected] = {}
    image_shape = None
    offset = 0
    wrong_reason = {m: _WrongReason() for m in methods} if config.map_metrics else {}
    cd_share = make_cd_share_fn(model, config.target) if config.map_metrics and supports_decomposition(model) else None

    def finish(chunk: dict[str, np.ndarray], valid: int, out: dict[str, Any]) -> None:
        nonlocal offset, cd_share
        out = jax.tree.map(lambda a: np.asarray(a)[:valid], jax.device_get(out))
        chunk = {k: v[:valid] for k, v in chunk.items()}
        logits, labels = out["logits"], chunk["label"]
        pred = logits.argmax(axis=1).astype(np.int32)
        cols = {
            "index": np.arange(offset, offset + valid),
            "label": labels,
            "pred": pred,
            "correct": (pred == labels).astype(np.float64),
            "margin": _margin(logits, labels),
            "group": chunk["group"],
            "has_map": chunk["has_map"],
        }
        smap, has_map = chunk["saliency_map"], chunk["has_map"]
        if cd_share is not None:
            try:
                shares = cd_share(jnp.asarray(chunk["image"]), jnp.asarray(labels), jnp.asarray(smap))
            except ValueError:  # a layer without decomposition rules: the model has no CD share
                cd_share = None
            else:
                cols["cd_share"] = np.where(has_map, np.asarray(shares, np.float64), np.nan)
        for method in methods:
            if config.map_metrics:
                for name, value in _map_metrics(out["maps"][method], smap, has_map, config).items():
                    cols[f"{method}/{name}"] = value
                wrong_reason[method].add(out["maps"][method], smap, has_map)
        region_info: list[tuple[np.ndarray, list[metrics.Region]]] = []
        if "divergence" in methods:
            rows = {k: np.full(valid, np.nan) for k in REGION_METRICS}
            for n in range(valid):
                hmap = smap[n] if (config.map_metrics and has_map[n]) else None
                values, labels_n, regions = _region_metrics(out["maps"]["divergence"][n], hmap, config)
                for k, v in values.items():
                    rows[k][n] = v
                region_info.append((labels_n, regions))
            cols.update({f"divergence/{k}": v for k, v in rows.items()})
        for k, v in cols.items():
            columns.setdefault(k, []).append(np.asarray(v))
        # Keep the candidates for plotting at both ends of the ranking.
        scores = np.asarray(cols[rank_key], np.float64)
        for n in range(valid):
            if not np.isfinite(scores[n]):
                continue
            index = offset + n
            in_most, out_most = most.offer(scores[n], index)
            in_least, out_least = least.offer(-scores[n], index)
            if in_most or in_least:
                kept[index] = Selected(
                    index=index,
                    score=float(scores[n]),
                    image=chunk["image"][n].copy(),
                    saliency_map=smap[n].copy() if has_map[n] else None,
                    label=int(labels[n]),
                    pred=int(pred[n]),
                    margin=float(cols["margin"][n]),
                    group=int(chunk["group"][n]),
                    maps={m: out["maps"][m][n].copy() for m in methods},
                    values={k: float(v[n]) for k, v in cols.items() if "/" in k},
                    region_labels=region_info[n][0] if region_info else None,
                    regions=list(region_info[n][1][: config.max_regions]) if region_info else [],
                )
            for evicted in (out_most, out_least):
                if evicted is not None and evicted not in most.indices() and evicted not in least.indices():
                    kept.pop(evicted, None)
        offset += valid

    with tqdm(total=num_examples(batches), unit="img", desc=f"explain {split_name}", disable=not progress) as bar:
        pending: tuple[dict[str, np.ndarray], int, dict[str, Any]] | None = None
        for i, (chunk, valid) in enumerate(rebatch(incoming, config.batch_size)):
            if image_shape is None:
                image_shape = chunk["image"].shape[1:]
                if image_shape[-1] != getattr(model, "in_channels", image_shape[-1]):
                    raise ValueError(
                        f"the model expects images with in_channels={model_attr(model, 'in_channels')}; the batches have "
                        f"{image_shape[-1]} channel(s) (shape {chunk['image'].shape})"
                    )
            # Dispatch this chunk before scoring the previous one, so device and host overlap.
            out = fn(jnp.asarray(chunk["image"]), jnp.asarray(chunk["label"]), jax.random.fold_in(key, i))
            if pending is not None:
                finish(*pending)
                bar.update(pending[1])
            pending = (chunk, valid, out)
        if pending is not None:
            finish(*pending)
            bar.update(pending[1])
    if offset == 0:
        raise ValueError("explain got no images: the batches are empty")
    per_image = {k: np.concatenate(v) for k, v in columns.items()}
    for method, streamed in wrong_reason.items():
        per_image[f"{method}/wrong_reason"] = streamed.per_image()
    if config.map_metrics and not per_image["has_map"].any():
        raise no_maps_error(split_name, offset)
    return ExplainResults(
        split=split_name,
        methods=methods,
        config=config,
        model_info={
            "class": type(model).__name__,
            "num_classes": num_classes,
            "head_type": model_attr(model, "head_type"),
            "in_channels": model_attr(model, "in_channels"),
            "image_shape": tuple(int(s) for s in image_shape or ()),
        },
        per_image=per_image,
        aggregate=_aggregate(per_image, methods),
        rank_key=rank_key,
        most=[kept[i] for i in most.indices()],
        least=[kept[i] for i in least.indices()],
    )
