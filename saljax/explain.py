"""Post-hoc explanations of a trained saljax classifier, scored against human saliency maps.

For every image of a dataset split, one jit-compiled function per batch computes the requested
maps (`METHODS`), all from one shared forward pass where the method allows it:

| name                   | map                                                                    |
|------------------------|------------------------------------------------------------------------|
| `gradient`             | vanilla gradient `g = d s(z) / dx`, reduced over channels              |
| `gradient_x_input`     | `x * g`, reduced over channels                                         |
| `integrated_gradients` | `(x - x0) * sum_k w_k g(x0 + a_k (x - x0))` (`ig_steps` nodes), reduced |
| `smoothgrad`           | mean of `g(x + e)` over `smoothgrad_samples` noisy copies, reduced     |
| `grad_cam`             | `relu(sum_k alpha_k A_k)`, `alpha_k = mean_ij d s / d A_k`             |
| `cam_true`             | `CAM_t`, the CAM of the true class (binary GAP models)                 |
| `cam_false`            | `CAM_f`, the CAM of the other class (binary GAP models)                |
| `divergence`           | `D = CAM_t - CAM_f` (METHODS.md section 5): `mean_ij D = margin - (b_t - b_f)` |

`s(z)` is the target-class logit (`score="logit"`, default) or its log-probability, for the true
label (`target="true"`, default) or the predicted class. Feature-map-resolution maps (CAMs,
Grad-CAM) are upsampled bilinearly to the image size. Gradient-type maps become a non-negative
2-D saliency by `reduce`: `abs_sum` (default) `sum_c |v_c|`, `square_sum` `sum_c v_c^2`, or
`abs_max` `max_c |v_c|`. The CAM maps keep their sign; metrics that need an energy use the
positive part.

Every map is scored per image against the human map `H` (`saljax.metrics`; `M = H >= 0.5`):
`energy_inside` (fraction of positive saliency energy inside `H`), `auc` (pixel ROC AUC of the
saliency as a predictor of `M`), `pointing_game` (maximum inside `M`), `iou_top_q` and
`precision_top_q` (IoU with / fraction inside `M` of the top-q region, q = 10% of the pixels by
default). For the divergence map its top regions (connected components of the top-q positive
divergence, ranked by energy) are found and scored (`top_region_overlap`,
`top_region_energy_fraction`, `num_regions`). Images without a map (`has_map` False) get NaN and
are left out of the aggregates (mean, std, count per method, per group and for the split).

Map metrics need maps: by default (`map_metrics=True`) batches without a `saliency_map` entry, or a
split where no sample has a map, raise a ValueError; pass `map_metrics=False` (CLI:
`--no-map-metrics`) to compute maps, margins and the report without them.

    from saljax import explain
    summary = explain.run(model, loader, out_dir="explain_out", split_name="test")

Speed: the maps of a batch come from one jitted function (cached per model structure and
settings); Integrated Gradients steps and SmoothGrad samples are unrolled up to
`ExplainConfig.max_unroll` because XLA:CPU runs loop bodies several times slower. See
`benchmarks/EXPLAIN_SPEED.md`.

`run` = `explain` (maps and metrics, no files) + `write_report` (PNG grids of the images where
decisions divide most and least inside the human maps, a summary figure, `report.md`,
`metrics.json`, `per_image.csv`). `add_arguments` / `main` implement `saljax explain`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import heapq
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saljax import _figures, metrics, saliency

Array = Any

__all__ = [
    "METHODS",
    "GRADIENT_METHODS",
    "CAM_METHODS",
    "BINARY_METHODS",
    "MAP_METRICS",
    "REGION_METRICS",
    "SIGNED_METHODS",
    "ExplainConfig",
    "ExplainResults",
    "Selected",
    "resolve_methods",
    "make_explain_fn",
    "explain_batch",
    "explain",
    "write_report",
    "run",
    "add_arguments",
    "main",
]

METHODS = (
    "gradient",
    "gradient_x_input",
    "integrated_gradients",
    "smoothgrad",
    "grad_cam",
    "cam_true",
    "cam_false",
    "divergence",
)
#: Maps computed from input gradients (reduced over channels to a non-negative 2-D map).
GRADIENT_METHODS = ("gradient", "gradient_x_input", "integrated_gradients", "smoothgrad")
#: Maps that need CAMs, exact only for a GAP + Dense head (`head_type == 'gap'`).
CAM_METHODS = ("cam_true", "cam_false", "divergence")
#: Maps defined for binary models only (the "false" class is `1 - label`).
BINARY_METHODS = ("cam_true", "cam_false", "divergence")
#: Maps that may be negative (metrics use their positive part as energy).
SIGNED_METHODS = ("cam_true", "cam_false", "divergence")
#: Per-image metrics of every map against the human map.
MAP_METRICS = ("energy_inside", "auc", "pointing_game", "iou_top_q", "precision_top_q")
#: Per-image metrics of the top regions of the divergence map.
REGION_METRICS = ("top_region_overlap", "top_region_energy_fraction", "num_regions")

TARGETS = ("true", "pred")
SCORES = ("logit", "log_softmax")
REDUCTIONS = ("abs_sum", "square_sum", "abs_max")
IG_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
SMOOTHGRAD_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")

_METRIC_TITLES = {
    "energy_inside": "energy inside",
    "auc": "ROC AUC",
    "pointing_game": "pointing game",
    "iou_top_q": "IoU top-q",
    "precision_top_q": "precision top-q",
    "top_region_overlap": "top region overlap",
    "top_region_energy_fraction": "top region energy share",
    "num_regions": "regions",
}


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    """Settings of an explanation run (all documented defaults).

    Attributes:
      methods: names from `METHODS`; None: every method the model supports (CAM maps need
        `head_type == 'gap'`, the true/false CAMs and the divergence map a binary model).
      target: which class the gradient maps and Grad-CAM explain: "true" (the label) or "pred".
      score: "logit" (the target logit, captum's convention) or "log_softmax".
      reduce: channel reduction of gradient-type maps: "abs_sum", "square_sum" or "abs_max".
      ig_steps: Integrated Gradients quadrature nodes (`n_steps`).
      ig_rule: its quadrature rule (see `saliency.integrated_gradients`).
      ig_baseline: the constant baseline image `x0`.
      smoothgrad_samples: noisy copies per image (`nt_samples`).
      smoothgrad_stdevs: noise std as a fraction of each image's value range (`stdevs`).
      smoothgrad_type: "smoothgrad", "smoothgrad_sq" or "vargrad".
      seed: seeds SmoothGrad's noise when no key is passed.
      batch_size: images per jit-compiled call (the last chunk is padded, so one compilation).
      top_q: fraction of the pixels in the top-q region (IoU, precision, divergence regions).
      map_threshold: `M = H >= map_threshold` binarises the human map.
      connectivity: 4 or 8, for the connected regions of the divergence map.
      max_regions: regions of the divergence map listed per plotted image.
      map_metrics: compute metrics against the human maps; if True, missing maps raise.
      max_unroll: Integrated Gradients steps / SmoothGrad samples up to this count are unrolled
        in the compiled program (XLA:CPU runs loop bodies several times slower); more use
        `lax.scan` (`saliency.integrated_gradients` / `smoothgrad`), bounding compile time.
      steps_per_pass: IG steps / SmoothGrad samples computed together in one vmapped pass when
        unrolled (fewer passes to compile; memory grows with it).
    """

    methods: tuple[str, ...] | None = None
    target: str = "true"
    score: str = "logit"
    reduce: str = "abs_sum"
    ig_steps: int = 16
    ig_rule: str = "gausslegendre"
    ig_baseline: float = 0.0
    smoothgrad_samples: int = 16
    smoothgrad_stdevs: float = 0.15
    smoothgrad_type: str = "smoothgrad"
    seed: int = 0
    batch_size: int = 64
    top_q: float = 0.1
    map_threshold: float = 0.5
    connectivity: int = 8
    max_regions: int = 5
    map_metrics: bool = True
    max_unroll: int = 32
    steps_per_pass: int = 4

    def __post_init__(self) -> None:
        if self.methods is not None:
            # "a,b" (the command line's form) or a sequence of names.
            names = self.methods.split(",") if isinstance(self.methods, str) else self.methods
            object.__setattr__(self, "methods", tuple(m.strip() for m in names if m.strip()))
        for name, value, choices in (
            ("target", self.target, TARGETS),
            ("score", self.score, SCORES),
            ("reduce", self.reduce, REDUCTIONS),
            ("ig_rule", self.ig_rule, IG_RULES),
            ("smoothgrad_type", self.smoothgrad_type, SMOOTHGRAD_TYPES),
        ):
            if value not in choices:
                raise ValueError(f"ExplainConfig.{name} must be one of {choices}; got {value!r}")
        for name in ("ig_steps", "smoothgrad_samples", "batch_size", "max_unroll", "steps_per_pass"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ExplainConfig.{name} must be a positive int; got {value!r}")
        if self.ig_rule == "riemann_trapezoid" and self.ig_steps < 2:
            raise ValueError(f"ExplainConfig.ig_steps must be >= 2 for riemann_trapezoid; got {self.ig_steps}")
        if not self.smoothgrad_stdevs >= 0:
            raise ValueError(f"ExplainConfig.smoothgrad_stdevs must be >= 0; got {self.smoothgrad_stdevs!r}")
        if not 0.0 < self.top_q <= 1.0:
            raise ValueError(f"ExplainConfig.top_q must be a fraction in (0, 1]; got {self.top_q!r}")
        if not 0.0 < self.map_threshold <= 1.0:
            raise ValueError(f"ExplainConfig.map_threshold must lie in (0, 1]; got {self.map_threshold!r}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"ExplainConfig.connectivity must be 4 or 8; got {self.connectivity!r}")
        if self.max_regions < 0:
            raise ValueError(f"ExplainConfig.max_regions must be >= 0; got {self.max_regions!r}")


@dataclasses.dataclass
class Selected:
    """Everything needed to plot one image: arrays (H, W, C) / (H, W), numbers and regions."""

    index: int
    score: float
    image: np.ndarray
    saliency_map: np.ndarray | None
    label: int
    pred: int
    margin: float
    group: int
    maps: dict[str, np.ndarray]
    values: dict[str, float]
    region_labels: np.ndarray | None = None
    regions: list[metrics.Region] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ExplainResults:
    """What `explain` computed; `write_report` turns it into files.

    Attributes:
      split: the split's name (for titles and file names).
      methods: the methods computed, in order.
      config: the settings used.
      model_info: model class, num_classes, head_type, in_channels and the image size.
      per_image: arrays (N,) in dataset order: `index`, `label`, `pred`, `correct`, `margin`,
        `group`, `has_map`, and `<method>/<metric>` for every map metric (NaN where undefined).
      aggregate: `{"split": {name: {metric: {"mean", "std", "count"}}}, "groups": {g: {...}}}`
        where `name` is a method or "model" (metrics `correct`, i.e. accuracy, and `margin`).
      rank_key: the per-image value that ranks the images (see `explain`).
      most, least: the images with the largest / smallest `rank_key`, best first.
    """

    split: str
    methods: tuple[str, ...]
    config: ExplainConfig
    model_info: dict[str, Any]
    per_image: dict[str, np.ndarray]
    aggregate: dict[str, Any]
    rank_key: str
    most: list[Selected]
    least: list[Selected]


# --- methods and the jitted map computation ------------------------------------------------------


def _model_attr(model: Any, name: str) -> Any:
    return getattr(model, name, None)


def resolve_methods(model: nnx.Module, methods: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The methods to compute for `model`, checked; None picks every method the model supports.

    Raises:
      ValueError: unknown method; a CAM method (`CAM_METHODS`) on a model whose `head_type` is not
        'gap'; a true/false CAM or divergence map on a model whose `num_classes` is not 2.
    """
    head_type = _model_attr(model, "head_type")
    num_classes = _model_attr(model, "num_classes")
    if methods is None:
        return tuple(
            m
            for m in METHODS
            if (m not in CAM_METHODS or head_type == "gap") and (m not in BINARY_METHODS or num_classes == 2)
        )
    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m.strip()]
    methods = tuple(m.strip() for m in methods)
    if not methods:
        raise ValueError(f"methods must name at least one of {METHODS}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown explanation method(s) {unknown}; expected some of {METHODS}")
    for m in methods:
        if m in CAM_METHODS and head_type != "gap":
            raise ValueError(
                f"method {m!r} needs class activation maps, which are defined only for a model whose head is "
                f"global average pooling + Dense (head_type 'gap'); this model has head_type {head_type!r}"
            )
        if m in BINARY_METHODS and num_classes != 2:
            raise ValueError(
                f"method {m!r} compares the CAMs of the true and the false class and needs a binary model "
                f"(num_classes == 2); this model has num_classes={num_classes!r}"
            )
    return tuple(dict.fromkeys(methods))  # drop repeats, keep order


def _reduce_channels(values: Array, how: str) -> Array:
    """(B, H, W, C) -> non-negative (B, H, W) float32."""
    values = values.astype(jnp.float32)
    if how == "abs_sum":
        return jnp.sum(jnp.abs(values), axis=-1)
    if how == "square_sum":
        return jnp.sum(values * values, axis=-1)
    return jnp.max(jnp.abs(values), axis=-1)


def _upsample(values: Array, size: tuple[int, int]) -> Array:
    """(B, h, w) -> (B, H, W), bilinear with half-pixel centres (`jax.image.resize`)."""
    values = values.astype(jnp.float32)
    if tuple(values.shape[1:]) == tuple(size):
        return values
    return jax.image.resize(values, (values.shape[0], *size), method="bilinear")


def _score_fn(score: str, target: Array) -> Callable[[Array], Array]:
    return saliency.logit_score(target) if score == "logit" else saliency.log_softmax_score(target)


def _eval_view(model: nnx.Module) -> nnx.Module:
    """`model` in eval mode (BatchNorm with running statistics), as a view: `model` is not changed."""
    try:
        return nnx.view(model, use_running_average=True)
    except ValueError as err:
        if "use_running_average" not in str(err):
            raise
        return model  # no layer has a train/eval mode


def make_explain_fn(
    model: nnx.Module, methods: Sequence[str], config: ExplainConfig = ExplainConfig()
) -> Callable[[Array, Array, Array], dict[str, Any]]:
    """One jit-compiled function computing every map of a batch, with the model in eval mode.

    Vanilla gradient, gradient x input and Grad-CAM share one forward pass and one VJP through
    `features` and `head` (the head's VJP gives `d s / d A` for Grad-CAM, continuing it through
    `features` gives `d s / dx`); the CAMs reuse that pass's feature map. Integrated Gradients and
    SmoothGrad run their own passes (`lax.scan` over the steps / samples).

    Args:
      model: an NNX model with `features`, `head`, `num_classes` (e.g. `saljax.models.create`);
        it is viewed with `use_running_average=True` and never modified.
      methods: names from `METHODS`, checked with `resolve_methods`.
      config: settings (target, score, reduce, IG and SmoothGrad parameters).

    Returns:
      `f(images (B, H, W, C), labels (B,) int, key) -> {"logits": (B, K), "maps": {method: (B, H,
      W)}, "lowres": {method: (B, h, w)}}` where "lowres" holds the feature-map-resolution maps
      (Grad-CAM, CAMs, divergence) before upsampling. `key` seeds SmoothGrad's noise.
    """
    methods = resolve_methods(model, tuple(methods))
    graphdef, state = nnx.split(_eval_view(model))
    # Only the fields that change the computation key the cache (not batch size or metric options).
    jitted = _compiled_explain_fn(
        graphdef,
        methods,
        (config.target, config.score, config.reduce, config.ig_steps, config.ig_rule, config.ig_baseline,
         config.smoothgrad_samples, config.smoothgrad_stdevs, config.smoothgrad_type, config.max_unroll,
         config.steps_per_pass),
    )
    return lambda images, labels, key: jitted(state, images, labels, key)


@functools.lru_cache(maxsize=32)
def _compiled_explain_fn(graphdef: Any, methods: tuple[str, ...], options: tuple) -> Callable:
    """The jitted map computation of `make_explain_fn`, shared by models of one structure.

    Cached so that explaining several splits (or checkpoints of one architecture) compiles once;
    the parameters are an argument, never baked in.
    """
    (target_mode, score_name, reduce, ig_steps, ig_rule, ig_baseline, sg_samples, sg_stdevs, sg_type, max_unroll,
     steps_per_pass) = options
    wanted = set(methods)
    shared_grad = bool(wanted & {"gradient", "gradient_x_input", "grad_cam"})
    input_grad = bool(wanted & {"gradient", "gradient_x_input"})
    cams_needed = bool(wanted & set(CAM_METHODS))

    def compute(state, images, labels, key):
        net = nnx.merge(graphdef, state)
        size = images.shape[1:3]
        feature_map, features_vjp = jax.vjp(net.features, images)
        logits, head_vjp = jax.vjp(net.head, feature_map)
        target = labels if target_mode == "true" else jnp.argmax(logits, axis=-1).astype(labels.dtype)
        score = _score_fn(score_name, jax.lax.stop_gradient(target))
        maps: dict[str, Array] = {}
        lowres: dict[str, Array] = {}
        if shared_grad:
            cotangent = jax.grad(lambda z: jnp.sum(score(z)))(logits)
            (grad_a,) = head_vjp(cotangent)
            if "grad_cam" in wanted:
                alpha = jnp.mean(grad_a.astype(jnp.float32), axis=(1, 2))
                grad_cam = jax.nn.relu(jnp.einsum("bhwk,bk->bhw", feature_map.astype(jnp.float32), alpha))
                lowres["grad_cam"] = grad_cam
                maps["grad_cam"] = _upsample(grad_cam, size)
            if input_grad:
                (grad_x,) = features_vjp(grad_a)
                if "gradient" in wanted:
                    maps["gradient"] = _reduce_channels(grad_x, reduce)
                if "gradient_x_input" in wanted:
                    maps["gradient_x_input"] = _reduce_channels(images * grad_x, reduce)
        # Up to max_unroll steps run as unrolled vmapped passes (faster on XLA:CPU), more in a scan.
        if "integrated_gradients" in wanted:
            attributions = saliency.integrated_gradients(
                net, images, score, baselines=ig_baseline, n_steps=ig_steps, method=ig_rule,
                internal_batch_size=steps_per_pass if ig_steps <= max_unroll else None)
            maps["integrated_gradients"] = _reduce_channels(attributions, reduce)
        if "smoothgrad" in wanted:
            grads = saliency.smoothgrad(
                net, images, score, key=key, nt_samples=sg_samples, stdevs=sg_stdevs, nt_type=sg_type,
                internal_batch_size=steps_per_pass if sg_samples <= max_unroll else None)
            maps["smoothgrad"] = _reduce_channels(grads, reduce)
        if cams_needed:
            cams = saliency.class_activation_maps(net.head, feature_map).astype(jnp.float32)  # (B, h, w, K)
            true_cam = jnp.take_along_axis(cams, labels[:, None, None, None], axis=-1)[..., 0]
            false_cam = jnp.take_along_axis(cams, (1 - labels)[:, None, None, None], axis=-1)[..., 0]
            for name, value in (
                ("cam_true", true_cam),
                ("cam_false", false_cam),
                ("divergence", true_cam - false_cam),
            ):
                if name in wanted:
                    lowres[name] = value
                    maps[name] = _upsample(value, size)
        return {"logits": logits.astype(jnp.float32), "maps": maps, "lowres": lowres}

    return jax.jit(compute)


def explain_batch(
    model: nnx.Module,
    images: Array,
    labels: Array,
    *,
    methods: Sequence[str] | None = None,
    config: ExplainConfig = ExplainConfig(),
    key: Array | None = None,
) -> dict[str, Any]:
    """The maps of one batch as numpy arrays (see `make_explain_fn`), without metrics.

    Compiled once per model structure, map settings and batch shape. For a dataset use `explain`,
    which also regroups the batches into one shape.
    """
    methods = resolve_methods(model, methods if methods is not None else config.methods)
    fn = make_explain_fn(model, methods, config)
    key = jax.random.key(config.seed) if key is None else key
    out = fn(jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32), key)
    return jax.tree.map(np.asarray, jax.device_get(out))


# --- batches ---------------------------------------------------------------------------------------


def _as_numpy_batch(
    batch: Mapping[str, Array], index: int, map_metrics: bool, num_classes: int
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


def _rebatch(
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


def _num_examples(batches: Any) -> int | None:
    """Images the batches hold, when that is known without iterating (for the progress bar)."""
    if getattr(batches, "num_examples", None) is not None and getattr(batches, "num_epochs", 1) is not None:
        return int(batches.num_examples) * int(getattr(batches, "num_epochs", 1) or 1)
    if isinstance(batches, Sequence):
        try:
            return int(sum(len(b["label"]) for b in batches))
        except (KeyError, TypeError):
            return None
    return None


# --- per-image metrics -----------------------------------------------------------------------------


def _margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`z_t - max_{k != t} z_k` (for two classes `z_t - z_f`): (B,)."""
    true = np.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    others = logits.copy()
    np.put_along_axis(others, labels[:, None], -np.inf, axis=1)
    return (true - others.max(axis=1)).astype(np.float64)


def _map_metrics(s: np.ndarray, smap: np.ndarray, has_map: np.ndarray, config: ExplainConfig) -> dict[str, np.ndarray]:
    """Every `MAP_METRICS` value of maps s (B, H, W) against smap; NaN where there is no map."""
    q, t = config.top_q, config.map_threshold
    out = {
        "energy_inside": metrics.energy_inside(s, smap),
        "auc": metrics.pixel_auc(s, smap, threshold=t),
        "pointing_game": metrics.pointing_game(s, smap, threshold=t),
        "iou_top_q": metrics.top_q_iou(s, smap, q=q, threshold=t),
        "precision_top_q": metrics.top_q_precision(s, smap, q=q, threshold=t),
    }
    return {k: np.where(has_map, v, np.nan) for k, v in out.items()}


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
    batches: Iterable[Mapping[str, Array]] | Mapping[str, Array],
    *,
    config: ExplainConfig = ExplainConfig(),
    split_name: str = "split",
    num_images: int = 8,
    rank_by: str = "auto",
    key: Array | None = None,
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
    from tqdm.auto import tqdm

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
        valid = ["margin"] + [f"{m}/{k}" for m in methods for k in MAP_METRICS if config.map_metrics]
        if "divergence" in methods:
            valid += [f"divergence/{k}" for k in REGION_METRICS]
        if rank_key not in valid:
            raise ValueError(f"rank_by must be 'auto' or one of {valid}; got {rank_by!r}")
    num_classes = int(model.num_classes)
    fn = make_explain_fn(model, methods, config)
    key = jax.random.key(config.seed) if key is None else key

    incoming = (_as_numpy_batch(b, i, config.map_metrics, num_classes) for i, b in enumerate(batches))
    columns: dict[str, list[np.ndarray]] = {}
    most, least = _Keeper(num_images), _Keeper(num_images)
    kept: dict[int, Selected] = {}
    image_shape = None
    offset = 0

    def finish(chunk: dict[str, np.ndarray], valid: int, out: dict[str, Any]) -> None:
        nonlocal offset
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
        for method in methods:
            if config.map_metrics:
                for name, value in _map_metrics(out["maps"][method], smap, has_map, config).items():
                    cols[f"{method}/{name}"] = value
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

    with tqdm(total=_num_examples(batches), unit="img", desc=f"explain {split_name}", disable=not progress) as bar:
        pending = None
        for i, (chunk, valid) in enumerate(_rebatch(incoming, config.batch_size)):
            if image_shape is None:
                image_shape = chunk["image"].shape[1:]
                if image_shape[-1] != getattr(model, "in_channels", image_shape[-1]):
                    raise ValueError(
                        f"the model expects images with in_channels={model.in_channels}; the batches have "
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
    if config.map_metrics and not per_image["has_map"].any():
        raise ValueError(
            f"no sample of split {split_name!r} has a human saliency map (has_map is False for all "
            f"{offset} images), so the map metrics cannot be computed; pass map_metrics=False "
            "(saljax explain --no-map-metrics) to explain without them"
        )
    return ExplainResults(
        split=split_name,
        methods=methods,
        config=config,
        model_info={
            "class": type(model).__name__,
            "num_classes": num_classes,
            "head_type": _model_attr(model, "head_type"),
            "in_channels": _model_attr(model, "in_channels"),
            "image_shape": tuple(int(s) for s in image_shape),
        },
        per_image=per_image,
        aggregate=_aggregate(per_image, methods),
        rank_key=rank_key,
        most=[kept[i] for i in most.indices()],
        least=[kept[i] for i in least.indices()],
    )


# --- report ----------------------------------------------------------------------------------------


def _plot_selected(item: Selected, results: ExplainResults, path: str) -> None:
    methods = results.methods
    panels = 2 + len(methods)
    ncols = min(5, panels)
    nrows = math.ceil(panels / ncols)
    fig = _figures.figure(2.5 * ncols, 2.9 * nrows + 0.3)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(panels)]
    image, cmap = _figures.display_image(item.image)
    axes[0].imshow(image, cmap=cmap, vmin=0, vmax=1)
    axes[0].set_title("image", fontsize=9)
    mask = None
    if item.saliency_map is not None:
        axes[1].imshow(item.saliency_map, cmap="gray", vmin=0, vmax=1)
        axes[1].set_title("human map", fontsize=9)
        mask = item.saliency_map >= results.config.map_threshold
    else:
        axes[1].set_title("no human map", fontsize=9)
    gray = _figures.gray(item.image)
    for ax, method in zip(axes[2:], methods):
        values = item.maps[method]
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        if method in SIGNED_METHODS:
            bound = float(np.abs(values).max()) or 1.0
            ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, alpha=0.65)
        else:
            ax.imshow(values, cmap="inferno", vmin=0, vmax=float(values.max()) or 1.0, alpha=0.65)
        if mask is not None and mask.any() and not mask.all():
            ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        if method == "divergence" and item.region_labels is not None:
            shown = item.region_labels * (item.region_labels <= results.config.max_regions)
            if shown.any():
                ax.contour((shown > 0).astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
            for region in item.regions:
                ax.text(region.centroid[1], region.centroid[0], str(region.rank), color="yellow", fontsize=7,
                        ha="center", va="center")
        energy = item.values.get(f"{method}/energy_inside", float("nan"))
        title = method.replace("_", " ")
        if np.isfinite(energy):
            title += f"\nenergy in {energy:.2f}"
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{results.split} #{item.index}: label {item.label}, pred {item.pred}, margin {item.margin:+.3g}, "
        f"group {item.group}",
        fontsize=10,
    )
    fig.savefig(path)


def _plot_summary(results: ExplainResults, path: str) -> None:
    per_image, methods = results.per_image, results.methods
    names = [k for k in MAP_METRICS if f"{methods[0]}/{k}" in per_image]
    panels = names + ["margin"]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figures.figure(max(4.0, 0.6 * len(methods) + 1.0) * ncols, 3.4 * nrows)
    for i, name in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        if name == "margin":
            groups = np.unique(per_image["group"])
            data = [per_image["margin"][per_image["group"] == g] for g in groups]
            ax.boxplot(data, showmeans=True)
            ax.set_xticks(range(1, len(groups) + 1), [str(g) for g in groups])
            ax.set_xlabel("group")
            ax.set_title("decision margin z_t - z_other", fontsize=10)
            ax.axhline(0.0, color="gray", linewidth=0.6)
            continue
        data = [per_image[f"{m}/{name}"][np.isfinite(per_image[f"{m}/{name}"])] for m in methods]
        labels = [m.replace("_", "\n") for m in methods]
        if name == "pointing_game":
            # A 0/1 outcome: its mean (hit rate) says more than a box.
            means = [d.mean() if d.size else np.nan for d in data]
            ax.bar(range(1, len(methods) + 1), means, color="tab:blue")
            ax.set_ylim(0, 1)
        else:
            ax.boxplot([d if d.size else np.array([np.nan]) for d in data], showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), labels, fontsize=7)
        ax.set_title(_METRIC_TITLES[name], fontsize=10)
    fig.suptitle(f"{results.split}: agreement of each explanation with the human maps", fontsize=11)
    fig.savefig(path)


def _fmt(stats: Mapping[str, float | int], digits: int = 3) -> str:
    if not stats["count"]:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} (n={stats['count']})"


def _metric_table(table: Mapping[str, Any], methods: Sequence[str], names: Sequence[str]) -> list[str]:
    lines = ["| method | " + " | ".join(_METRIC_TITLES[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for method in methods:
        row = table.get(method, {})
        lines.append(f"| {method} | " + " | ".join(_fmt(row[n]) if n in row else "n/a" for n in names) + " |")
    return lines


def _ranking_table(items: Sequence[Selected], results: ExplainResults, links: Mapping[int, str]) -> list[str]:
    has_regions = "divergence" in results.methods
    header = "| rank | image | group | label | pred | margin | " + results.rank_key + " |"
    header += " top divergence regions (energy share, overlap with map) |" if has_regions else ""
    lines = [header, "|---" * (7 + has_regions) + "|"]
    for rank, item in enumerate(items, start=1):
        row = (
            f"| {rank} | [#{item.index}]({links[item.index]}) | {item.group} | {item.label} | {item.pred} | "
            f"{item.margin:+.3f} | {item.score:.3f} |"
        )
        if has_regions:
            regions = "; ".join(
                f"{r.rank}: {r.energy_fraction:.0%}, " + ("n/a" if np.isnan(r.overlap) else f"{r.overlap:.2f}")
                for r in item.regions
            )
            row += f" {regions or 'none'} |"
        lines.append(row)
    return lines


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_report(
    results: ExplainResults,
    out_dir: str | os.PathLike[str],
    *,
    group_names: Mapping[int, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes the report of `results` into `out_dir` (created if missing); nothing else is written.

    Files: `figures/<split>_<index>.png` (a grid per plotted image: image, human map, each map
    over the image with the human map's outline, the divergence map's top regions numbered),
    `summary.png` (metric distributions per method and margins per group), `report.md` (settings,
    aggregate tables for the split and per group, the images ranked by `results.rank_key`, with
    relative links to the PNGs), `metrics.json` (aggregates and ranking) and `per_image.csv`.

    Returns:
      {"report": path, "summary": path, "metrics": path, "per_image": path, "figures": [paths]}.
    """
    from tqdm.auto import tqdm

    out_dir = os.fspath(out_dir)
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    split_tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in results.split)

    items = {item.index: item for item in [*results.most, *results.least]}
    links: dict[int, str] = {}
    figures = []
    for index in tqdm(sorted(items), desc="figures", unit="img", disable=not progress):
        name = f"{split_tag}_{index:05d}.png"
        _plot_selected(items[index], results, os.path.join(fig_dir, name))
        links[index] = f"figures/{name}"
        figures.append(os.path.join(fig_dir, name))
    summary_path = os.path.join(out_dir, "summary.png")
    _plot_summary(results, summary_path)

    cfg, info, per_image = results.config, results.model_info, results.per_image
    n = len(per_image["index"])
    n_map = int(per_image["has_map"].sum())
    names = [k for k in MAP_METRICS if f"{results.methods[0]}/{k}" in per_image]
    if names:
        metric_text = (
            f"Metrics (per image, then mean ± std (n) over the images with a map; `M` = human map >= "
            f"{cfg.map_threshold}): *energy inside* = sum(H·s⁺)/sum(s⁺); *ROC AUC* of the pixel values as a "
            "predictor of `M`; *pointing game* = maximum of the map inside `M`; *IoU top-q* / *precision top-q* = "
            "IoU with `M` / fraction inside `M` of the top-q positive pixels. CAM-type maps are signed: "
            "energies use their positive part. Divergence map `D = CAM_t - CAM_f` (its mean is the logit margin "
            "minus the bias difference): *top region overlap* = fraction of its highest-energy region inside `M`."
        )
    else:
        metric_text = "No metrics against human maps: they were switched off (map_metrics=False)."
    group_label = (lambda g: f"{g} ({group_names[g]})" if group_names and g in group_names else str(g))
    lines = [
        f"# saljax explain: split `{results.split}`",
        "",
        f"Model: {info['class']} (num_classes={info['num_classes']}, head_type={info['head_type']!r}), "
        f"images {info['image_shape']}. {n} images, {n_map} with a human map.",
        "",
        "Settings: methods " + ", ".join(f"`{m}`" for m in results.methods)
        + f"; explained class: {cfg.target} ({cfg.score} score); gradient maps reduced over channels by "
        f"`{cfg.reduce}`; Integrated Gradients {cfg.ig_steps} steps ({cfg.ig_rule}, baseline {cfg.ig_baseline}); "
        f"SmoothGrad {cfg.smoothgrad_samples} samples, stdevs {cfg.smoothgrad_stdevs} ({cfg.smoothgrad_type}, seed "
        f"{cfg.seed}); top-q = {cfg.top_q:.0%} of the pixels; human map binarised at {cfg.map_threshold}; "
        f"{cfg.connectivity}-connected regions.",
        "",
        metric_text,
        "",
        "![metric distributions](summary.png)",
        "",
        f"## Model on split `{results.split}`",
        "",
        "| group | images | accuracy | margin z_t - z_other |",
        "|---|---|---|---|",
    ]
    agg = results.aggregate
    for g, table in [("all", agg["split"]), *agg["groups"].items()]:
        model_row = table["model"]
        lines.append(
            f"| {g if g == 'all' else group_label(g)} | {model_row['correct']['count']} | "
            f"{_fmt(model_row['correct'])} | {_fmt(model_row['margin'])} |"
        )
    if names:
        lines += ["", f"## Agreement with the human maps: split `{results.split}`", ""]
        lines += _metric_table(agg["split"], results.methods, names)
    if "divergence" in results.methods:
        lines += [
            "",
            f"### Divergence map: top regions (connected top-{cfg.top_q:.0%} positive divergence)",
            "",
        ]
        lines += _metric_table(agg["split"], ["divergence"], REGION_METRICS)
    if names:
        lines += ["", "## Per group", ""]
        for g, table in agg["groups"].items():
            lines += [f"### Group {group_label(g)}", ""]
            lines += _metric_table(table, results.methods, names)
            lines.append("")
    if results.rank_key == "divergence/energy_inside":
        most_title = "Where decisions divide most inside the human map"
        least_title = "Where decisions divide least inside the human map"
        rank_text = (
            "the fraction of the positive divergence energy (D = CAM_t - CAM_f > 0) inside the human map: high "
            "means the true- and false-class CAMs divide on the features humans mark, low that the decision "
            "divides elsewhere"
        )
    else:
        most_title, least_title = "Largest values", "Smallest values"
        rank_text = f"`{results.rank_key}`"
    lines += [
        "",
        f"## {most_title} (largest `{results.rank_key}`)",
        "",
        f"Images ranked by {rank_text}.",
        "",
    ]
    lines += _ranking_table(results.most, results, links)
    lines += ["", f"## {least_title} (smallest `{results.rank_key}`)", ""]
    lines += _ranking_table(results.least, results, links)
    lines.append("")
    report_path = os.path.join(out_dir, "report.md")
    with open(report_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))

    metrics_path = os.path.join(out_dir, "metrics.json")
    with open(metrics_path, "w", encoding="utf-8") as f:
        json.dump(
            _json_ready(
                {
                    "split": results.split,
                    "methods": results.methods,
                    "config": dataclasses.asdict(cfg),
                    "model": info,
                    "num_images": n,
                    "num_with_map": n_map,
                    "aggregate": agg,
                    "ranking": {
                        "key": results.rank_key,
                        "most": [i.index for i in results.most],
                        "least": [i.index for i in results.least],
                    },
                }
            ),
            f,
            indent=2,
        )
    csv_path = os.path.join(out_dir, "per_image.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        keys = list(per_image)
        writer.writerow(keys)
        for row in zip(*(per_image[k] for k in keys)):
            writer.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else int(v) for v in row])
    return {
        "report": report_path,
        "summary": summary_path,
        "metrics": metrics_path,
        "per_image": csv_path,
        "figures": figures,
    }


def run(
    model: nnx.Module,
    batches_or_loader: Iterable[Mapping[str, Array]] | Mapping[str, Array],
    *,
    out_dir: str | os.PathLike[str],
    methods: Sequence[str] | str | None = None,
    num_images_to_plot: int = 8,
    split_name: str = "split",
    batch_size: int = 64,
    ig_steps: int = 16,
    smoothgrad_samples: int = 16,
    smoothgrad_stdevs: float = 0.15,
    top_q: float = 0.1,
    map_metrics: bool = True,
    rank_by: str = "auto",
    key: Array | None = None,
    seed: int = 0,
    group_names: Mapping[int, str] | None = None,
    progress: bool = True,
    config: ExplainConfig | None = None,
) -> dict[str, Any]:
    """Explains every image of `batches_or_loader` and writes the report into `out_dir`.

    `explain` followed by `write_report`. The keyword arguments fill an `ExplainConfig`; pass
    `config` instead to set every option (then `methods`, `batch_size`, `ig_steps`,
    `smoothgrad_samples`, `smoothgrad_stdevs`, `top_q`, `map_metrics` and `seed` are ignored).
    `num_images_to_plot` images are plotted at each end of the ranking (see `explain`).

    Returns:
      {"split", "methods", "num_images", "num_with_map", "aggregate" (see `ExplainResults`),
      "per_image" (arrays (N,)), "ranking": {"key", "most", "least"} (dataset indices),
      "files" (see `write_report`), "results" (the `ExplainResults`)}.
    """
    if config is None:
        config = ExplainConfig(
            methods=methods,
            batch_size=batch_size,
            ig_steps=ig_steps,
            smoothgrad_samples=smoothgrad_samples,
            smoothgrad_stdevs=smoothgrad_stdevs,
            top_q=top_q,
            map_metrics=map_metrics,
            seed=seed,
        )
    n_plot = num_images_to_plot
    if isinstance(n_plot, bool) or not isinstance(n_plot, (int, np.integer)) or n_plot < 0:
        raise ValueError(f"num_images_to_plot must be a non-negative int; got {num_images_to_plot!r}")
    results = explain(
        model,
        batches_or_loader,
        config=config,
        split_name=split_name,
        num_images=int(num_images_to_plot),
        rank_by=rank_by,
        key=key,
        progress=progress,
    )
    files = write_report(results, out_dir, group_names=group_names, progress=progress)
    return {
        "split": results.split,
        "methods": results.methods,
        "num_images": int(len(results.per_image["index"])),
        "num_with_map": int(results.per_image["has_map"].sum()),
        "aggregate": results.aggregate,
        "per_image": results.per_image,
        "ranking": {
            "key": results.rank_key,
            "most": [i.index for i in results.most],
            "least": [i.index for i in results.least],
        },
        "files": files,
        "results": results,
    }


# --- command line ----------------------------------------------------------------------------------

_DEFAULT_SPLITS = ("test", "test_closed", "validation", "train")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declares the options of `saljax explain` on `parser` (returned for chaining)."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="directory of a saljax training checkpoint")
    parser.add_argument(
        "--dataset",
        metavar="NAME[:split]",
        help="saljax dataset (optionally name/config) and split, e.g. spurious_binary:test_open; default: the "
        "training config's dataset, split test (or test_closed, validation, train: the first that exists)",
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="root of the prepared datasets (default: the training config's)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for report.md, figures and tables")
    parser.add_argument(
        "--methods",
        default=None,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(METHODS)} (default: every method the model supports)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per jit-compiled call (default 64)")
    parser.add_argument(
        "--num-images", type=int, default=8, help="images plotted at each end of the ranking (default 8)"
    )
    parser.add_argument("--ig-steps", type=int, default=16, help="Integrated Gradients steps (default 16)")
    parser.add_argument("--smoothgrad-samples", type=int, default=16, help="SmoothGrad noisy samples (default 16)")
    parser.add_argument(
        "--smoothgrad-stdevs", type=float, default=0.15, help="SmoothGrad noise, fraction of the value range (0.15)"
    )
    parser.add_argument("--top-q", type=float, default=0.1, help="fraction of pixels in the top-q region (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of SmoothGrad's noise (default 0)")
    parser.add_argument(
        "--no-map-metrics",
        action="store_true",
        help="explain a split without human maps (otherwise missing maps are an error)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _field(node: Any, name: str) -> Any:
    """`node.name` of a ConfigDict, dict or object; None when absent."""
    if node is None:
        return None
    try:
        return node[name]
    except (KeyError, TypeError, AttributeError):
        return getattr(node, name, None)


def _dataset_settings(args: argparse.Namespace, train_config: Any) -> dict[str, Any]:
    """Dataset, builder config, overrides, data_dir, split and normalisation for `main`.

    The command line wins; missing values come from the training config's `dataset` section
    (`saljax.config`: name, config, overrides, data_dir, manual_dir, mean, std). The builder config,
    overrides and manual_dir of the training run apply only to the dataset it was trained on.
    """
    trained = _field(train_config, "dataset")
    spec = args.dataset or _field(trained, "name")
    if not spec:
        raise ValueError("--dataset NAME[:split] is required (the checkpoint's config names no dataset)")
    name, _, split = str(spec).partition(":")
    name, _, builder_config = name.partition("/")
    same = name == _field(trained, "name")
    data_dir = args.data_dir or _field(trained, "data_dir")
    if not data_dir:
        raise ValueError("--data-dir is required (the checkpoint's config names no data_dir)")
    overrides = _field(trained, "overrides") if same else None
    return {
        "name": name,
        "config": builder_config or ((_field(trained, "config") or None) if same else None),
        "overrides": dict(overrides.items()) if overrides else {},
        "manual_dir": (_field(trained, "manual_dir") or None) if same else None,
        "data_dir": os.path.expanduser(str(data_dir)),
        "split": split or None,
        "mean": _field(trained, "mean"),
        "std": _field(trained, "std"),
    }


def main(args: argparse.Namespace) -> int:
    """`saljax explain`: loads a checkpoint, explains a dataset split, writes the report.

    Options missing on the command line come from the training config that
    `train.load_model` returns (see `_dataset_settings`); the split defaults to the first of
    test, test_closed, validation, train that the dataset has. Returns 0 on success, 2 with a
    message on stderr for bad input (missing checkpoint directory, unusable checkpoint, unknown
    dataset or split, methods the model does not support, missing maps).
    """
    prog = "saljax explain"
    if not os.path.isdir(args.checkpoint):
        print(f"{prog}: checkpoint directory {args.checkpoint!r} does not exist", file=sys.stderr)
        return 2
    from saljax import checkpoint, train

    try:
        model, train_config = train.load_model(args.checkpoint)
    except (checkpoint.CheckpointError, FileNotFoundError) as err:
        print(f"{prog}: cannot load a model from {args.checkpoint!r}: {err}", file=sys.stderr)
        return 2
    import saljax.data as sd

    try:
        ds = _dataset_settings(args, train_config)
        name = ds["name"]
        builder = sd.build(name, ds["data_dir"], ds["config"], manual_dir=ds["manual_dir"], **ds["overrides"])
        splits = sorted(builder.info.splits.keys())
        split = ds["split"] or next((s for s in _DEFAULT_SPLITS if s in splits), splits[0])
        if split not in splits:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {splits}")
        loader = sd.make_loader(
            builder, split, args.batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
            mean=ds["mean"], std=ds["std"],
        )
        group_names = getattr(importlib.import_module(f"saljax.data.{name}"), "GROUP_NAMES", None)
        summary = run(
            model,
            loader,
            out_dir=args.out,
            methods=args.methods,
            num_images_to_plot=args.num_images,
            split_name=split,
            batch_size=args.batch_size,
            ig_steps=args.ig_steps,
            smoothgrad_samples=args.smoothgrad_samples,
            smoothgrad_stdevs=args.smoothgrad_stdevs,
            top_q=args.top_q,
            map_metrics=not args.no_map_metrics,
            seed=args.seed,
            group_names=dict(enumerate(group_names)) if group_names else None,
            progress=not args.no_progress,
        )
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(f"{prog}: {summary['num_images']} images of {name}:{split} ({summary['num_with_map']} with a map)")
    table = summary["aggregate"]["split"]
    for method in summary["methods"]:
        stats = table.get(method, {}).get("energy_inside")
        if stats is not None:
            print(f"  {method:22s} energy inside the map {_fmt(stats)}")
    print(f"{prog}: report written to {summary['files']['report']}")
    return 0
