"""Explanation metrics of a finished run: its reported checkpoint's maps scored against the human maps.

The suite's `map_metrics` name `"<map>/<metric>"` pairs, e.g. `"gradient/saliency_iou"` (the
red-herring paper's IoU of the top-|H| input-gradient pixels with the mask) or
`"integrated_gradients/saliency_iou"`; `saljax.explain` computes the maps and the per-image metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

from saljax import data, explain, train
from saljax.experiment.suite import Suite


def map_metric_names(suite: Suite) -> tuple[tuple[str, str], ...]:
    """(map, metric) pairs of the suite, checked against `saljax.explain`'s names."""
    pairs = []
    for entry in suite.map_metrics:
        method, _, metric = entry.partition("/")
        if method not in explain.METHODS or metric not in explain.MAP_METRICS:
            raise ValueError(f"Suite.map_metrics entry {entry!r} must be '<map>/<metric>' with a map of "
                             f"{explain.METHODS} and a metric of {explain.MAP_METRICS}")
        pairs.append((method, metric))
    return tuple(pairs)


def explain_run(suite: Suite, path: str, splits: Sequence[str], *, batch_size: int = 64) -> dict[str, float]:
    """Means over each split's images of the suite's map metrics, keyed like the run's metrics.

    The checkpoint is the one the suite reports (`Suite.checkpoint`), so the keys carry the same
    `best/` prefix as the classification metrics of that checkpoint: `[best/]<split>/<map>/<metric>`.
    """
    pairs = map_metric_names(suite)
    if not pairs:
        return {}
    model, cfg = train.load_model(path, step="best" if suite.checkpoint == "best" else "latest")
    ds = cfg.dataset
    builder = data.from_config(ds)
    settings = explain.ExplainConfig(methods=tuple(dict.fromkeys(m for m, _ in pairs)), batch_size=batch_size)
    out = {}
    for split in splits:
        loader = data.make_loader(builder, split, batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
                                  mean=ds.mean, std=ds.std)
        table = explain.explain(model, loader, config=settings, split_name=split, num_images=0,
                                progress=False).aggregate["split"]
        for method, metric in pairs:
            out[suite.key(f"{split}/{method}/{metric}")] = float(table[method][metric]["mean"])
    return out
