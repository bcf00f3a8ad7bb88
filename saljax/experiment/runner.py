"""Finding a suite, training every method over seeds (resumable, cached per run), aggregating."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from saljax import config as config_lib
from saljax import train
from saljax import workdir as workdir_lib
from saljax.experiment.explained import explain_run, map_metric_names
from saljax.experiment.stats import summarize
from saljax.experiment.suite import Suite

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
    methods = check_selection(suite, methods, seeds)
    map_metric_names(suite)  # a misspelt map metric fails before any training
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    total = len(methods) * seeds
    done = 0
    for seed in range(seeds):  # seed-major: a stopped suite has every method at the first seeds
        for method in methods:
            done += 1
            cfg = config_lib.load(f"{config_path}:{method}", [*overrides, f"seed={seed}", "progress=False"])
            path = run_dir(workdir, method, seed)
            previous = _read_result(path)
            if previous is not None and not workdir_lib.config_changes(previous["config"], cfg):
                missing = [c for split in suite.splits for c in suite.map_metrics
                           if suite.key(f"{split}/{c}") not in previous["metrics"]]
                if missing:  # a map metric added to the suite since: explain the trained run, train nothing
                    previous["metrics"] |= explain_run(suite, path, suite.splits)
                    _write_result(path, previous)
                results[method].append(previous)
                log(f"[{done}/{total}] {method} seed {seed}: done earlier")
                continue
            _check_no_other_run(path, cfg)
            start = time.perf_counter()
            metrics = train.train_and_evaluate(cfg, path, log=lambda _: None)
            metrics |= explain_run(suite, path, suite.splits)
            result = {"seed": seed, "metrics": metrics, "wall_s": time.perf_counter() - start,
                      "config": json.loads(cfg.to_json())}
            _write_result(path, result)
            results[method].append(result)
            shown = ", ".join(f"{k} {metrics[suite.key(k)]:.3f}" for k in _headline(suite) if suite.key(k) in metrics)
            log(f"[{done}/{total}] {method} seed {seed}: {result['wall_s']:.0f} s, {shown}")
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
