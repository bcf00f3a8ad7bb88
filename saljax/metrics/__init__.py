"""Evaluation metrics: classification, localisation of saliency maps, and the wrong-reason score.

Modules:
  classification  accuracy/ROC AUC over a set, `summarize` of eval outputs, `fraction_inside`
  localisation    batched, jit-compatible map-vs-mask metrics (pointing game, attribution
                  localisation, top-k intersection, relevance rank/mass accuracy, pixel ROC AUC,
                  energy-based pointing game, saliency IoU)
  wrong_reason    WR of explanatory interactive learning, whole-set or in two passes over batches
  regions         per-image NumPy tools: top-q regions, their IoU/precision, connected regions
"""

from saljax.metrics import classification, localisation, regions, wrong_reason
from saljax.metrics._common import finite_sum_count
from saljax.metrics.classification import fraction_inside, roc_auc, summarize
from saljax.metrics.localisation import (
    attribution_localisation,
    energy_pointing_game,
    pixel_auc,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    saliency_iou,
    top_k_intersection,
)
from saljax.metrics.regions import (
    Region,
    aggregate,
    binarize_map,
    connected_components,
    energy_inside,
    iou,
    top_q_iou,
    top_q_mask,
    top_q_precision,
    top_regions,
)
from saljax.metrics.wrong_reason import (
    ThresholdStats,
    normalize_maps,
    wrong_reason_per_image,
    wrong_reason_score,
    wrong_reason_threshold,
    wrong_reason_threshold_stats,
)

__all__ = [
    "Region",
    "ThresholdStats",
    "aggregate",
    "attribution_localisation",
    "binarize_map",
    "classification",
    "connected_components",
    "energy_inside",
    "energy_pointing_game",
    "finite_sum_count",
    "fraction_inside",
    "iou",
    "localisation",
    "normalize_maps",
    "pixel_auc",
    "pointing_game",
    "regions",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "roc_auc",
    "saliency_iou",
    "summarize",
    "top_k_intersection",
    "top_q_iou",
    "top_q_mask",
    "top_q_precision",
    "top_regions",
    "wrong_reason",
    "wrong_reason_per_image",
    "wrong_reason_score",
    "wrong_reason_threshold",
    "wrong_reason_threshold_stats",
]
