"""Experiment suites: every method of a benchmark over several seeds, as result tables and figures.

    saljax experiment decoy_digits --seeds 5     # experiments/results/decoy_digits.{md,json} + PNGs
    saljax experiment decoy_digits --quick       # fewer seeds and steps: prints the table

A suite is a config file in `experiments/configs/` (see `saljax.config`): `get_config(method)`
describes one training run and `get_suite()` returns a `Suite` naming the methods, the splits and
metrics to tabulate, the quick settings and the targets. The runner trains every method for seeds
0..N-1 with `saljax.train.train_many` (on GPU and TPU the seeds of a method as one vmapped
program; one work directory per run, so an interrupted suite resumes: finished runs are skipped,
unfinished ones resume from their checkpoints), evaluates the
final model of each run on every evaluation split, and writes

- `<suite>.md`: mean +- std over seeds and the 95% confidence interval of the mean (Student t) per
  method, split and metric; the targets and whether they are met; the exact command, the commit,
  package versions and the wall time.
- `<suite>.json`: the same plus every run's final metrics (what the tables are computed from).
- `<suite>/overlays_<map>.png`: input-gradient and Grad-CAM saliency of the same test images under
  each method (seed 0), with the human map's outline; `<suite>/curves.png`: training curves.

Modules: `suite` (`Suite`, `Target`: what a config's `get_suite()` returns), `runner` (training the
runs), `stats` (means and intervals), `report` (the page), `figures`, `command` (the command line).
"""

from saljax.experiment.command import add_arguments, main, run
from saljax.experiment.figures import OVERLAY_MAPS, plot_curves, plot_overlays
from saljax.experiment.report import parse_markdown_tables, provenance, render_markdown
from saljax.experiment.runner import (
    RESULT_FILE,
    Sweep,
    aggregate,
    find_config,
    load_suite,
    parse_sweep,
    run_dir,
    run_suite,
)
from saljax.experiment.stats import format_cell, parse_cell, summarize
from saljax.experiment.suite import Suite, Target

__all__ = [
    "Suite",
    "Target",
    "RESULT_FILE",
    "Sweep",
    "parse_sweep",
    "OVERLAY_MAPS",
    "find_config",
    "load_suite",
    "run_dir",
    "run_suite",
    "aggregate",
    "summarize",
    "format_cell",
    "parse_cell",
    "parse_markdown_tables",
    "provenance",
    "render_markdown",
    "plot_overlays",
    "plot_curves",
    "run",
    "add_arguments",
    "main",
]
