"""The explanation report: figures of the most and least divided images, tables, `report.md`, JSON and CSV."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from saljax import _figures
from saljax.explain.scoring import explain
from saljax.explain.settings import (
    MAP_METRICS,
    REGION_METRICS,
    SIGNED_METHODS,
    ExplainConfig,
    ExplainResults,
    Selected,
)
from saljax.workdir import atomic_write

_DEFAULTS = ExplainConfig()  # run()'s keyword defaults are the config's

METRIC_TITLES = {
    "energy_inside": "energy inside",
    "auc": "ROC AUC",
    "pointing_game": "pointing game",
    "iou_top_q": "IoU top-q",
    "precision_top_q": "precision top-q",
    "attribution_localisation": "attribution localisation",
    "top_k_intersection": "top-k intersection",
    "relevance_rank_accuracy": "relevance rank accuracy",
    "relevance_mass_accuracy": "relevance mass accuracy",
    "energy_pointing_game": "energy pointing game",
    "saliency_iou": "saliency IoU",
    "wrong_reason": "WR (%)",
    "top_region_overlap": "top region overlap",
    "top_region_energy_fraction": "top region energy share",
    "num_regions": "regions",
}


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
    _figures.save(fig, path)


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
        ax.set_title(METRIC_TITLES[name], fontsize=10)
    fig.suptitle(f"{results.split}: agreement of each explanation with the human maps", fontsize=11)
    _figures.save(fig, path)


def format_stats(stats: Mapping[str, float | int], digits: int = 3) -> str:
    if not stats["count"]:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} (n={stats['count']})"


def _metric_table(table: Mapping[str, Any], methods: Sequence[str], names: Sequence[str]) -> list[str]:
    lines = ["| method | " + " | ".join(METRIC_TITLES[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for method in methods:
        row = table.get(method, {})
        lines.append(f"| {method} | " + " | ".join(format_stats(row[n]) if n in row else "n/a" for n in names) + " |")
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
    source: str | None = None,
) -> dict[str, Any]:
    """Writes the report of `results` into `out_dir` (created if missing); nothing else is written.

    `source` says where the model came from (e.g. the checkpoint directory and step); the report
    and metrics.json repeat it.

    Files: `figures/<split>_<index>.png` (a grid per plotted image: image, human map, each map
    over the image with the human map's outline, the divergence map's top regions numbered),
    `summary.png` (metric distributions per method and margins per group), `report.md` (settings,
    aggregate tables for the split and per group, the images ranked by `results.rank_key`, with
    relative links to the PNGs), `metrics.json` (aggregates and ranking) and `per_image.csv`.

    Returns:
      {"report": path, "summary": path, "metrics": path, "per_image": path, "figures": [paths]}.
    """
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
            "minus the bias difference): *top region overlap* = fraction of its highest-energy region inside `M`. "
            "The localisation family (attribution localisation, top-k intersection with k = the top-q share of "
            "the pixels, relevance rank and mass accuracy, energy pointing game), saliency IoU of the top-|M| "
            "pixels and XIL's wrong-reason score WR (%, on `1 - H`, lower is better) follow saljax's docs/methods.md."
        )
    else:
        metric_text = "No metrics against human maps: they were switched off (map_metrics=False)."
    cd = "cd_share" in per_image
    group_label = (lambda g: f"{g} ({group_names[g]})" if group_names and g in group_names else str(g))
    lines = [
        f"# saljax explain: split `{results.split}`",
        "",
        f"Model: {info['class']} (num_classes={info['num_classes']}, head_type={info['head_type']!r}), "
        f"images {info['image_shape']}. {n} images, {n_map} with a human map."
        + (f" Checkpoint: {source}." if source else ""),
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
        "| group | images | accuracy | margin z_t - z_other |" + (" CD share of 1 - H |" if cd else ""),
        "|---|---|---|---|" + ("---|" if cd else ""),
    ]
    agg = results.aggregate
    for g, table in [("all", agg["split"]), *agg["groups"].items()]:
        model_row = table["model"]
        lines.append(
            f"| {g if g == 'all' else group_label(g)} | {model_row['correct']['count']} | "
            f"{format_stats(model_row['correct'])} | {format_stats(model_row['margin'])} |"
            + (f" {format_stats(model_row['cd_share'])} |" if cd else "")
        )
    if cd:
        lines += ["", "CD share: the share `exp(beta) / (exp(beta) + exp(gamma))` of the explained class's logit that "
                  "the region outside the human map explains, by contextual decomposition (CDEP's measure)."]
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
    with atomic_write(report_path, encoding="utf-8") as f:
        f.write("\n".join(lines))

    metrics_path = os.path.join(out_dir, "metrics.json")
    with atomic_write(metrics_path, encoding="utf-8") as f:
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
    with atomic_write(csv_path, newline="", encoding="utf-8") as f:
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
    batches_or_loader: Iterable[Mapping[str, ArrayLike]] | Mapping[str, ArrayLike],
    *,
    out_dir: str | os.PathLike[str],
    methods: Sequence[str] | str | None = None,
    num_images_to_plot: int = 8,
    split_name: str = "split",
    batch_size: int = _DEFAULTS.batch_size,
    ig_steps: int = _DEFAULTS.ig_steps,
    smoothgrad_samples: int = _DEFAULTS.smoothgrad_samples,
    smoothgrad_stdevs: float = _DEFAULTS.smoothgrad_stdevs,
    top_q: float = _DEFAULTS.top_q,
    map_metrics: bool = _DEFAULTS.map_metrics,
    rank_by: str = "auto",
    key: jax.Array | None = None,
    seed: int = _DEFAULTS.seed,
    group_names: Mapping[int, str] | None = None,
    progress: bool = True,
    config: ExplainConfig | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Explains every image of `batches_or_loader` and writes the report into `out_dir`.

    `explain` followed by `write_report`. The keyword arguments fill an `ExplainConfig`; pass
    `config` instead to set every option (then `methods`, `batch_size`, `ig_steps`,
    `smoothgrad_samples`, `smoothgrad_stdevs`, `top_q`, `map_metrics` and `seed` are ignored).
    `num_images_to_plot` images are plotted at each end of the ranking (see `explain`). `source`
    names the model's origin in the report (see `write_report`).

    Returns:
      {"split", "methods", "num_images", "num_with_map", "aggregate" (see `ExplainResults`),
      "per_image" (arrays (N,)), "ranking": {"key", "most", "least"} (dataset indices),
      "files" (see `write_report`), "results" (the `ExplainResults`)}.
    """
    if config is None:
        config = ExplainConfig(
            methods=methods,  # type: ignore[arg-type]  # __post_init__ normalises str and sequences
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
    files = write_report(results, out_dir, group_names=group_names, progress=progress, source=source)
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
