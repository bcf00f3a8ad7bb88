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
| `divergence`           | `D = CAM_t - CAM_f` (Divisive Decisions; docs/methods.md): `mean_ij D = margin - (b_t - b_f)` |

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

Modules: `settings` (method names, `ExplainConfig`, result types), `engine` (the jitted maps),
`batches` (checking and regrouping incoming batches), `scoring` (`explain`: per-image metrics and
aggregates), `report` (figures, tables, `run`), `command` (the command line).
"""

from saljax.explain.command import add_arguments, main
from saljax.explain.engine import explain_batch, make_explain_fn, resolve_methods
from saljax.explain.report import run, write_report
from saljax.explain.scoring import explain
from saljax.explain.settings import (
    BINARY_METHODS,
    CAM_METHODS,
    GRADIENT_METHODS,
    MAP_METRICS,
    METHODS,
    REGION_METRICS,
    SIGNED_METHODS,
    ExplainConfig,
    ExplainResults,
    Selected,
)

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
