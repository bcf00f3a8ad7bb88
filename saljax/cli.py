"""The `saljax` command line.

    saljax demo                                    CE vs GradMask on a generated decoy set
    saljax train --config FILE.py[:ARG] --workdir DIR [key=value ...]
    saljax explain --checkpoint DIR [--dataset NAME[:SPLIT]] [--out DIR]
    saljax experiment SUITE [--seeds N] [--quick] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from saljax import demo

    print(f"saljax demo: CE vs GradMask on a generated decoy set ({args.steps} steps each, seed {args.seed})")
    results = demo.run(steps=args.steps, seed=args.seed, lam=args.lam)
    print()
    print(demo.format_table(results))
    return 0


def _train(args: argparse.Namespace) -> int:
    from saljax import checkpoint, config, train

    try:
        cfg = config.load(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as error:
        print(f"saljax train: {error}", file=sys.stderr)
        return 2
    try:
        results = train.train_and_evaluate(cfg, args.workdir)
    except checkpoint.NonFiniteError as error:
        print(f"saljax train: {error}", file=sys.stderr)
        return 1
    print()
    print(f"final evaluation ({cfg.method} on {cfg.dataset.name}, {cfg.num_steps} steps):")
    for key in sorted(results):
        print(f"  {key:40s} {results[key]:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from saljax import __version__

    parser = argparse.ArgumentParser(prog="saljax", description="Saliency-guided training in JAX/Flax.")
    parser.add_argument("--version", action="version", version=f"saljax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train CE vs GradMask on a generated decoy set and print a table")
    demo.add_argument("--steps", type=int, default=500, help="training steps per method (default 500)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lam", type=float, default=10.0, help="GradMask weight (reduction 'mean')")
    demo.set_defaults(func=_demo)
    tr = sub.add_parser("train", help="train a config in a work directory (resumes from its checkpoints)")
    tr.add_argument("--config", required=True, help="config file, optionally with an argument: FILE.py[:ARG]")
    tr.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and config.json")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_steps=2000")
    tr.set_defaults(func=_train)
    from saljax import explain

    ex = sub.add_parser("explain", help="saliency maps, divergence maps and map metrics of a trained model")
    explain.add_arguments(ex)
    ex.set_defaults(func=explain.main)
    from saljax import experiment

    exp = sub.add_parser("experiment", help="every method of a benchmark over seeds: result tables and figures")
    experiment.add_arguments(exp)
    exp.set_defaults(func=experiment.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # key=value overrides may also follow options given after the positional arguments.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    args.argv = argv
    if getattr(args, "steps", 1) < 1:
        print(f"saljax: --steps must be >= 1; got {args.steps}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
