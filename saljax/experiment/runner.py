"""Finding a suite, training every method over seeds (resumable, cached per run, vmapped), aggregating."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from saljax import config as config_lib
from saljax import losses, train
from saljax import workdir as workdir_lib
from saljax.experiment.explained import explain_run, map_metric_names
from saljax.experiment.stats import summarize
from saljax.experiment.suite import Suite

_log = logging.getLogger(__name__)

RESULT_FILE = "result.json"  # in each run's work directory once it has finished


def find_config(suite: str) -> str:
    """The config file of `suite`: a path to a .py file, or a name looked up in `./experiments/configs/`."""
    if suite.endswith(".py") or os.sep in suite:
        if not os.path.isfile(suite):
            raise FileNotFoundError(f"suite config {suite} does not exist")
        return suite
    path = os.path.join("experiments", "configs", f"{suite}.py")
    if os.path.isfile(path):
        return path
    raise FileNotFoundError(f"no suite named {suite!r}: {path} does not exist here (run from the saljax checkout "
                            "or pass a config file path)")


def load_suite(config_path: str) -> Suite:
    """The `Suite` that the config file's `get_suite()` returns."""
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


def _write_result(path: str, result: Mapping[str, Any]) -> None:
    # Atomic: an interrupted write never leaves a half result that looks finished.
    with workdir_lib.atomic_write(os.path.join(path, RESULT_FILE)) as f:
        json.dump(result, f, indent=1)


def _read_result(path: str) -> dict[str, Any] | None:
    file = os.path.join(path, RESULT_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Values of one numeric loss option (`--sweep loss.lam=1,10,100`): each method that takes it
    trains once per value, as rows `<method>@<option>=<value>`."""

    option: str
    values: tuple[int | float, ...]

    def row(self, method: str, value: int | float) -> str:
        return f"{method}@{self.option}={value}"


def parse_sweep(text: str) -> Sweep:
    """`loss.<option>=v1,v2,...` -> Sweep; a one-line ValueError for anything else."""
    key, sep, values = text.partition("=")
    option = key.removeprefix("loss.")
    if not sep or not key.startswith("loss.") or not option.isidentifier():
        raise ValueError(f"--sweep must be loss.<option>=v1,v2,... (e.g. loss.lam=1,10,100); got {text!r}")
    parsed: list[int | float] = []
    for item in values.split(","):
        value = config_lib.parse_value(item.strip())
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"--sweep {key} takes comma-separated numbers (e.g. {key}=1,10,100); got {values!r}")
        parsed.append(value)
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"--sweep {key} lists a value twice: {values!r}")
    return Sweep(option, tuple(parsed))


def _takes(cfg: Any, option: str) -> bool:
    """Whether the loss of `cfg` has `option` (a weight `lam`/`alpha` of its preset, or an option it accepts)."""
    if option in ("lam", "alpha"):  # the presets' weights; a loss without one ignores it
        return option in losses.PRESETS.get(cfg.method, {})
    try:
        train.make_loss(cfg)
    except ValueError:
        return False
    return True


def _rows(config_path: str, methods: Sequence[str], overrides: Sequence[str],
          sweep: Sweep | None) -> dict[str, tuple[str, list[str]]]:
    """row name -> (method, overrides): one row per method, or per method and swept value."""
    rows: dict[str, tuple[str, list[str]]] = {}
    for method in methods:
        if sweep is not None:
            first = [*overrides, f"loss.{sweep.option}={sweep.values[0]!r}"]
            if _takes(config_lib.load(f"{config_path}:{method}", first), sweep.option):
                for value in sweep.values:
                    rows[sweep.row(method, value)] = (method, [*overrides, f"loss.{sweep.option}={value!r}"])
                continue
        rows[method] = (method, list(overrides))
    if sweep is not None and all(name in methods for name in rows):
        raise ValueError(f"--sweep loss.{sweep.option}: no method of {list(methods)} takes loss.{sweep.option}")
    return rows


def run_suite(
    config_path: str,
    suite: Suite,
    workdir: str,
    *,
    seeds: int,
    overrides: Sequence[str] = (),
    methods: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    vmap: bool = True,
    form: str = "auto",
    sweep: Sweep | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Trains every method of `suite` for seeds 0..seeds-1; returns row -> per-seed results.

    Each result is `{"seed", "metrics": {split/metric: value}, "wall_s", "config"}`, also written
    to the run's `result.json`. A run that finished with the same config is not trained again.
    With `vmap`, the unfinished runs of a method (its seeds, and its `sweep` values) train as one
    vmapped program (`saljax.train.train_many`, stepping its runs as `form` says; each `wall_s` is
    then the program's time divided among its runs); without, one after another, seed-major. With a `sweep`, each method that
    takes the option trains once per value, as rows `<method>@<option>=<value>`; the others once.
    `log` gets a line per finished run and per group started; the training loop's other messages
    (each evaluation) go to this module's logger at DEBUG (`saljax -v experiment ...` shows them).
    """
    methods = check_selection(suite, methods, seeds)
    map_metric_names(suite)  # a misspelt map metric fails before any training
    rows = _rows(config_path, methods, overrides, sweep)
    results: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    total = len(rows) * seeds
    done = 0
    # One group per method with vmap; else one run at a time, seed-major: a stopped suite has every
    # method at the first seeds.
    groups = [[(row, seed) for row in rows for seed in range(seeds) if rows[row][0] == method] for method in methods] \
        if vmap else [[(row, seed)] for seed in range(seeds) for row in rows]
    for group in groups:
        todo = []
        for row, seed in group:
            cfg = config_lib.load(f"{config_path}:{rows[row][0]}", [*rows[row][1], f"seed={seed}", "progress=False"])
            path = run_dir(workdir, row, seed)
            previous = _read_result(path)
            if previous is not None and not workdir_lib.config_changes(previous["config"], cfg):
                missing = [c for split in suite.splits for c in suite.map_metrics
                           if suite.key(f"{split}/{c}") not in previous["metrics"]]
                if missing:  # a map metric added to the suite since: explain the trained run, train nothing
                    previous["metrics"] |= explain_run(suite, path, suite.splits)
                    _write_result(path, previous)
                results[row].append(previous)
                done += 1
                log(f"[{done}/{total}] {row} seed {seed}: done earlier")
                continue
            _check_no_other_run(path, cfg)
            todo.append((row, seed, cfg, path))
        if not todo:
            continue
        start = time.perf_counter()
        trained = train.train_many([t[2] for t in todo], [t[3] for t in todo], vmap=vmap, form=form,
                                   log=lambda m: log(f"  {m}") if m.startswith("training ") else _log.debug(m))
        wall_s = (time.perf_counter() - start) / len(todo)
        for (row, seed, cfg, path), metrics in zip(todo, trained, strict=True):
            metrics |= explain_run(suite, path, suite.splits)
            result = {"seed": seed, "metrics": metrics, "wall_s": wall_s, "config": json.loads(cfg.to_json())}
            _write_result(path, result)
            results[row].append(result)
            done += 1
            shown = ", ".join(f"{k} {metrics[suite.key(k)]:.3f}" for k in _headline(suite) if suite.key(k) in metrics)
            log(f"[{done}/{total}] {row} seed {seed}: {wall_s:.0f} s, {shown}")
    for runs in results.values():
        runs.sort(key=lambda r: r["seed"])
    return results


def check_selection(suite: Suite, methods: Sequence[str] | None, seeds: int) -> tuple[str, ...]:
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
    if not os.path.isfile(os.path.join(path, workdir_lib.CONFIG_FILE)):
        return
    changed = workdir_lib.config_changes(workdir_lib.load_config(path), wanted)
    if changed:
        raise ValueError(f"{path} holds a run of another config (differing fields: {', '.join(changed)});"
                         " pass another --workdir or remove that directory")


def _headline(suite: Suite) -> list[str]:
    return [f"{split}/{suite.metrics[0]}" for split in suite.splits]


def aggregate(suite: Suite, results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> "split/metric" -> `summarize` of the per-seed values of the suite's checkpoint."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for method, runs in results.items():
        table[method] = {}
        for split in suite.splits:
            for metric in suite.columns:
                key = f"{split}/{metric}"
                table[method][key] = summarize([r["metrics"].get(suite.key(key), float("nan")) for r in runs])
    return table
