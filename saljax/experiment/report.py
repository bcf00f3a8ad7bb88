"""The results page of a suite: provenance, tables, targets, figures and the runs' settings."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

import flax
import jax
import optax

import saljax
from saljax.experiment.stats import format_cell
from saljax.experiment.suite import Suite


def _git(*args: str, cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(config_path: str) -> dict[str, Any]:
    """Commit (and whether the tree had changes), versions and the machine."""
    where = os.path.dirname(os.path.abspath(config_path))
    commit = _git("rev-parse", "HEAD", cwd=where)
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=where)
    return {
        "commit": commit or "unknown (not a git checkout)",
        "dirty": bool(status),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"saljax": saljax.__version__, "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax backend {jax.default_backend()} "
                   f"x{jax.local_device_count()}",
    }


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


def _checkpoint_choice(suite: Suite, report: Mapping[str, Any]) -> str:
    if suite.checkpoint == "final":
        return "the final step of each run"
    metrics = sorted({r["config"]["checkpoint"]["best_metric"] for runs in report["runs"].values() for r in runs})
    return f"the step with the best {' / '.join(metrics)} of each run (ties: the earliest step)"


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
        f" Student t]. Checkpoint: {_checkpoint_choice(suite, report)}. Seeds change the initialisation and the"
        " data order, not the dataset.",
        "",
        "## Results",
    ]
    for split in suite.splits:
        lines += ["", f"### {split}", "", "| method | " + " | ".join(suite.columns) + " |",
                  "|---|" + "---|" * len(suite.columns)]
        for method in methods:
            cells = [format_cell(table[method][f"{split}/{m}"]) for m in suite.columns]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if suite.published:
        lines += ["", "## Against the published numbers", "", "| method | split/metric | ours | published |",
                  "|---|---|---|---|"]
        for method, key, text in suite.published:
            ours = format_cell(table[method][key]) if method in table and key in table[method] else "not run"
            lines.append(f"| {method} | {key} | {ours} | {text} |")
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
