"""Experiment suites: every method of a benchmark over several seeds, as result tables and figures.

    saljax experiment decoy_digits --seeds 5     # experiments/results/decoy_digits.{md,json} + PNGs
    saljax experiment decoy_digits --quick       # fewer seeds and steps: prints the table

A suite is a config file in `experiments/configs/` (see `saljax.config`): `get_config(method)`
describes one training run and `get_suite()` returns a `Suite` naming the methods, the splits and
metrics to tabulate, the quick settings and the targets. The runner trains every method for seeds
0..N-1 with `saljax.train.train_and_evaluate` (one work directory per run, so an interrupted suite
resumes: finished runs are skipped, unfinished ones resume from their checkpoints), evaluates the
final model of each run on every evaluation split, and writes

- `<suite>.md`: mean +- std over seeds and the 95% confidence interval of the mean (Student t) per
  method, split and metric; the targets and whether they are met; the exact command, the commit,
  package versions and the wall time.
- `<suite>.json`: the same plus every run's final metrics (what the tables are computed from).
- `<suite>/overlays_<map>.png`: input-gradient and Grad-CAM saliency of the same test images under
  each method (seed 0), with the human map's outline; `<suite>/curves.png`: training curves.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

RESULT_FILE = "result.json"  # in each run's work directory once it has finished
OVERLAY_MAPS = ("gradient", "grad_cam")


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
      quick: overrides (`key=value`) for `--quick`, with `quick_seeds` seeds.
      targets: claims checked on the means.
      curve_metric: the evaluation metric of the training-curves figure.
      notes: Markdown paragraphs printed under the table (how hyperparameters were chosen, ...).
    """

    name: str
    title: str
    methods: tuple[str, ...]
    splits: tuple[str, ...]
    metrics: tuple[str, ...] = ("accuracy", "saliency_inside")
    quick: tuple[str, ...] = ()
    quick_seeds: int = 2
    targets: tuple[Target, ...] = ()
    curve_metric: str = "validation/accuracy"
    notes: str = ""


# --- statistics -------------------------------------------------------------------------------------


def _t_quantile(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom."""
    from scipy import stats  # scikit-learn's dependency, already installed for the digits

    return float(stats.t.ppf(0.975, dof))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (ddof 1) and the 95% t confidence interval of the mean of `values`.

    NaN values are dropped (`n` counts the rest). With one value the std is 0 and the interval NaN.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    half = _t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def format_cell(stats: Mapping[str, float]) -> str:
    """`mean ± std [lo, hi]` with 3 decimals; `–` when there is no value."""
    if not stats["n"]:
        return "–"
    text = f"{stats['mean']:.3f} ± {stats['std']:.3f}"
    if math.isfinite(stats["ci_low"]):
        text += f" [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"
    return text


# --- finding and loading a suite ------------------------------------------------------------------


def find_config(suite: str) -> str:
    """The config file of `suite`: a path to a .py file, or a name looked up in
    `./experiments/configs/` and then in the source checkout saljax was installed from."""
    if suite.endswith(".py") or os.sep in suite:
        if not os.path.isfile(suite):
            raise FileNotFoundError(f"suite config {suite} does not exist")
        return suite
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join("experiments", "configs", f"{suite}.py"),
                  os.path.join(here, os.pardir, "experiments", "configs", f"{suite}.py")]
    for path in candidates:
        if os.path.isfile(path):
            return os.path.normpath(path)
    raise FileNotFoundError(f"no suite named {suite!r}: looked for {', '.join(candidates)} (pass a config file path)")


def load_suite(config_path: str) -> Suite:
    """The `Suite` that the config file's `get_suite()` returns."""
    from saljax import config as config_lib

    module = config_lib.load_module(config_path)
    if not hasattr(module, "get_suite"):
        raise ValueError(f"config file {config_path} has no get_suite(): it defines single runs, not a suite")
    suite = module.get_suite()
    if not isinstance(suite, Suite):
        raise TypeError(f"get_suite() of {config_path} must return saljax.experiment.Suite; got {type(suite).__name__}")
    return suite


# --- running ------------------------------------------------------------------------------------------


def run_dir(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, "runs", method, f"seed{seed}")


def _read_result(path: str) -> dict[str, Any] | None:
    file = os.path.join(path, RESULT_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def run_suite(
    config_path: str,
    suite: Suite,
    workdir: str,
    *,
    seeds: int,
    overrides: Sequence[str] = (),
    methods: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, Any]]]:
    """Trains every method of `suite` for seeds 0..seeds-1; returns method -> per-seed results.

    Each result is `{"seed", "metrics": {split/metric: value}, "wall_s", "config"}`, also written
    to the run's `result.json`. A run that finished with the same config is not trained again.
    """
    from saljax import checkpoint, train
    from saljax import config as config_lib

    methods = _check_selection(suite, methods, seeds)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    total = len(methods) * seeds
    done = 0
    for seed in range(seeds):  # seed-major: a stopped suite has every method at the first seeds
        for method in methods:
            done += 1
            cfg = config_lib.load(f"{config_path}:{method}", [*overrides, f"seed={seed}", "progress=False"])
            path = run_dir(workdir, method, seed)
            previous = _read_result(path)
            if previous is not None and not checkpoint.config_changes(previous["config"], cfg):
                results[method].append(previous)
                log(f"[{done}/{total}] {method} seed {seed}: done earlier")
                continue
            _check_no_other_run(path, cfg)
            start = time.perf_counter()
            metrics = train.train_and_evaluate(cfg, path, log=lambda _: None)
            result = {"seed": seed, "metrics": metrics, "wall_s": time.perf_counter() - start,
                      "config": json.loads(cfg.to_json())}
            with open(os.path.join(path, RESULT_FILE), "w") as f:
                json.dump(result, f, indent=1)
            results[method].append(result)
            shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in _headline(suite) if k in metrics)
            log(f"[{done}/{total}] {method} seed {seed}: {result['wall_s']:.0f} s, {shown}")
    return results


def _check_selection(suite: Suite, methods: Sequence[str] | None, seeds: int) -> tuple[str, ...]:
    """The methods to run (all of the suite's by default), after checking them and `seeds`."""
    methods = tuple(methods or suite.methods)
    unknown = [m for m in methods if m not in suite.methods]
    if unknown:
        raise ValueError(f"--methods {unknown} not in suite {suite.name!r}; it has {list(suite.methods)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1; got {seeds}")
    return methods


def _check_no_other_run(path: str, wanted: Any) -> None:
    """Refuses to resume (or evaluate) a run that another config left in `path`."""
    from saljax import checkpoint

    if not os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
        return
    changed = checkpoint.config_changes(checkpoint.load_config(path), wanted)
    if changed:
        raise ValueError(f"{path} holds a run of another config (differing fields: {', '.join(changed)});"
                         " pass another --workdir or remove that directory")


def _headline(suite: Suite) -> list[str]:
    return [f"{split}/{suite.metrics[0]}" for split in suite.splits]


def aggregate(suite: Suite, results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> "split/metric" -> `summarize` of the per-seed values."""
    table = {}
    for method, runs in results.items():
        table[method] = {}
        for split in suite.splits:
            for metric in suite.metrics:
                key = f"{split}/{metric}"
                table[method][key] = summarize([r["metrics"].get(key, float("nan")) for r in runs])
    return table


# --- provenance ---------------------------------------------------------------------------------------


def _git(*args: str, cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(config_path: str) -> dict[str, Any]:
    """Commit (and whether the tree had changes), versions and the machine."""
    import flax
    import jax
    import optax

    import saljax

    where = os.path.dirname(os.path.abspath(config_path))
    commit = _git("rev-parse", "HEAD", cwd=where)
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=where)
    return {
        "commit": commit or "unknown (not a git checkout)",
        "dirty": bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"saljax": saljax.__version__, "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax backend {jax.default_backend()} "
                   f"x{jax.local_device_count()}",
    }


# --- report ------------------------------------------------------------------------------------------


def _run_settings(method: str, result: Mapping[str, Any]) -> str:
    c = result["config"]
    model = c["model"]["name"] + (f" {json.dumps(c['model']['kwargs'])}" if c["model"]["kwargs"] else "")
    data = c["dataset"]["name"] + "/" + str(c["dataset"]["config"])
    if c["dataset"].get("overrides"):
        data += " " + json.dumps(c["dataset"]["overrides"])
    opt = c["optimizer"]
    loss = json.dumps(c["loss"]) if c["loss"] else "defaults"
    return (f"{method} | {c['method']}: {loss} | {data} | {model} | {opt['name']} lr {opt['learning_rate']:g} | "
            f"{c['num_steps']} x {c['batch_size']}")


def render_markdown(suite: Suite, report: Mapping[str, Any]) -> str:
    """The Markdown results page of a finished suite (see the module doc)."""
    prov = report["provenance"]
    table = report["table"]
    methods = list(table)
    seeds = max(len(r) for r in report["runs"].values())
    commit = prov["commit"] + (" with uncommitted changes" if prov["dirty"] else "")
    v = prov["versions"]
    lines = [
        f"# {suite.name}: {suite.title}",
        "",
        f"Made by `{report['command']}`",
        f"at commit {commit} on {prov['date']}.",
        f"Versions: saljax {v['saljax']}, jax {v['jax']}, flax {v['flax']}, optax {v['optax']}, python {v['python']}.",
        f"Machine: {prov['machine']}. Wall time: {report['wall_s'] / 60:.1f} min of training and evaluation"
        f" ({sum(len(r) for r in report['runs'].values())} runs).",
        "",
        f"Each cell: mean ± std over {seeds} seeds (0..{seeds - 1}) [95% confidence interval of the mean,"
        " Student t]. The final model of each run is evaluated; seeds change the initialisation and the"
        " data order, not the dataset.",
        "",
        "## Results",
    ]
    for split in suite.splits:
        lines += ["", f"### {split}", "", "| method | " + " | ".join(suite.metrics) + " |",
                  "|---|" + "---|" * len(suite.metrics)]
        for method in methods:
            cells = [format_cell(table[method][f"{split}/{m}"]) for m in suite.metrics]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if suite.targets:
        lines += ["", "## Targets", "", "| claim | value | target | met |", "|---|---|---|---|"]
        for target, (value, met) in zip(suite.targets, report["targets"]):
            status = "not run" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {target.claim} | {value:.3f} | {target.op} {target.threshold:g} | {status} |")
    if suite.notes:
        lines += ["", suite.notes.strip()]
    figures = report.get("figures", [])
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{os.path.splitext(os.path.basename(f))[0]}]({f})" for f in figures]
    lines += ["", "## Runs", "", "| method | loss and options | dataset | model | optimizer | steps x batch |",
              "|---|---|---|---|---|---|"]
    for method in methods:
        lines.append("| " + _run_settings(method, report["runs"][method][0]) + " |")
    return "\n".join(lines) + "\n"


def parse_markdown_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """The results tables of a page `render_markdown` wrote: split -> method -> metric -> cell."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    section, split, header = None, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            section, split, header = line[3:].strip(), None, None
        elif line.startswith("### ") and section == "Results":
            split, header = line[4:].strip(), None
            tables[split] = {}
        elif split and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                if len(cells) != len(header):
                    raise ValueError(f"table {split!r}: row {line!r} has {len(cells)} cells, header {len(header)}")
                tables[split][cells[0]] = dict(zip(header[1:], cells[1:]))
    return tables


def parse_cell(cell: str) -> dict[str, float]:
    """Inverse of `format_cell` (to 3 decimals)."""
    if cell == "–":
        return {"n": 0}
    mean_std, _, ci = cell.partition(" [")
    mean, std = (float(x) for x in mean_std.split(" ± "))
    out = {"mean": mean, "std": std}
    if ci:
        lo, hi = (float(x) for x in ci.rstrip("]").split(", "))
        out.update(ci_low=lo, ci_high=hi)
    return out


# --- figures ------------------------------------------------------------------------------------------


def plot_overlays(suite: Suite, workdir: str, methods: Sequence[str], path_for: Callable[[str], str],
                  *, num_images: int = 6, split: str | None = None) -> list[str]:
    """Saliency of the same test images under each method's seed-0 model, one PNG per map kind.

    The images come from the dataset most methods train on. Rows: the image with the human map's
    outline, then one row per method: the input gradient (reduced over channels as `saljax explain`
    does) or Grad-CAM of the true class, min-max scaled per image. Returns the paths written.
    """
    from saljax import _figures, data, explain, train

    split = split or suite.splits[-1]
    models = {m: train.load_model(run_dir(workdir, m, 0), step="latest") for m in methods}
    # The benchmark's dataset is the one most methods train on (not a clean-data reference's).
    datasets = [cfg.dataset for _, cfg in models.values()]
    ds = max(datasets, key=lambda d: sum(d.to_json() == e.to_json() for e in datasets))
    builder = data.build(ds.name, os.path.expanduser(ds.data_dir), ds.config or None,
                         manual_dir=ds.manual_dir or None, **ds.overrides)
    batch = next(iter(data.make_loader(builder, split, num_images, shuffle=False, num_epochs=1,
                                       drop_remainder=False, mean=ds.mean, std=ds.std)))
    n = len(batch["label"])
    maps = {m: explain.explain_batch(model, batch["image"], batch["label"], methods=OVERLAY_MAPS)
            for m, (model, _) in models.items()}
    written = []
    for kind in OVERLAY_MAPS:
        fig = _figures.figure(1.6 * n + 1.2, 1.6 * (len(methods) + 1))
        grid = fig.subplots(len(methods) + 1, n, squeeze=False)
        for j in range(n):
            gray = _figures.gray(batch["image"][j])
            mask = batch["saliency_map"][j] >= 0.5
            for i, method in enumerate([None, *methods]):
                ax = grid[i, j]
                ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
                if method is not None:
                    s = maps[method]["maps"][kind][j]
                    s = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.zeros_like(s)
                    ax.imshow(s, cmap="inferno", vmin=0, vmax=1, alpha=0.65)
                    pred = int(np.argmax(maps[method]["logits"][j]))
                    ax.set_title(f"pred {pred}", fontsize=7)
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.7)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel("image" if method is None else method, fontsize=8)
            grid[0, j].set_title(f"label {int(batch['label'][j])}", fontsize=7)
        fig.suptitle(f"{suite.name}: {kind.replace('_', ' ')} saliency on {split} images (seed 0; cyan: human map)",
                     fontsize=9)
        path = path_for(f"overlays_{kind}.png")
        _save_small_png(fig, path)
        written.append(path)
    return written


def _save_small_png(fig, path: str) -> None:
    # Noisy images compress badly as RGBA; a 256-colour palette keeps the committed PNGs small.
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


def plot_curves(suite: Suite, workdir: str, results: Mapping[str, Sequence[Mapping[str, Any]]], path: str) -> str:
    """Training loss and `suite.curve_metric` against the step: mean over seeds, band = min..max."""
    from saljax import _figures
    from saljax.writers import read_metrics

    fig = _figures.figure(10, 3.6)
    ax_loss, ax_eval = fig.subplots(1, 2)
    for method, runs in results.items():
        for ax, key in ((ax_loss, "train/loss"), (ax_eval, suite.curve_metric)):
            series = []
            for r in runs:
                rows = [row for row in read_metrics(run_dir(workdir, method, r["seed"])) if key in row]
                last = {}
                for row in rows:  # a resumed run repeats steps: keep the last value of each
                    last[row["step"]] = float(row[key])
                series.append(last)
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            values = np.array([[s[t] for t in steps] for s in series])
            line, = ax.plot(steps, values.mean(axis=0), label=method, linewidth=1.2)
            if len(series) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss (total)", fontsize=9)
    ax_eval.set_title(suite.curve_metric, fontsize=9)
    for ax in (ax_loss, ax_eval):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_eval.legend(fontsize=7)
    fig.suptitle(f"{suite.name}: mean over seeds, band = min..max", fontsize=9)
    fig.savefig(path)
    return path


# --- the command --------------------------------------------------------------------------------------


def _enable_compilation_cache(workdir: str) -> None:
    # Every seed of a method compiles the same step: the persistent cache turns the repeats into loads.
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(args, argv: Sequence[str]) -> int:
    """`saljax experiment` (see `add_arguments`)."""
    config_path = find_config(args.suite)
    suite = load_suite(config_path)
    seeds = args.seeds if args.seeds is not None else (suite.quick_seeds if args.quick else 5)
    methods = _check_selection(suite, args.methods, seeds)  # before any directory or cache is touched
    overrides = [*(suite.quick if args.quick else ()), *args.overrides]
    name = suite.name + ("-quick" if args.quick else "")
    workdir = os.path.abspath(args.workdir or os.path.join("runs", "experiments", name))
    if args.out:
        out = args.out
    elif args.quick:
        out = workdir
    else:
        out = os.path.join(os.path.dirname(os.path.abspath(config_path)), os.pardir, "results")
    out = os.path.normpath(out)
    os.makedirs(os.path.join(out, name) if not args.no_figures else out, exist_ok=True)
    os.makedirs(workdir, exist_ok=True)
    _enable_compilation_cache(workdir)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS warns about custom configs at every run
    print(f"saljax experiment {suite.name}: {len(methods)} methods x {seeds} seeds in {workdir}", flush=True)
    results = run_suite(config_path, suite, workdir, seeds=seeds, overrides=overrides, methods=methods,
                        log=lambda s: print(s, flush=True))
    table = aggregate(suite, results)
    means = {m: {k: s["mean"] for k, s in row.items()} for m, row in table.items()}
    figures = []
    if not args.no_figures:
        figures += plot_overlays(suite, workdir, list(results), lambda f: os.path.join(out, name, f))
        figures.append(plot_curves(suite, workdir, results, os.path.join(out, name, "curves.png")))
    report = {
        "suite": suite.name,
        "command": "saljax " + shlex.join(argv),
        "provenance": provenance(config_path),
        "wall_s": sum(r["wall_s"] for runs in results.values() for r in runs),
        "table": table,
        "targets": [t.check(means) for t in suite.targets],
        "figures": [os.path.relpath(f, out) for f in figures],
        "runs": results,
    }
    md = render_markdown(suite, report)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    print()
    print(md.split("## Runs")[0].rstrip())
    print(f"\nwrote {os.path.join(out, name + '.md')}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("suite", help="a suite name (decoy_digits, synthetic_distractor, spurious_binary) or config file")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5; --quick: the suite's)")
    parser.add_argument("--quick", action="store_true", help="the suite's quick settings: fewer seeds and steps")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the suite's methods")
    parser.add_argument("--workdir", default=None, help="runs go here (default runs/experiments/<suite>)")
    parser.add_argument("--out", default=None,
                        help="tables and figures go here (default experiments/results; --quick: the workdir)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def main(args) -> int:
    from saljax import checkpoint

    try:
        return run(args, args.argv)
    except (FileNotFoundError, ValueError) as error:
        print(f"saljax experiment: {error}", file=sys.stderr)
        return 2
    except checkpoint.NonFiniteError as error:
        print(f"saljax experiment: {error}", file=sys.stderr)
        return 1
