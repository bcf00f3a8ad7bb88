"""Experiment suites: statistics, the results pages (committed ones included) and a CLI smoke run."""

import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import TINY

from saljax import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "experiments", "results")
SUITES = ("decoy_digits", "synthetic_distractor", "spurious_binary", "decoy_mnist", "red_herring_cpu")


def test_summarize_mean_std_and_t_interval():
    s = experiment.summarize([1.0, 2.0, 3.0, float("nan")])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0
    half = 4.302652729749464 / math.sqrt(3)  # t_{0.975, 2} * std / sqrt(n)
    np.testing.assert_allclose([s["ci_low"], s["ci_high"]], [2.0 - half, 2.0 + half], rtol=1e-9)
    one = experiment.summarize([0.5])
    assert one["std"] == 0.0 and math.isnan(one["ci_low"])
    assert experiment.summarize([])["n"] == 0
    # The interval's quantile is scipy.stats' Student t quantile at every sample size.
    for n in (2, 5, 10, 30):
        s = experiment.summarize(list(range(n)))
        half = scipy.stats.t.ppf(0.975, n - 1) * s["std"] / math.sqrt(n)
        np.testing.assert_allclose(s["ci_high"] - s["mean"], half, rtol=1e-12)


def test_cells_round_trip():
    stats = experiment.summarize([0.91, 0.93, 0.95])
    parsed = experiment.parse_cell(experiment.format_cell(stats))
    for key in ("mean", "std", "ci_low", "ci_high"):
        assert abs(parsed[key] - stats[key]) <= 5e-4 + 1e-9
    assert experiment.parse_cell(experiment.format_cell(experiment.summarize([]))) == {"n": 0}


def test_every_suite_config_defines_its_methods_and_targets():
    for name in SUITES:
        suite = experiment.load_suite(experiment.find_config(os.path.join(ROOT, "experiments", "configs", f"{name}.py")))
        assert suite.name == name and suite.splits[0] == "validation"
        # The CAM methods need a GAP head: the MLP and ResNet benchmarks of the papers run the gradient ones.
        cam = {"cyborg", "cyborg_pred", "gradmask_midl"} if name in ("decoy_digits", "synthetic_distractor", "spurious_binary") else set()
        assert {"ce", "gradmask", "rrr"} | cam <= set(suite.methods)
        assert suite.targets
    binary = experiment.load_suite(os.path.join(ROOT, "experiments", "configs", "spurious_binary.py"))
    assert {"dd_difference", "dd_paired", "dd_divergence"} <= set(binary.methods)
    assert {"test_closed", "test_open"} <= set(binary.splits)


def _check_page(md_path, min_seeds):
    """The page parses, its cells are the statistics of the runs in the JSON beside it."""
    with open(md_path) as f:
        text = f.read()
    with open(md_path[:-3] + ".json") as f:
        report = json.load(f)
    assert f"Made by `{report['command']}`" in text and report["command"].startswith("saljax experiment ")
    assert len(report["provenance"]["commit"]) == 40
    tables = experiment.parse_markdown_tables(text)
    splits = {k.split("/")[0] for row in report["table"].values() for k in row}
    assert set(tables) == splits
    for split, rows in tables.items():
        assert set(rows) == set(report["runs"])
        for method, cells in rows.items():
            runs = report["runs"][method]
            assert len(runs) >= min_seeds and sorted(r["seed"] for r in runs) == list(range(len(runs)))
            for metric, cell in cells.items():
                prefix = "best/" if report.get("checkpoint") == "best" else ""
                values = [r["metrics"][f"{prefix}{split}/{metric}"] for r in runs]
                parsed = experiment.parse_cell(cell)
                if parsed == {"n": 0}:
                    assert not any(math.isfinite(v) for v in values)
                    continue
                assert abs(parsed["mean"] - np.nanmean(values)) <= 5e-4 + 1e-9, (md_path, split, method, metric)
    for figure in report["figures"]:
        assert os.path.isfile(os.path.join(os.path.dirname(md_path), figure)), figure
    return report


def test_committed_result_tables_parse_and_match_their_runs():
    pages = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(RESULTS, "*.md"))}
    assert set(SUITES) <= set(pages), f"missing results pages in {RESULTS}: {set(SUITES) - set(pages)}"
    for name in SUITES:
        report = _check_page(pages[name], min_seeds=5)
        assert report["suite"] == name


def _suite(name):
    return experiment.load_suite(experiment.find_config(os.path.join(ROOT, "experiments", "configs", f"{name}.py")))


@pytest.fixture(scope="session")
def suite_data_dirs(tmp_path_factory) -> dict[str, str]:
    """One tiny built dataset per suite and test worker, shared by that suite's cases."""
    root = tmp_path_factory.mktemp("suite-data")
    return {name: str(root / name) for name in TINY}


def _cli_cases() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(end to end, traced): every method runs through the CLI end to end in the first suite that has it, and
    every suite at least its first method (which also draws the figures); in the other suites a method's
    train step is traced on the suite's data (compiling the same loss once more per suite would dominate
    the test run, and the suite's protocol is already exercised end to end)."""
    seen: set[str] = set()
    full, traced = [], []
    for name in TINY:
        for i, method in enumerate(_suite(name).methods):
            (full if i == 0 or method not in seen else traced).append((name, method))
            seen.add(method)
    return full, traced


# One case per (suite, method), so the cases spread over the test workers.
CLI_CASES, TRACED_CASES = _cli_cases()


@pytest.mark.slow
@pytest.mark.parametrize("suite,method", CLI_CASES)
def test_every_method_runs_through_the_cli(suite, method, tmp_path, suite_data_dirs, capsys):
    from saljax import cli

    # In-process: a subprocess per case would pay the imports again each time.
    out = tmp_path / "out"
    figures = method == _suite(suite).methods[0]
    argv = ["experiment", suite, *(["-v"] if figures else []), "--seeds", "1", "--methods", method, "--workdir", str(tmp_path / "runs"),
            "--out", str(out), *([] if figures else ["--no-figures"]),
            f"dataset.data_dir={suite_data_dirs[suite]!r}", "num_steps=3", "eval_every=3", "log_every=1",
            "batch_size=8", "eval_batch_size=16", "num_devices=1", *TINY[suite]]
    cache = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    code = cli.main(argv)
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    # The caller's compilation cache (here the test session's, tests/conftest.py) is kept with its settings.
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == cache
    report = _check_page(str(out / f"{suite}.md"), min_seeds=1)
    assert list(report["runs"]) == [method]
    metrics = report["runs"][method][0]["metrics"]
    suite_ = _suite(suite)
    # Map metrics may be undefined (NaN): WR on a clean reference, whose images have no region to avoid.
    defined = {k: v for k, v in metrics.items() if not any(k.endswith("/" + c) for c in suite_.map_metrics)}
    assert defined and all(math.isfinite(v) for v in defined.values()), metrics
    for split in suite_.splits:
        for column in suite_.columns:
            assert suite_.key(f"{split}/{column}") in metrics, (split, column)
    assert len(report["figures"]) == (3 if figures else 0)
    assert "| method |" in printed.out  # the table is printed
    # With -v, each evaluation is shown as the runs go (a vmapped group prints nothing else until it ends).
    assert ("evaluation of checkpoint 3" in printed.err) == figures, printed.err[-3000:]


@pytest.mark.parametrize("suite,method", TRACED_CASES)
def test_every_method_traces_on_every_suite(suite, method, suite_data_dirs, tmp_path):
    """The run config of `method` in `suite` (tiny data): checked and built as training does, its train step traced."""
    from saljax import config as config_lib
    from saljax import train
    from saljax.train import loop

    path = experiment.find_config(os.path.join(ROOT, "experiments", "configs", f"{suite}.py"))
    cfg = config_lib.load(f"{path}:{method}", [f"dataset.data_dir={suite_data_dirs[suite]!r}", "num_devices=1",
                                               *TINY[suite]])
    _, mesh, builder = loop.prepare([cfg], [tmp_path / "run"])  # checks, builds the data, fills in the model
    model_def, state = train.init_from_config(cfg)
    loss = train.make_loss(cfg)
    step = train.make_train_step(model_def, loss, train.make_optimizer(cfg.optimizer, num_steps=cfg.num_steps),
                                 mesh=mesh, key=jax.random.key(cfg.seed), jit=False)
    b, (h, w, c) = 4, builder.info.features["image"].shape
    batch = {"image": jax.ShapeDtypeStruct((b, h, w, c), jnp.float32), "label": jax.ShapeDtypeStruct((b,), jnp.int32),
             "saliency_map": jax.ShapeDtypeStruct((b, h, w), jnp.float32), "has_map": jax.ShapeDtypeStruct((b,), jnp.bool_)}
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert {f"loss/{t.name}" for t in loss.terms} <= set(metrics)
