"""The `saljax` command line.

    saljax demo                                    CE vs GradMask on a generated decoy set
    saljax train --config FILE.py[:ARG] --workdir DIR [key=value ...]
    saljax explain --checkpoint DIR [--dataset NAME[:SPLIT]] [--out DIR]
    saljax experiment SUITE [--seeds N] [--quick] [key=value ...]

Every command takes `-v`/`-q` (or `--verbosity LEVEL`) for the library's log messages and
`--debug` (or SALJAX_DEBUG=1) for a traceback on errors. Bad input (a config, a work directory,
an option) ends with a one-line message and exit code 2, a non-finite loss with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from saljax import __version__, demo, experiment, explain, train
from saljax import config as config_lib
from saljax import workdir as workdir_lib

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Errors that mean bad input: a one-line message and exit code 2.
_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, workdir_lib.CheckpointError)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line with exit code 2, pointing to --help instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _DropNoise(logging.Filter):
    """Drops two warnings that say nothing to a saljax user: TFDS's "Using custom data configuration"
    (saljax datasets always use one) and Orbax's "did not provide metrics" (only evaluations rank
    checkpoints)."""

    _PREFIXES = ("Using custom data configuration", "Requested `tracked_metric`; did not provide metrics")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._PREFIXES)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (which tests and notebooks may replace)."""

    @property  # type: ignore[override, unused-ignore]  # a property over StreamHandler's attribute
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Formatter(logging.Formatter):
    """Plain messages; warnings and errors start with their level ("warning: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _setup_logging(verbosity: str) -> None:
    """One switch for the library's messages ("saljax" loggers) and absl-logging libraries (TFDS, Orbax)."""
    level = _LEVELS[verbosity]
    logging.getLogger("saljax").setLevel(level)
    # absl's INFO chatter only with -v; its warnings otherwise.
    absl = logging.getLogger("absl")
    absl.setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    if not any(isinstance(f, _DropNoise) for f in absl.filters):
        absl.addFilter(_DropNoise())
    # absl calls logging.basicConfig() on its first message; replace that plain stderr handler (not
    # the handlers of test frameworks, which subclass it) with one that prints messages plainly.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        root.addHandler(handler)


def _demo(args: argparse.Namespace) -> int:
    print(f"saljax demo: CE vs GradMask on a generated decoy set ({args.steps} steps each, seed {args.seed})")
    results = demo.run(steps=args.steps, seed=args.seed, lam=args.lam)
    print()
    print(demo.format_table(results))
    return 0


def format_results(results: Mapping[str, float], best_metric: str = "") -> str:
    """A table of `train_and_evaluate`'s results, one column per checkpoint (final, best)."""
    final_step = int(results.get("final/step", -1))
    columns = [("", f"final (step {final_step})")]
    if "best/step" in results:
        columns.append(("best/", f"best by {best_metric} (step {int(results['best/step'])})"))
    keys = sorted(k for k in results if "/" in k and not k.startswith(("best/", "final/")))
    width = max([len(k) for k in keys] + [6]) + 2
    lines = ["  " + "metric".ljust(width) + "  ".join(title for _, title in columns)]
    for key in keys:
        cells = [f"{results.get(prefix + key, float('nan')):.4f}".ljust(len(title)) for prefix, title in columns]
        lines.append(("  " + key.ljust(width) + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    cfg = config_lib.load(args.config, args.overrides)
    results = train.train_and_evaluate(cfg, args.workdir)
    print()
    print(f"final evaluation ({cfg.method} on {cfg.dataset.name}, {cfg.num_steps} steps), by checkpoint:")
    print(format_results(results, cfg.checkpoint.best_metric))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the command is not reset by the command's own parser.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also SALJAX_DEBUG=1)")
    common.add_argument("--verbosity", choices=sorted(_LEVELS), default=argparse.SUPPRESS,
                        help="log level of the library's messages (default info)")
    common.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const="debug",
                        default=argparse.SUPPRESS, help="--verbosity debug")
    common.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const="warning",
                        default=argparse.SUPPRESS, help="--verbosity warning")
    parser = _Parser(prog="saljax", description="Saliency-guided training in JAX/Flax.", parents=[common])
    parser.add_argument("--version", action="version", version=f"saljax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    dm = sub.add_parser("demo", parents=[common], help="train CE vs GradMask on a generated decoy set and print a table")
    dm.add_argument("--steps", type=int, default=500, help="training steps per method (default 500)")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--lam", type=float, default=10.0, help="GradMask weight (reduction 'mean')")
    dm.set_defaults(func=_demo)
    tr = sub.add_parser("train", parents=[common], help="train a config in a work directory (resumes from its checkpoints)")
    tr.add_argument("--config", required=True, help="config file, optionally with an argument: FILE.py[:ARG]")
    tr.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and config.json")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_steps=2000")
    tr.set_defaults(func=_train)
    ex = sub.add_parser("explain", parents=[common], help="saliency maps, divergence maps and map metrics of a trained model")
    explain.add_arguments(ex)
    ex.set_defaults(func=explain.main)
    exp = sub.add_parser("experiment", parents=[common],
                         help="every method of a benchmark over seeds: result tables and figures")
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
    debug = getattr(args, "debug", False) or os.environ.get("SALJAX_DEBUG", "") not in ("", "0")
    args.debug = debug  # commands that report their own errors re-raise them with it
    _setup_logging(getattr(args, "verbosity", "info"))
    prog = f"saljax {args.command}"
    if getattr(args, "steps", 1) < 1:
        print(f"saljax: --steps must be >= 1; got {args.steps}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except workdir_lib.NonFiniteError as error:
        if debug:
            raise
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except _INPUT_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: {str(error).strip()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line without --debug; the traceback with it
        if debug:
            raise
        print(f"{prog}: {type(error).__name__}: {error} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
