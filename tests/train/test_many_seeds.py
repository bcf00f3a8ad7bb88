"""Seeds (and a loss option's values) of one config as one vmapped program: each run as if trained alone.

Tolerances. A vmapped step is a different XLA program from a run's own step: convolutions with a
batch of weights become grouped convolutions and matmuls batched ones, whose sums may be
ordered differently, so results agree to rounding, not bit for bit. In float64 with SGD the
final parameters and BatchNorm statistics of every run agree with its separate run to 1e-10
(measured: ~5e-16 after 4 steps); float32 to 2e-5 (measured: ~4e-7; float32's epsilon is 1.2e-7).
SGD, not Adam: Adam divides each update by the gradient's running magnitude, so rounding in a
near-zero gradient component moves that parameter by up to the learning rate (measured 6e-10 in
float64 and 1e-2 in float32 after 6 Adam steps) - a property of Adam, not of the stacking.
Bitwise is asserted where the same program runs: a resumed vmapped group against the run it
continues, and a run that trains alone in both cases. A group's runs read their batches without
grain's read threads (`open_run(read_ahead=False)`), separate runs with them: the agreement of
every metrics row also checks that both read the same batches in the same order.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from saljax import checkpoint, cli, config, experiment, train, writers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "decoy_digits.py")
# Tiny SimpleCNN (BatchNorm) runs of GradMask on 16x16 decoy digits; SGD (see the module docstring).
COMMON = ["batch_size=8", "eval_batch_size=16", "num_devices=1", "progress=False", "num_steps=4", "eval_every=2",
          "log_every=1", "checkpoint.every=2", "optimizer.name='sgd'", "optimizer.learning_rate=0.05",
          "checkpoint.async_save=False", *TINY["decoy_digits"]]
FLOAT64 = ["model.dtype='float64'", "model.kwargs.param_dtype='float64'"]


def _config(data_dir, *overrides):
    return config.load(CONFIG + ":gradmask", [f"dataset.data_dir={str(data_dir)!r}", *COMMON, *FLOAT64, *overrides])


def _state(workdir, step="latest"):
    with jax.enable_x64(True):  # float64 runs load as float64 (float32 ones stay float32)
        model, _ = train.load_model(workdir, step=step)
        return jax.tree.map(np.asarray, nnx.state(model))


def _max_difference(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _without_times(rows):
    return [{k: v for k, v in r.items() if k != "train/images_per_second"} for r in rows]


def _assert_same_run(many, alone, tolerance):
    """Checkpoints, config.json, best step, metrics rows and final state of two work directories agree."""
    with open(os.path.join(many, "config.json")) as f, open(os.path.join(alone, "config.json")) as g:
        assert f.read() == g.read()
    with checkpoint.Checkpointer(many) as a, checkpoint.Checkpointer(alone) as b:
        assert a.steps() == b.steps() and a.best_step() == b.best_step()
    rows, expected = _without_times(writers.read_metrics(many)), _without_times(writers.read_metrics(alone))
    assert [sorted(r) for r in rows] == [sorted(r) for r in expected]
    for row, other in zip(rows, expected, strict=True):
        np.testing.assert_allclose([row[k] for k in sorted(row)], [other[k] for k in sorted(row)], rtol=1e-6, atol=1e-7)
    assert _max_difference(_state(many), _state(alone)) <= tolerance


@pytest.fixture(scope="session")
def float64_runs(tmp_path_factory):
    """Separate runs of (seed 0, lam 10), (seed 1, lam 10) and (seed 0, lam 100), in float64."""
    root = tmp_path_factory.mktemp("many")
    data_dir = root / "data"
    cases = {"s0": [], "s1": ["seed=1"], "s0_lam100": ["loss.lam=100.0"]}
    logged = []
    with jax.enable_x64(True):
        if jax.default_backend() == "cpu":  # form "auto" on CPU: separate runs, saying why
            results = dict(zip(cases, train.train_many([_config(data_dir, *o) for o in cases.values()],
                                                       [root / "alone" / name for name in cases], log=logged.append)))
            assert any(m.startswith("training 3 runs one after another: on CPU, separate runs") for m in logged), logged
        else:
            results = {name: train.train_and_evaluate(_config(data_dir, *o), root / "alone" / name)
                       for name, o in cases.items()}
    return root, data_dir, cases, results


@pytest.mark.slow  # three float64 trainings and a stacked one
@pytest.mark.xdist_group("many_seeds_float64")  # one worker trains `float64_runs` once for all three
@pytest.mark.parametrize("form", ["vmap", "map"])
def test_seeds_in_one_program_equal_their_separate_runs_float64(float64_runs, form):
    root, data_dir, cases, alone = float64_runs
    names = ["s0", "s1"]
    logged = []
    with jax.enable_x64(True):
        results = train.train_many([_config(data_dir, *cases[n]) for n in names], [root / form / n for n in names],
                                   form=form, log=logged.append)
    assert f"training 2 runs as one program ({form}) from step 0" in logged
    for name, result in zip(names, results, strict=True):
        assert result.keys() == alone[name].keys() and result["best/step"] == alone[name]["best/step"]
        _assert_same_run(root / form / name, root / "alone" / name, 1e-10)
    # The seeds really differ: another initialisation and data order.
    assert _max_difference(_state(root / form / "s0"), _state(root / form / "s1")) > 1e-3


@pytest.mark.slow  # three float64 trainings and a vmapped one
@pytest.mark.xdist_group("many_seeds_float64")
def test_a_loss_option_sweep_in_one_program_equals_its_separate_runs_float64(float64_runs):
    root, data_dir, cases, alone = float64_runs
    names = ["s0", "s0_lam100"]
    configs = [_config(data_dir, *cases[n]) for n in names]
    assert train.stacking(configs) == ("lam", "")
    logged = []
    with jax.enable_x64(True):
        results = train.train_many(configs, [root / "sweep" / n for n in names], form="vmap", log=logged.append)
    assert "training 2 runs as one program (vmap) from step 0" in logged
    for name, result in zip(names, results, strict=True):
        np.testing.assert_allclose(result["validation/ce"], alone[name]["validation/ce"], rtol=1e-10)
        _assert_same_run(root / "sweep" / name, root / "alone" / name, 1e-10)
    assert _max_difference(_state(root / "sweep" / "s0"), _state(root / "sweep" / "s0_lam100")) > 1e-6


def test_what_stacks():
    base = config.load(CONFIG + ":gradmask", COMMON)

    def variant(*overrides):
        c = ml_collections.ConfigDict(base.to_dict())
        config.apply_overrides(c, overrides)
        return c

    assert train.stacking([base, variant("seed=1"), variant("seed=2")]) == (None, "")
    assert train.stacking([base, variant("seed=1", "loss.lam=3.0")]) == ("lam", "")
    assert train.stacking([base]) == (None, "a single run")
    assert train.stacking([base, variant("model.kwargs.channels=(4,4,4,4)")])[1] == (
        "the runs differ in model (only seed and one loss option may differ)")
    blurred = variant("loss.mask_blur=1.0")
    assert "several loss options" in train.stacking([blurred, variant("loss.lam=3.0", "loss.mask_blur=2.0")])[1]
    assert "different loss options" in train.stacking([base, variant("loss.mask_blur=1.0")])[1]
    assert "not a number" in train.stacking([base, variant("loss.reduction='sum'")])[1]
    with pytest.raises(ValueError, match="one work directory per run"):
        train.train_many([base, variant("seed=1")], ["a", "./a"])
    with pytest.raises(ValueError, match="2 configs but 1 work directories"):
        train.train_many([base, variant("seed=1")], ["a"])
    with pytest.raises(ValueError, match="form must be one of auto | vmap | map; got 'pmap'"):
        train.train_many([base, variant("seed=1")], ["a", "b"], form="pmap")


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "x"], "--seeds must be an integer >= 1; got 'x'"),
    (["--seeds", "0"], "--seeds must be >= 1; got 0"),
    (["--sweep", "lam=1,2"], "--sweep must be loss.<option>=v1,v2,... (e.g. loss.lam=1,10,100); got 'lam=1,2'"),
    (["--sweep", "loss.lam=1,a"], "--sweep loss.lam takes comma-separated numbers"),
    (["--sweep", "loss.lam="], "--sweep loss.lam takes comma-separated numbers"),
    (["--sweep", "loss.lam=1,1.0"], "--sweep loss.lam lists a value twice"),
])
def test_bad_seeds_and_sweep_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert cli.main(["experiment", "decoy_digits", *argv, "--workdir", str(tmp_path / "w"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w").exists()


def test_a_sweep_of_an_option_no_method_takes_is_an_error(tmp_path):
    path = os.path.join(ROOT, "experiments", "configs", "decoy_digits.py")
    with pytest.raises(ValueError, match=r"no method of \['ce'\] takes loss.lam"):
        experiment.run_suite(path, experiment.load_suite(path), str(tmp_path), seeds=1, methods=["ce"],
                             sweep=experiment.parse_sweep("loss.lam=1,2"))


@pytest.mark.slow
def test_experiment_resumes_a_half_finished_vmapped_group(tmp_path, monkeypatch, capsys):
    """`saljax experiment --seeds 3` stopped after seeds 0 and 1 saved step 2 (seed 2 had not): the rerun
    resumes seeds 0-1 as one program from step 2 and seed 2 from 0, and matches `--no-vmap` (float32)."""
    data = f"dataset.data_dir={str(tmp_path / 'data')!r}"

    def argv(workdir, *extra):
        return ["experiment", "decoy_digits", "--seeds", "3", "--methods", "gradmask", "--workdir", str(workdir),
                "--out", str(tmp_path / "out" / workdir.name), "--no-figures", data, *COMMON, *extra]

    vmapped = ["--vmap-form", "vmap"]  # on CPU, "auto" trains separate runs

    save = checkpoint.Checkpointer.save

    def save_then_stop(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2 and self.directory.endswith("seed1"):
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
    assert cli.main(argv(tmp_path / "vmapped", *vmapped)) == 130
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    runs = tmp_path / "vmapped" / "runs" / "gradmask"
    with checkpoint.Checkpointer(runs / "seed0") as a, checkpoint.Checkpointer(runs / "seed2") as c:
        assert a.steps() == [2] and c.steps() == []
    capsys.readouterr()
    assert cli.main(argv(tmp_path / "vmapped", *vmapped)) == 0
    out = capsys.readouterr().out
    assert "training 2 runs as one program (vmap) from step 2" in out and "[3/3] gradmask seed 2" in out
    assert cli.main(argv(tmp_path / "alone", "--no-vmap")) == 0
    assert "separate runs" not in capsys.readouterr().out  # --no-vmap: no reason to give
    alone = tmp_path / "alone" / "runs" / "gradmask"
    for seed in range(3):
        # Seed 2 trained alone in both: the same program, bit for bit.
        assert _max_difference(_state(runs / f"seed{seed}"), _state(alone / f"seed{seed}")) <= (0.0 if seed == 2 else 2e-5)
    with open(tmp_path / "out" / "vmapped" / "decoy_digits.json") as f:
        report = json.load(f)
    assert [r["seed"] for r in report["runs"]["gradmask"]] == [0, 1, 2]
    # A finished group is not trained again.
    assert cli.main(argv(tmp_path / "vmapped", *vmapped)) == 0
    assert capsys.readouterr().out.count("done earlier") == 3
