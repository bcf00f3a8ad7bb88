"""`saljax experiment SUITE`: run a suite and write its page, JSON and figures."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Sequence

import jax
from absl import logging as absl_logging

from saljax import config as config_lib
from saljax import train
from saljax import workdir as workdir_lib
from saljax.experiment.figures import plot_curves, plot_overlays
from saljax.experiment.report import provenance, render_markdown
from saljax.experiment.runner import (
    aggregate,
    check_selection,
    find_config,
    load_suite,
    parse_sweep,
    run_suite,
)


def _enable_compilation_cache(workdir: str) -> None:
    # Every seed of a method compiles the same step: the persistent cache turns the repeats into loads.
    # A cache the environment or the caller has set up already (JAX_COMPILATION_CACHE_DIR) is kept as it
    # is, with its own settings.
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _seeds(text: str) -> int:
    # Parsed here rather than by argparse: a bad value is then one line and exit code 2 like every input error.
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--seeds must be an integer >= 1; got {text!r}") from None


def run(args, argv: Sequence[str]) -> int:
    """`saljax experiment` (see `add_arguments`)."""
    config_path = find_config(args.suite)
    suite = load_suite(config_path)
    if args.quick and suite.quick_targets:  # the quick version claims what its shorter runs can show
        suite = dataclasses.replace(suite, targets=suite.quick_targets)
    seeds = _seeds(args.seeds) if args.seeds is not None else (suite.quick_seeds if args.quick else 5)
    wanted = args.methods or (suite.quick_methods if args.quick else None)
    methods = check_selection(suite, wanted, seeds)  # before any directory or cache is touched
    sweep = parse_sweep(args.sweep) if args.sweep is not None else None
    overrides = [*(suite.quick if args.quick else ()), *args.overrides]
    for method in methods:  # every run's config and loss options too
        train.check_config(config_lib.load(f"{config_path}:{method}", [*overrides, "progress=False"]))
    # A sweep's page and runs go beside the suite's, not over them.
    name = suite.name + (f"-sweep-{sweep.option}" if sweep else "") + ("-quick" if args.quick else "")
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

    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS warns about custom configs at every run
    swept = f" x loss.{sweep.option} in {list(sweep.values)}" if sweep else ""
    print(f"saljax experiment {suite.name}: {len(methods)} methods x {seeds} seeds{swept} in {workdir}", flush=True)
    results = run_suite(config_path, suite, workdir, seeds=seeds, overrides=overrides, methods=methods,
                        log=lambda s: print(s, flush=True), vmap=not args.no_vmap, form=args.vmap_form,
                        sweep=sweep)
    table = aggregate(suite, results)
    means = {m: {k: s["mean"] for k, s in row.items()} for m, row in table.items()}
    figures = []
    if not args.no_figures:
        figures += plot_overlays(suite, workdir, list(results), lambda f: os.path.join(out, name, f))
        figures.append(plot_curves(suite, workdir, results, os.path.join(out, name, "curves.png")))
    report = {
        "suite": suite.name,
        "checkpoint": suite.checkpoint,
        "command": "saljax " + shlex.join(argv),
        "provenance": provenance(config_path),
        "wall_s": sum(r["wall_s"] for runs in results.values() for r in runs),
        "table": table,
        "targets": [t.check(means) for t in suite.targets],
        "figures": [os.path.relpath(f, out) for f in figures],
        "runs": results,
    }
    md = render_markdown(suite, report)
    text = json.dumps(report, indent=1, default=float)  # before either file changes: the pair stays consistent
    with workdir_lib.atomic_write(os.path.join(out, f"{name}.md")) as f:
        f.write(md)
    with workdir_lib.atomic_write(os.path.join(out, f"{name}.json")) as f:
        f.write(text)
    print()
    print(md.split("## Runs")[0].rstrip())
    print(f"\nwrote {os.path.join(out, name + '.md')}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("suite", help="a suite name in experiments/configs/ (e.g. decoy_mnist) or a config file")
    parser.add_argument("--seeds", default=None, metavar="N", help="seeds per method (default 5; --quick: the suite's)")
    parser.add_argument("--quick", action="store_true", help="the suite's quick settings: fewer seeds and steps")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the suite's methods")
    parser.add_argument("--workdir", default=None, help="runs go here (default runs/experiments/<suite>)")
    parser.add_argument("--out", default=None,
                        help="tables and figures go here (default experiments/results; --quick: the workdir)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-vmap", action="store_true",
                        help="train runs one after another (default: the seeds of a method train as one vmapped"
                             " program when they share model and data shapes; see --vmap-form)")
    parser.add_argument("--vmap-form", default="auto", choices=("auto", "vmap", "map"),
                        help="how one program steps a method's seeds: vmap (batched), map (one after another inside"
                             " it), auto (default: vmap on GPU/TPU; separate runs on CPU, where they measured faster)")
    parser.add_argument("--sweep", default=None, metavar="loss.OPTION=V1,V2,...",
                        help="also sweep one numeric loss option, e.g. loss.lam=1,10,100: each method that takes it"
                             " trains once per value (rows <method>@lam=<value>, vmapped with the seeds); page and"
                             " runs under <suite>-sweep-<option>")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def main(args) -> int:

    try:
        return run(args, args.argv)
    except (FileNotFoundError, ValueError) as error:
        if getattr(args, "debug", False):
            raise
        print(f"saljax experiment: {error}", file=sys.stderr)
        return 2
    except workdir_lib.NonFiniteError as error:
        if getattr(args, "debug", False):
            raise
        print(f"saljax experiment: {error}", file=sys.stderr)
        return 1
