"""Settings and result types of an explanation run: the method names, `ExplainConfig`, `ExplainResults`."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from saljax import metrics

METHODS = (
    "gradient",
    "gradient_x_input",
    "integrated_gradients",
    "smoothgrad",
    "grad_cam",
    "cam_true",
    "cam_false",
    "divergence",
    "rrr_gradient",
)
#: Maps computed from input gradients (reduced over channels to a non-negative 2-D map).
GRADIENT_METHODS = ("gradient", "gradient_x_input", "integrated_gradients", "smoothgrad")
#: RRR's input gradient `d/dx sum_k log p_k` summed over channels (signed; XIL's "IG" map for WR).
SUM_LOG_SOFTMAX_METHODS = ("rrr_gradient",)
#: Maps that need CAMs, exact only for a GAP + Dense head (`head_type == 'gap'`).
CAM_METHODS = ("cam_true", "cam_false", "divergence")
#: Maps defined for binary models only (the "false" class is `1 - label`).
BINARY_METHODS = ("cam_true", "cam_false", "divergence")
#: Maps that may be negative (metrics use their positive part as energy).
SIGNED_METHODS = ("cam_true", "cam_false", "divergence", "rrr_gradient")
#: Per-image metrics of every map against the human map.
MAP_METRICS = (
    "energy_inside",
    "auc",
    "pointing_game",
    "iou_top_q",
    "precision_top_q",
    "attribution_localisation",
    "top_k_intersection",
    "relevance_rank_accuracy",
    "relevance_mass_accuracy",
    "energy_pointing_game",
    "saliency_iou",
    "wrong_reason",
)
#: Map metrics that need a statistic of the whole split first (not available to rank images by).
SET_METRICS = ("wrong_reason",)
#: Per-image metrics of the top regions of the divergence map.
REGION_METRICS = ("top_region_overlap", "top_region_energy_fraction", "num_regions")

TARGETS = ("true", "pred")
SCORES = ("logit", "log_softmax")
REDUCTIONS = ("abs_sum", "square_sum", "abs_max")
IG_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
SMOOTHGRAD_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")



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
