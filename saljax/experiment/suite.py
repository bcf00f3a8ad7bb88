"""What a suite config declares: the methods of a benchmark, its splits and metrics, and its targets."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

CHECKPOINTS = ("final", "best")


@dataclasses.dataclass(frozen=True)
class Target:
    """A claim checked on the suite's means: `value(means) <op> threshold`.

    `means[method][f"{split}/{metric}"]` is the mean over seeds. `value` returns a number (e.g. a
    difference of two means); `op` is ">=" or "<=".
    """
    claim: str
    value: Callable[[Mapping[str, Mapping[str, float]]], float]
    op: str
    threshold: float

    def check(self, means: Mapping[str, Mapping[str, float]]) -> tuple[float, bool | None]:
        """(value, met); met is None when a method or metric it reads was not run."""
        try:
            value = float(self.value(means))
        except KeyError:
            return float("nan"), None
        if not math.isfinite(value):
            return value, None
        return value, (value >= self.threshold if self.op == ">=" else value <= self.threshold)


@dataclasses.dataclass(frozen=True)
class Suite:
    """What `saljax experiment` runs for one benchmark (returned by a config's `get_suite()`).

    Attributes:
      name: the suite's name (the config file's stem by convention).
      title: one line naming the benchmark and the model.
      methods: `get_config` arguments, one row each (e.g. "clean", "ce", "gradmask").
      splits: evaluation splits to tabulate, validation first.
      metrics: per-split metrics to tabulate (keys of `saljax.metrics.summarize`).
      quick: overrides (`key=value`) for `--quick`, with `quick_seeds` seeds and the `quick_methods`
        (empty: every method), checked against `quick_targets` (empty: `targets`).
      targets: claims checked on the means.
      curve_metric: the evaluation metric of the training-curves figure.
      notes: Markdown paragraphs printed under the table (how hyperparameters were chosen, ...).
      checkpoint: which checkpoint of each run the tables report: "final" (the last step) or "best"
        (the step with the best `checkpoint.best_metric` of the run's config, a validation metric,
        as the papers select: the red-herring paper by validation AUC, CYBORG by validation accuracy).
      map_metrics: explanation metrics of each run's reported checkpoint on every split, as
        "<map>/<metric>" (`saljax.explain` names, e.g. "gradient/saliency_iou"); tabulated after `metrics`.
      published: the papers' numbers shown beside ours: (method, "split/metric", text), e.g.
        ("gradmask", "test/auc", "0.76 ± 0.04 (Viviano et al. 2021)").
    """
    name: str
    title: str
    methods: tuple[str, ...]
    splits: tuple[str, ...]
    metrics: tuple[str, ...] = ("accuracy", "saliency_inside")
    quick: tuple[str, ...] = ()
    quick_seeds: int = 2
    quick_methods: tuple[str, ...] = ()
    quick_targets: tuple[Target, ...] = ()
    targets: tuple[Target, ...] = ()
    curve_metric: str = "validation/accuracy"
    notes: str = ""
    checkpoint: str = "final"
    map_metrics: tuple[str, ...] = ()
    published: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        unknown = [m for m in self.quick_methods if m not in self.methods]
        if unknown:
            raise ValueError(f"Suite.quick_methods {unknown} are not among the suite's methods {list(self.methods)}")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"Suite.checkpoint must be one of {CHECKPOINTS}; got {self.checkpoint!r}")

    @property
    def columns(self) -> tuple[str, ...]:
        """The metrics the tables show: the classification metrics, then the map metrics."""
        return (*self.metrics, *self.map_metrics)

    def key(self, split_metric: str) -> str:
        """The key of a run's metrics that this suite reports for "split/metric"."""
        return split_metric if self.checkpoint == "final" else f"best/{split_metric}"
