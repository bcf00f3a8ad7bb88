"""saljax's reliability guarantees, as one table-driven battery of bad input and injected faults.

Every case asserts the exact exception type or exit code, a fragment of the one-line message, and
that nothing was lost or left half-written: no work directory, data or config.json after a refused
config, the previous file after an interrupted rewrite, the previous dataset after a failed
rebuild, no stray temporary files. Groups:

- library API: configs, batches, losses, saliency targets, checkpointer, suites;
- the folder CSV (`saliency_folder`): leakage between splits, labels and rows, bad bytes, bad rows;
- the commands `saljax train`, `explain`, `experiment`, run in-process through `cli.main`;
- faults: interrupted rewrites, failed rebuilds, corrupt newest/best checkpoints, NaN, kill during save.

One tiny dataset and one trained work directory per module are shared by the cases that need them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import TINY, conv_classifier, make_batch, make_conv_params
from flax import nnx
from PIL import Image

import saljax.data as sd
from saljax import _figures, checkpoint, cli, config, experiment, losses, saliency, train, workdir, writers
from saljax import batch as batch_lib
from saljax.data import catalog
from saljax.experiment import runner
from saljax.explain import report as report_module
from saljax.train import loop

tfds.disable_progress_bar()

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
DIGITS = str(CONFIGS / "decoy_digits.py")
TIE = "checkpoint.best_metric='validation/count'"  # the same at every evaluation: every checkpoint ties


# --- shared helpers -------------------------------------------------------------------------------------


def _overrides(data_dir, *extra) -> list[str]:
    return [f"dataset.data_dir={str(data_dir)!r}", "batch_size=8", "eval_batch_size=16", "num_devices=1",
            "progress=False", *TINY["decoy_digits"], *extra]


def _config(data_dir, *extra, method="ce"):
    return config.load(f"{DIGITS}:{method}", _overrides(data_dir, "eval_every=2", "checkpoint.every=2",
                                                        "checkpoint.keep_best=1", "checkpoint.keep_latest=1", *extra))


def _strays(root) -> list[str]:
    """Temporary files and directories a complete write or build never leaves behind."""
    marks = (".tmp", "orbax-checkpoint-tmp", ".saljax-probe-", "-rebuild-", ".replaced-")
    return sorted(str(p) for p in Path(root).rglob("*") if any(m in p.name for m in marks))


def _snapshot(root) -> dict[str, str]:
    """relative path -> content hash of every file under `root`."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _corrupt(directory) -> None:
    """Overwrites every file under `directory` with random bytes of the same length."""
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.write(os.urandom(max(os.path.getsize(path), 1)))


def _cli(capsys, argv) -> tuple[int, str]:
    """(exit code, stderr) of `saljax *argv`, in-process; argparse's usage errors arrive as SystemExit."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _refused(capsys, argv, code, message) -> str:
    """Runs the command; asserts the exit code and one line on stderr naming `message`, no traceback."""
    got, err = _cli(capsys, argv)
    assert got == code, err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The tiny decoy_digits dataset, built by the first case that trains."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """A 4-step run: checkpoints 2 (the best: every step ties) and 4 (the latest). Copy it before changing it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    results = train.train_and_evaluate(_config(data_dir, "num_steps=4", TIE), run)
    with checkpoint.Checkpointer(run, best_metric="validation/count") as ck:
        assert ck.steps() == [2, 4] and ck.best_step() == 2
    return run, results


def _copy(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    return run


# --- library API ----------------------------------------------------------------------------------------


def _batch(**change):
    batch = {k: np.asarray(v) for k, v in make_batch(jax.random.key(1), h=6, w=6).items()}
    return {**batch, **change}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _checkpointer_with_one(tmp: Path):
    ck = checkpoint.Checkpointer(tmp, async_save=False)
    ck.save(1, {"w": np.ones(2)})
    ck.wait()
    return ck


def _three_class_dd(method):
    def call(_):
        three = make_conv_params(jax.random.key(0), num_classes=3)
        losses.for_method(method)(conv_classifier(three), make_batch(jax.random.key(1), num_classes=3))
    return call


def _no_map_cyborg(_):
    batch = {k: v for k, v in make_batch(jax.random.key(1)).items() if k != "saliency_map"}
    losses.for_method("cyborg")(conv_classifier(make_conv_params(jax.random.key(0))), batch)


def _cam_head(a):
    return jnp.mean(a, axis=(1, 2))[:, :2]


def _cam_features(x):
    return jnp.concatenate([x, x], axis=-1)


_SUITE = str(CONFIGS / "decoy_digits.py")


def _other_config_in_run_dir(tmp):
    other = config.load(f"{_SUITE}:ce", ["seed=0", "progress=False", "num_steps=7"])
    checkpoint.save_config(experiment.run_dir(str(tmp), "ce", 0), other)
    experiment.run_suite(_SUITE, experiment.load_suite(_SUITE), str(tmp), seeds=1, methods=["ce"])


# (id, call(tmp_path), exception type, regex of the message)
LIBRARY_CASES = [
    ("config-unknown-field", lambda t: config.load(DIGITS, ["optimizer.lr=1"]), ValueError,
     "unknown config field 'optimizer.lr'"),
    ("config-override-without-value", lambda t: config.load(DIGITS, ["num_steps"]), ValueError,
     "must have the form key=value"),
    ("config-override-wrong-type", lambda t: config.load(DIGITS, ["num_steps=abc"]), ValueError, "override 'num_steps=abc'"),
    ("config-file-missing", lambda t: config.load(str(t / "missing.py")), FileNotFoundError, "missing.py does not exist"),
    ("load-model-no-directory", lambda t: train.load_model(t / "nowhere"), workdir.CheckpointError, "does not exist"),
    ("load-config-truncated-json", lambda t: workdir.load_config(_write(t / "config.json", '{"method": "ce", ').parent),
     checkpoint.CheckpointError, r"config.json is corrupt or unreadable \(JSONDecodeError"),
    ("load-model-config-not-an-object", lambda t: train.load_model(_write(t / "config.json", "[1, 2]").parent),
     checkpoint.CheckpointError, "expected a JSON object, got list"),
    ("workdir-is-a-file", lambda t: workdir.check_writable(_write(t / "file", "x")), workdir.CheckpointError,
     "is a file, not a directory"),
    ("batch-empty", lambda t: batch_lib.validate_batch({"image": np.zeros((0, 4, 4, 1), np.float32),
                                                         "label": np.zeros((0,), np.int32)}),
     ValueError, "it holds no samples"),
    ("batch-negative-label-without-num-classes",
     lambda t: batch_lib.validate_batch({"image": np.zeros((2, 4, 4, 1), np.float32), "label": np.array([0, -1])}),
     ValueError, r"batch\['label'\] must be >= 0; samples \[1\] have labels \[-1\]"),
    ("batch-map-outside-0-1", lambda t: batch_lib.validate_batch(_batch(saliency_map=np.full((4, 6, 6), 1.5, np.float32)), 2),
     ValueError, r"batch\['saliency_map'\] must hold finite values in \[0, 1\]; samples \[0, 1, 2, 3\]"),
    ("batch-label-outside-classes", lambda t: batch_lib.validate_batch(_batch(label=np.array([0, 1, 2, 1])), num_classes=2),
     ValueError, r"batch\['label'\] must lie in \[0, 2\); samples \[2\] have labels \[2\]"),
    ("batch-nan-image", lambda t: batch_lib.validate_batch(
        _batch(image=np.where(np.arange(4)[:, None, None, None] == 1, np.nan, np.zeros((4, 6, 6, 1)))), 2),
     ValueError, r"batch\['image'\] holds NaN or inf values \(samples \[1\]\)"),
    ("batch-has-map-not-0-1", lambda t: batch_lib.validate_batch(_batch(has_map=np.array([0, 2, 1, 1])), 2),
     ValueError, r"batch\['has_map'\] must hold 0/1"),
    ("batch-two-problems-one-line", lambda t: batch_lib.validate_batch(
        _batch(label=np.array([0, 1, 5, 1]), has_map=np.array([0, 2, 1, 1])), 2),
     ValueError, r"must lie in \[0, 2\).*; batch\['has_map'\] must hold 0/1"),
    ("cam-class-out-of-range", lambda t: saliency.cam(_cam_features, _cam_head, jnp.ones((2, 4, 4, 1)), 3), ValueError,
     r"target class indices must lie in \[0, 2\) for 2 classes; got \[3\]"),
    ("gradient-class-negative",
     lambda t: saliency.vanilla_gradient(lambda v: _cam_head(_cam_features(v)), jnp.ones((2, 4, 4, 1)), jnp.array([0, -1])),
     ValueError, r"must lie in \[0, 2\)"),
    ("loss-missing-map", _no_map_cyborg, ValueError, "batch has no 'saliency_map' entry"),
    *[(f"loss-{m}-needs-two-classes", _three_class_dd(m), ValueError,
       rf"{m} needs a binary head: logits of shape \(B, 2\); got \(4, 3\)")
      for m in ("dd_difference", "dd_paired", "dd_divergence")],
    ("loss-gradmask-variant", lambda t: losses.gradmask(variant="v2"), ValueError, "variant must be one of"),
    ("loss-gradmask-norm", lambda t: losses.gradmask(norm="l3"), ValueError, "norm must be one of"),
    ("loss-cyborg-cam-class", lambda t: losses.cyborg(cam_class="false"), ValueError, "cam_class must be one of"),
    ("loss-dd-delta", lambda t: losses.dd_divergence(delta=2.0), ValueError, "delta must lie in"),
    ("loss-unknown-method", lambda t: losses.for_method("gradcam"), ValueError, "method must be one of"),
    ("loss-negative-lam", lambda t: losses.for_method("gradmask", lam=-1.0), ValueError,
     "lam must be a finite number >= 0; got -1.0"),
    ("loss-nan-lam", lambda t: losses.for_method("rrr", lam=float("nan")), ValueError, "lam must be a finite number >= 0"),
    ("loss-alpha-outside-0-1", lambda t: losses.for_method("cyborg", alpha=1.5), ValueError, r"alpha must lie in \[0, 1\]"),
    ("loss-two-terms-same-name",
     lambda t: losses.combine(losses.cross_entropy(), losses.cross_entropy())(
         conv_classifier(make_conv_params(jax.random.key(0))), make_batch(jax.random.key(1))),
     ValueError, "two terms are named 'ce'"),
    ("loss-combine-takes-terms", lambda t: losses.combine(losses.cross_entropy), TypeError, "combine takes Terms"),
    ("checkpointer-best-mode", lambda t: checkpoint.Checkpointer(t, best_mode="up"), ValueError, "best_mode must be 'max' or 'min'"),
    ("checkpointer-nan-state", lambda t: _checkpointer_with_one(t).save(2, {"w": np.array([1.0, np.nan])}),
     checkpoint.NonFiniteError, r"not saving checkpoint 2: non-finite values in \['w'\]"),
    ("checkpointer-nan-metric",
     lambda t: _checkpointer_with_one(t).save(2, {"w": np.ones(2)}, metrics={"validation/accuracy": float("nan")}),
     checkpoint.NonFiniteError, "validation/accuracy = nan"),
    ("checkpointer-missing-step", lambda t: _checkpointer_with_one(t).restore({"w": np.zeros(2)}, step=7),
     checkpoint.CheckpointError, r"no checkpoint for step 7 .*available: \[1\]"),
    ("nan-stop-names-the-first-term",
     lambda t: loop._check_finite(7, {"finite": False, "loss": np.nan, "loss/ce": 0.5, "loss/gradmask": np.inf,
                                      "grad_norm": np.nan}),
     workdir.NonFiniteError, r"step 7 \(the first such step\): non-finite term\(s\) loss/gradmask = inf; finite: loss/ce = 0.5"),
    ("nan-stop-gradient-norm",
     lambda t: loop._check_finite(3, {"finite": False, "loss": 1.0, "loss/ce": 1.0, "grad_norm": np.nan}),
     workdir.NonFiniteError, r"gradient norm = nan \(every loss term finite\)"),
    ("suite-unknown", lambda t: experiment.find_config("nope"), FileNotFoundError, "no suite named 'nope'"),
    ("suite-file-without-get-suite",
     lambda t: experiment.load_suite(str(_write(t / "single.py", "def get_config(arg=None):\n    return None\n"))),
     ValueError, "has no get_suite"),
    ("suite-unknown-method",
     lambda t: experiment.run_suite(_SUITE, experiment.load_suite(_SUITE), str(t), seeds=1, methods=["dd_paired"]),
     ValueError, r"--methods \['dd_paired'\] not in suite 'decoy_digits'"),
    ("suite-zero-seeds", lambda t: experiment.run_suite(_SUITE, experiment.load_suite(_SUITE), str(t), seeds=0),
     ValueError, "--seeds must be >= 1; got 0"),
    ("suite-run-of-another-config", _other_config_in_run_dir, ValueError,
     r"seed0 holds a run of another config \(differing fields: num_steps\)"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_library_refuses_bad_input_in_one_line(tmp_path, call, error, message):
    with pytest.raises(error, match=message) as info:
        call(tmp_path)
    assert type(info.value) is error or error is ValueError, type(info.value)
    assert "\n" not in str(info.value), str(info.value)
    assert not _strays(tmp_path)


SHAPE_CASES = [
    ({"saliency_map": jnp.ones((4, 6, 6, 1))}, r"batch\['saliency_map'\] must have shape \(B, H, W\)"),
    ({"saliency_map": jnp.ones((4, 5, 6))}, r"batch\['saliency_map'\] must have shape \(4, 6, 6\)"),
    ({"saliency_map": jnp.ones((3, 6, 6))}, r"batch\['saliency_map'\] has 3 maps but batch\['image'\] has 4"),
    ({"label": jnp.zeros((3,), jnp.int32)}, r"batch\['label'\] must have shape \(B,\) = \(4,\)"),
    ({"label": jnp.zeros((4,), jnp.float32)}, r"batch\['label'\] must hold integer class indices"),
    ({"has_map": jnp.ones((5,))}, r"batch\['has_map'\] must have shape \(B,\) = \(4,\)"),
    ({"image": jnp.ones((4, 6, 6))}, r"batch\['image'\] must have shape \(B, H, W, C\)"),
]


@pytest.mark.parametrize("change, message", SHAPE_CASES, ids=[f"shape-{i}" for i in range(len(SHAPE_CASES))])
def test_loss_shape_errors_name_the_key_before_tracing(change, message):
    params = make_conv_params(jax.random.key(0))
    batch = {**make_batch(jax.random.key(1), h=6, w=6), **change}
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda p, b: losses.for_method("gradmask")(conv_classifier(p), b))(params, batch)


def test_valid_input_passes_the_same_checks():
    batch = make_batch(jax.random.key(1))
    losses.for_method("ce")(conv_classifier(make_conv_params(jax.random.key(0))),
                            {k: v for k, v in batch.items() if k != "saliency_map"})
    batch_lib.validate_batch(_batch(), num_classes=2)
    assert losses.for_method("gradmask", lam=0.0) is not None  # no penalty is a valid weight
    loop._check_finite(3, {"finite": True, "loss": 1.0, "grad_norm": 1.0})


# --- the folder CSV --------------------------------------------------------------------------------------


def _png(path: Path, height: int, width: int, value: int, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width) if mode == "L" else (height, width, 3)
    Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path)


def _images(n: int = 2, size: tuple[int, int] = (12, 12)) -> dict[str, tuple[int, int, int]]:
    """name -> (height, width, value): flat images, each with its own content."""
    return {f"img/{i}.png": (*size, 20 + 10 * i) for i in range(n)}


def _folder(root: Path, csv: str | bytes | list[str], images: dict[str, tuple[int, int, int]] | None = None) -> Path:
    """Writes `images` and saliency.csv: rows under the header image,label,map,group,split, or raw content."""
    for name, (height, width, value) in (images or {}).items():
        _png(root / name, height, width, value)
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(csv, list):
        csv = "\n".join(["image,label,map,group,split", *csv]) + "\n"
    (root / "saliency.csv").write_bytes(csv if isinstance(csv, bytes) else csv.encode())
    return root


def _build(folder: Path, data_dir: Path, **kwargs):
    return sd.build("saliency_folder", data_dir, manual_dir=folder, **kwargs)


_COPY = {**_images(2), "img/copy.png": _images(2)["img/0.png"]}  # the same bytes under another path
_AB = {"class_names": ("a", "b")}
_UTF8 = "image,label,map,group,split\nimg/0.png,a,,,\nimg/1.png,b\xe9,,,\n".encode("latin-1")

# (id, csv, images, build options, message fragments)
FOLDER_CASES = [
    ("same-path-in-two-splits", ["img/0.png,a,,,train", "img/1.png,b,,,train", "img/0.png,a,,,test"], _COPY, _AB,
     ["row 4:", "split 'test' but row 2 puts this image in split 'train'", "data leakage"]),
    ("same-content-in-two-splits", ["img/0.png,a,,,train", "img/1.png,b,,,train", "img/copy.png,a,,,test"], _COPY, _AB,
     ["row 4:", "copy.png", "the same image content as", "0.png", "data leakage"]),
    ("one-image-two-labels", ["img/0.png,a,,,train", "img/1.png,b,,,train", "img/0.png,b,,,train"], _COPY, _AB,
     ["row 4:", "label 'b' but row 2 lists this image with label 'a'", "one label per image"]),
    ("same-content-two-labels", ["img/0.png,a,,,train", "img/1.png,b,,,train", "img/copy.png,b,,,"], _COPY, _AB,
     ["row 4:", "the same image content as", "one label per image"]),
    ("row-repeated-with-other-group", ["img/0.png,a,,1,train", "img/1.png,b,,,train", "img/0.png,a,,2,train"], _COPY, _AB,
     ["row 4:", "listed again (first at row 2) with a different map or group"]),
    ("non-utf8-byte", _UTF8, _images(2), {}, ["row 3: ", "saliency.csv: byte 0xe9 at character 12 is not UTF-8"]),
    ("one-class-only", ["img/0.png,cat,,,", "img/1.png,cat,,,"], _images(2), {}, ["expected at least two classes"]),
    ("mixed-sizes-without-image-size", [f"img/{i}.png,{'ab'[i % 2]},,," for i in range(4)],
     {"img/0.png": (10, 10, 1), "img/1.png": (40, 40, 2), "img/2.png": (10, 10, 3), "img/3.png": (12, 12, 4)}, {},
     ["3 different sizes", "row 2: 10x10", "row 3: 40x40", "set image_size"]),
    ("empty-csv", "", _images(1), _AB, ["problem", "the CSV is empty"]),
    ("header-only", "image,label,map\n", _images(1), _AB, ["problem", "no data rows"]),
    ("no-label-column", "image,map\nimg/0.png,\n", _images(1), _AB, ["problem", "missing required column(s) label"]),
    ("no-image-and-label-columns", "path,class\nimg/0.png,a\n", _images(1), _AB,
     ["problem", "missing required column(s) image, label"]),
]


@pytest.mark.parametrize("csv, images, options, needles", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_folder_csv_refuses_leakage_and_bad_rows(tmp_path, csv, images, options, needles):
    folder = _folder(tmp_path / "f", csv, images)
    with pytest.raises(sd.FolderDatasetError) as info:
        _build(folder, tmp_path / "data", **options)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "data").exists()


def test_folder_every_bad_row_is_listed_and_nothing_is_written(tmp_path):
    images = {f"img/{c}.png": (12, 12, 20 + i) for i, c in enumerate("abcdef")}
    folder = _folder(tmp_path / "f", [], images)
    (folder / "img" / "broken.png").write_bytes(b"not a png at all")
    _png(folder / "maps" / "a.png", 12, 12, 255)
    _png(folder / "maps" / "wide.png", 10, 40, 255)  # a.png is 12x12: another aspect ratio
    _folder(folder, [
        "img/a.png,cat,maps/a.png,0,train",  # row 2: fine
        "img/missing.png,cat,,0,train",  # row 3
        "img/broken.png,dog,,0,train",  # row 4
        "img/b.png,bird,,0,train",  # row 5
        "img/a.png,dog,maps/wide.png,0,train",  # row 6
        "img/c.png,cat,maps/nowhere.png,0,train",  # row 7
        "img/d.png,dog,,-3,train",  # row 8
        "img/e.png,cat,,0,tr ain",  # row 9
        "img/f.png,dog,,0,train",  # row 10: fine
    ])
    with pytest.raises(sd.FolderDatasetError) as info:
        _build(folder, tmp_path / "data", class_names=("cat", "dog"), image_size=8)
    assert isinstance(info.value, ValueError) and [p.row for p in info.value.problems] == [3, 4, 5, 6, 7, 8, 9]
    message = str(info.value)
    for row, needle in [(3, "missing.png: image file not found"), (4, "broken.png: image file unreadable"),
                        (5, "label 'bird' is not one of the declared class_names"), (6, "wide.png: map is 40x10"),
                        (7, "nowhere.png: map file not found"), (8, "group '-3'"), (9, "split 'tr ain'")]:
        assert f"row {row}: " in message and needle in message, needle
    assert "row 2:" not in message and "row 10:" not in message
    assert not (tmp_path / "data").exists()


def test_folder_missing_csv_or_manual_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other.txt").write_text("x")
    with pytest.raises(sd.FolderDatasetError, match="CSV file not found"):
        _build(empty, tmp_path / "data", class_names=("a", "b"), image_size=8)
    with pytest.raises(sd.FolderDatasetError, match="needs a manual_dir"):
        sd.build("saliency_folder", tmp_path / "data", class_names=("a", "b"), image_size=8)
    assert not (tmp_path / "data").exists()


def test_folder_exact_duplicate_rows_are_dropped_with_a_warning(tmp_path, caplog):
    rows = ["img/0.png,a,,,", "img/1.png,b,,,train", "img/0.png,a,,,train", "img/0.png,a,,,train"]
    folder = _folder(tmp_path / "f", rows, _images(2))
    with caplog.at_level(logging.WARNING, logger="saljax.data"):
        builder = _build(folder, tmp_path / "data", test_fraction=1.0)  # row 2 takes row 4's explicit split
    assert list(builder.info.splits) == ["train"] and builder.info.splits["train"].num_examples == 2
    assert "2 duplicate row(s) dropped (rows 4, 5)" in caplog.text


def test_folder_random_split_keeps_copies_of_an_image_together(tmp_path):
    images = _images(8)
    rows = [f"img/{i}.png,{'ab'[i % 2]},,," for i in range(8)]
    for i in range(8):  # every image twice, under another path, split left blank
        images[f"dup/{i}.png"] = images[f"img/{i}.png"]
        rows.append(f"dup/{i}.png,{'ab'[i % 2]},,,")
    builder = _build(_folder(tmp_path / "f", rows, images), tmp_path / "data", test_fraction=0.5)
    seen: dict[bytes, set[str]] = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split)
        for i in range(len(source)):
            seen.setdefault(source[i]["image"].tobytes(), set()).add(split)
    assert len(seen) == 8 and all(len(splits) == 1 for splits in seen.values())
    assert {s for splits in seen.values() for s in splits} == {"train", "test"}


# --- the commands ---------------------------------------------------------------------------------------


def _train_argv(tmp_path, *overrides, config_spec=f"{DIGITS}:gradmask", run=None):
    return ["train", "--config", config_spec, "--workdir", str(run or tmp_path / "run"),
            *_overrides(tmp_path / "data", *overrides)]


TRAIN_CONFIG_CASES = [
    ("method='nope'", "method must be one of"),
    ("eval_every=0", "eval_every must be an integer >= 1; got 0"),
    ("log_every=0", "log_every must be an integer >= 1; got 0"),
    ("batch_size=0", "batch_size must be an integer >= 1; got 0"),
    ("num_steps=0", "num_steps must be an integer >= 1; got 0"),
    ("num_steps=-3", "num_steps must be an integer >= 1; got -3"),
    ("checkpoint.keep_best=-1", "checkpoint.keep_best must be an integer >= 0; got -1"),
    ("checkpoint.best_mode='up'", "checkpoint.best_mode must be max | min; got 'up'"),
    ("checkpoint.best_metric='train/accuracy'", "checkpoint.best_metric must be <split>/<metric>"),
    ("model.name='vgg'", "model.name must be one of mlp | resnet18 | resnet50 | simple_cnn | xil_cnn"),
    ("model.dtype='int8'", "model.dtype must name a floating dtype (float32, bfloat16, ...); got 'int8'"),
    ("model.kwargs.widht=3", "model.kwargs ['widht'] are not arguments of model 'simple_cnn'"),
    ("model.kwargs.in_channels=3", "model.kwargs ['in_channels'] are set by saljax"),
    ("dataset.name='mnist'", "dataset.name must be one of decoy_digits"),
    ("dataset.eval_splits=()", "dataset.eval_splits must name at least one split"),
    ("dataset.overrides.image_sise=8", "image_sise"),
    ("optimizer.name='adamx'", "optimizer.name must be one of adam | adamw | sgd | lamb | lars"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate must be a non-negative float; got -1.0"),
    ("optimizer.lr=1", "unknown config field 'optimizer.lr'"),
    ("num_steps=abc", "override 'num_steps=abc'"),
    ("loss.lamm=3.0", "lamm"),
    ("loss.variant='v2'", "variant must be one of ('default', 'midl'); got 'v2'"),
    ("loss.lam=-1", "lam must be a finite number >= 0; got -1"),
]


@pytest.mark.parametrize("override, message", TRAIN_CONFIG_CASES, ids=[c[0] for c in TRAIN_CONFIG_CASES])
def test_train_refuses_a_bad_config_before_writing_anything(tmp_path, capsys, override, message):
    err = _refused(capsys, _train_argv(tmp_path, override), 2, message)
    assert err.startswith("saljax train: ")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def _locked(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere but in /sys
        if not os.path.isdir("/sys") or os.access("/sys/saljax-test", os.F_OK):
            pytest.skip("root writes anywhere here")
        return Path("/sys/saljax-test/run")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "run"


def _config_file(tmp_path, text):
    return _write(tmp_path / "bad.py", text)


# (id, argv(tmp_path), exit code, message)
COMMAND_CASES = [
    ("train-workdir-is-a-file", lambda t: _train_argv(t, run=_write(t / "file", "x")), 2, "is a file, not a directory"),
    ("train-workdir-under-a-file", lambda t: _train_argv(t, run=_write(t / "file", "x") / "run"), 2,
     "file/run cannot be created: "),
    ("train-workdir-not-writable", lambda t: _train_argv(t, run=_locked(t)), 2, "is not writable"),
    ("train-config-file-missing", lambda t: _train_argv(t, config_spec=str(t / "missing.py")), 2, "missing.py does not exist"),
    ("train-config-syntax-error",
     lambda t: _train_argv(t, config_spec=str(_config_file(t, "def get_config(arg=None):\n    return {'seed': 1\n"))), 2,
     "bad.py: syntax error at line 2"),
    ("train-get-config-raises",
     lambda t: _train_argv(t, config_spec=str(_config_file(t, "def get_config(arg=None):\n    raise KeyError('x')\n"))), 2,
     "get_config(None) failed: KeyError"),
    ("train-no-get-config", lambda t: _train_argv(t, config_spec=str(_config_file(t, "x = 1\n"))), 2,
     "must define get_config(arg=None)"),
    ("train-usage-missing-workdir", lambda t: ["train", "--config", DIGITS], 2,
     "saljax train: the following arguments are required: --workdir (see saljax train --help)"),
    ("train-usage-unknown-option", lambda t: [*_train_argv(t), "--bogus"], 2, "unrecognized arguments: --bogus"),
    ("explain-no-such-directory", lambda t: ["explain", "--checkpoint", t / "no_such_run", "--out", t / "out"], 2,
     "no_such_run' does not exist"),
    ("explain-truncated-config-json",
     lambda t: ["explain", "--checkpoint", _write(t / "config.json", '{"method": "ce", ').parent, "--out", t / "out"], 2,
     "config.json is corrupt or unreadable"),
    ("explain-config-json-not-an-object",
     lambda t: ["explain", "--checkpoint", _write(t / "config.json", "[1, 2]").parent, "--out", t / "out"], 2,
     "expected a JSON object"),
    ("explain-usage-missing-out", lambda t: ["explain", "--checkpoint", t], 2,
     "the following arguments are required: --out"),
    ("explain-out-is-a-file", lambda t: ["explain", "--checkpoint", t / "nowhere", "--out", _write(t / "report.md", "mine")],
     2, "report.md' is a file; expected a directory"),
    # explain's options are checked before the checkpoint is read or data built (this one does not exist)
    *[(f"explain-option-{option[2:]}", lambda t, o=option, v=value: ["explain", "--checkpoint", t / "nowhere", "--out",
                                                                      t / "out", o, v], 2, message)
      for option, value, message in [
          ("--methods", "gradient,gradcam", "unknown explanation method(s) ['gradcam']; expected some of"),
          ("--top-q", "2", "ExplainConfig.top_q must be a fraction in (0, 1]; got 2.0"),
          ("--batch-size", "0", "ExplainConfig.batch_size must be a positive int; got 0"),
          ("--ig-steps", "0", "ExplainConfig.ig_steps must be a positive int"),
          ("--num-images", "-1", "--num-images must be >= 0; got -1"),
      ]],
    ("experiment-zero-seeds", lambda t: ["experiment", DIGITS, "--seeds", "0", "--workdir", t / "w", "--out", t / "out"], 2,
     "--seeds must be >= 1; got 0"),
    ("experiment-unknown-suite", lambda t: ["experiment", "nope", "--workdir", t / "w", "--out", t / "out"], 2,
     "no suite named 'nope'"),
    ("experiment-method-not-in-suite",
     lambda t: ["experiment", DIGITS, "--methods", "dd_paired", "--workdir", t / "w", "--out", t / "out"], 2,
     "--methods ['dd_paired'] not in suite 'decoy_digits'"),
    ("experiment-bad-override",
     lambda t: ["experiment", DIGITS, "--seeds", "1", "--workdir", t / "w", "--out", t / "out", "num_steps=0"], 2,
     "num_steps must be an integer >= 1; got 0"),
    ("experiment-bad-loss-option",
     lambda t: ["experiment", DIGITS, "--seeds", "1", "--methods", "gradmask", "--workdir", t / "w", "--out", t / "out",
                "loss.lam=-2"], 2,
     "lam must be a finite number >= 0; got -2"),
    ("experiment-usage-seeds-not-a-number", lambda t: ["experiment", DIGITS, "--seeds", "x"], 2,
     "--seeds must be an integer >= 1; got 'x'"),
]


@pytest.mark.parametrize("argv, code, message", [c[1:] for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES])
def test_commands_refuse_bad_input_in_one_line(tmp_path, capsys, argv, code, message):
    argv = argv(tmp_path)  # writes the bad input files first
    before = _snapshot(tmp_path)
    _refused(capsys, argv, code, message)
    assert _snapshot(tmp_path) == before  # nothing written: no run, data, out or cache directory
    assert not any(p.is_dir() and p.name != "locked" for p in tmp_path.iterdir()), list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:'saljax.cli' found in sys.modules")
def test_the_module_entry_point_exits_with_code_2_and_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["saljax", *_train_argv(tmp_path, "num_steps=0")])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("saljax.cli", run_name="__main__")
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "saljax train: num_steps must be an integer >= 1; got 0"


DEBUG_CASES = [
    ("train-flag-first", lambda t: ["--debug", *_train_argv(t, "method='nope'")], {}, ValueError, "method must be one of"),
    ("train-flag-last", lambda t: [*_train_argv(t, "method='nope'"), "--debug"], {}, ValueError, "method must be one of"),
    ("train-environment", lambda t: _train_argv(t, "method='nope'"), {"SALJAX_DEBUG": "1"}, ValueError, "method must be one of"),
    ("explain-flag", lambda t: ["explain", "--debug", "--checkpoint", _write(t / "config.json", "[1]").parent,
                                "--out", t / "out"], {}, workdir.CheckpointError, "expected a JSON object"),
    ("experiment-flag", lambda t: ["experiment", "--debug", DIGITS, "--seeds", "0", "--workdir", t / "w",
                                   "--out", t / "out"], {}, ValueError, "--seeds must be >= 1"),
]


@pytest.mark.parametrize("argv, env, error, message", [c[1:] for c in DEBUG_CASES], ids=[c[0] for c in DEBUG_CASES])
def test_debug_raises_the_error_with_its_traceback(tmp_path, monkeypatch, argv, env, error, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(error, match=message):
        cli.main([str(a) for a in argv(tmp_path)])


def test_saljax_debug_0_is_off(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SALJAX_DEBUG", "0")
    _refused(capsys, _train_argv(tmp_path, "method='nope'"), 2, "method must be one of")


def test_explain_refuses_a_split_the_dataset_lacks(trained, tmp_path, capsys):
    _refused(capsys, ["explain", "-q", "--checkpoint", trained[0], "--out", tmp_path / "out", "--no-progress",
                      "--dataset", "decoy_digits:nosuch"], 2,
             "dataset 'decoy_digits' has no split 'nosuch'; it has ['test', 'train', 'validation']")
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_model_field_the_dataset_contradicts(trained, data_dir, tmp_path, capsys):
    argv = ["train", "--config", f"{DIGITS}:ce", "--workdir", tmp_path / "run",
            *_overrides(data_dir, "model.kwargs.head_type='mlp'", "model.kwargs.mlp_hidden=8",
                        "model.kwargs.input_size=(28, 28)")]
    _refused(capsys, argv, 2, "model.kwargs.input_size (28, 28) does not match the dataset's images of 16x16")
    assert not (tmp_path / "run" / "config.json").exists()


# --- faults: interrupted rewrites -------------------------------------------------------------------------


def _disk_full(*_):
    raise OSError(28, "No space left on device")


def test_interrupted_config_json_rewrite_keeps_the_old_one(tmp_path, monkeypatch):
    workdir.save_config(tmp_path, {"method": "ce"})
    before = _snapshot(tmp_path)
    monkeypatch.setattr(os, "fsync", _disk_full)  # the new text is written, then the disk fails
    with pytest.raises(OSError, match="No space left"):
        workdir.save_config(tmp_path, {"method": "gradmask"})
    assert _snapshot(tmp_path) == before and not _strays(tmp_path)
    assert workdir.load_config(tmp_path).method == "ce"


def test_interrupted_result_json_keeps_the_old_one(tmp_path):
    runner._write_result(str(tmp_path), {"seed": 0, "metrics": {"validation/accuracy": 0.5}})
    before = _snapshot(tmp_path)
    with pytest.raises(TypeError, match="not JSON serializable"):  # fails half-way through serialisation
        runner._write_result(str(tmp_path), {"seed": 0, "metrics": {"validation/accuracy": 0.9}, "bad": {1, 2}})
    assert _snapshot(tmp_path) == before and not _strays(tmp_path)
    assert runner._read_result(str(tmp_path))["metrics"] == {"validation/accuracy": 0.5}


def test_interrupted_figure_keeps_the_old_png(tmp_path):
    path = tmp_path / "curves.png"
    fig = _figures.figure(1, 1)
    _figures.save(fig, path)
    before = _snapshot(tmp_path)

    def half_then_fail(f, **_):
        f.write(b"\x89PNG half")
        raise RuntimeError("renderer died")

    fig.savefig = half_then_fail
    with pytest.raises(RuntimeError, match="renderer died"):
        _figures.save(fig, path)
    assert _snapshot(tmp_path) == before and not _strays(tmp_path)
    assert Image.open(path).size == (100, 100)


def test_a_metrics_line_left_unfinished_is_cut_off_by_the_next_writer(tmp_path):
    writer = writers.MetricWriter(tmp_path, tensorboard=False)
    writer.write(1, {"train/loss": 0.5})
    writer.close()
    with open(tmp_path / workdir.METRICS_FILE, "a") as f:
        f.write('{"step": 2, "train/lo')  # a process killed mid-line
    writer = writers.MetricWriter(tmp_path, tensorboard=False)
    writer.write(2, {"train/loss": 0.25})
    writer.close()
    assert writers.read_metrics(tmp_path) == [{"step": 1, "train/loss": 0.5}, {"step": 2, "train/loss": 0.25}]


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path):
    workdir.save_config(tmp_path, {"method": "ce"})
    code = ("import os, signal, sys; from saljax import workdir\n"
            "with workdir.atomic_write(sys.argv[1]) as f:\n"
            "    f.write('{\"method\": '); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / workdir.CONFIG_FILE)], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert workdir.load_config(tmp_path).method == "ce"
    assert len(_strays(tmp_path)) == 1  # the killed writer's temporary file, hidden
    workdir.save_config(tmp_path, {"method": "rrr"})
    assert workdir.load_config(tmp_path).method == "rrr" and not _strays(tmp_path)


# --- faults: dataset rebuilds ------------------------------------------------------------------------------


def _prepared(tmp_path, n=4):
    rows = [f"img/{i}.png,{'ab'[i % 2]},,," for i in range(n)]
    folder = _folder(tmp_path / "f", rows, _images(6))
    data_dir = tmp_path / "data"
    return folder, data_dir, rows, _build(folder, data_dir)


def test_failed_rebuild_leaves_the_old_copy_untouched(tmp_path):
    folder, data_dir, rows, good = _prepared(tmp_path)
    before = _snapshot(good.data_path)
    _folder(folder, [*rows[:3], "img/3.png,b,maps/nowhere.png,,"])  # found only while generating, in the staging copy
    with pytest.raises(sd.FolderDatasetError, match="row 5: .*nowhere.png: map file not found"):
        _build(folder, data_dir, rebuild=True)
    assert _snapshot(good.data_path) == before and not _strays(data_dir)
    assert len(sd.SaliencyFolder(data_dir=os.fspath(data_dir), config=good.builder_config).as_data_source("train")) == 4


def test_rebuild_failing_its_final_check_leaves_the_old_copy_untouched(tmp_path, monkeypatch):
    folder, data_dir, rows, good = _prepared(tmp_path)
    before = _snapshot(good.data_path)
    _folder(folder, [*rows, "img/4.png,a,,,"])

    def unreadable(builder):
        raise ValueError("rebuilt split 'train' holds 0 examples; its info says 5")

    monkeypatch.setattr(catalog, "_check_prepared", unreadable)
    with pytest.raises(ValueError, match="rebuilt split 'train' holds 0 examples"):
        _build(folder, data_dir, rebuild=True)
    assert _snapshot(good.data_path) == before and not _strays(data_dir)


def test_stale_copy_is_refused_and_a_rebuild_replaces_it_whole(tmp_path):
    folder, data_dir, rows, first = _prepared(tmp_path)
    _folder(folder, [*rows, "img/4.png,a,,,", "img/5.png,b,,,"])
    with pytest.raises(sd.StaleDatasetError, match="is older than .*saliency.csv .*rebuild=True") as info:
        _build(folder, data_dir)
    assert "\n" not in str(info.value)
    rebuilt = sd.from_config({"name": "saliency_folder", "data_dir": data_dir, "manual_dir": folder, "rebuild": True})
    assert rebuilt.data_path == first.data_path and len(rebuilt.as_data_source("train")) == 6
    assert _build(folder, data_dir).info.splits["train"].num_examples == 6  # no longer stale
    assert not _strays(data_dir)


def test_failed_build_keeps_the_other_configs(tmp_path):
    folder, data_dir, _, good = _prepared(tmp_path)
    (folder / "saliency.csv").write_text("image,label\nimg/0.png,bird\n")
    with pytest.raises(sd.FolderDatasetError, match="row 2"):
        _build(folder, data_dir, class_names=("a", "b"), image_size=9)
    names = sorted(p.name for p in (data_dir / "saliency_folder").iterdir() if not p.name.startswith("."))
    assert Path(good.data_path).exists() and names == [good.builder_config.name]
    (folder / "saliency.csv").write_text("image,label\nimg/0.png,b\n")  # fixed: nothing half-built blocks it
    assert _build(folder, data_dir, class_names=("a", "b"), image_size=9).info.splits["train"].num_examples == 1


# --- faults: checkpoints ---------------------------------------------------------------------------------


def _save_all(directory, history, **kwargs):
    with checkpoint.Checkpointer(directory, async_save=False, best_metric="validation/accuracy", **kwargs) as ck:
        for step, value in history:
            ck.save(step, {"w": np.full(2, float(step))}, metrics=None if value is None else {"validation/accuracy": value})
        ck.wait()
        return ck.steps(), ck.best_step()


HISTORY = [(1, 0.5), (2, 0.9), (3, None), (4, 0.9), (5, 0.7), (6, 0.9), (7, None)]


@pytest.mark.parametrize("mode, best", [("max", 2), ("min", 1)])
def test_ties_go_to_the_earliest_step(tmp_path, mode, best):
    steps, best_step = _save_all(tmp_path, HISTORY, keep_best=1, keep_latest=1, best_mode=mode)
    assert best_step == best and steps == sorted({best, 7})
    steps, _ = _save_all(tmp_path / "two", HISTORY, keep_best=2, keep_latest=1, best_mode=mode)
    assert steps == ([2, 4, 7] if mode == "max" else [1, 5, 7])


@pytest.mark.parametrize("split_at", [1, 2, 3, 4, 5, 6])
def test_ties_and_retention_are_the_same_after_a_resume(tmp_path, split_at):
    expected = _save_all(tmp_path / "whole", HISTORY, keep_best=2, keep_latest=2)
    _save_all(tmp_path / "parts", HISTORY[:split_at], keep_best=2, keep_latest=2)
    assert _save_all(tmp_path / "parts", HISTORY[split_at:], keep_best=2, keep_latest=2) == expected


def test_a_corrupt_checkpoint_is_moved_aside_never_deleted(tmp_path, caplog):
    _save_all(tmp_path, [(1, 0.1), (2, 0.2), (3, 0.3)], keep_best=3, keep_latest=3)
    _corrupt(tmp_path / "checkpoints" / "3" / "state")
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        with caplog.at_level("WARNING"):
            step, state = ck.restore({"w": np.zeros(2)}, move_corrupt=True)
        assert step == 2 and np.all(state["w"] == 2.0) and ck.steps() == [1, 2]
    moved = tmp_path / "checkpoints" / "3.corrupt"
    assert moved.is_dir() and "checkpoint 3" in caplog.text and str(moved) in caplog.text
    assert "unreadable or corrupt" in caplog.text
    _corrupt(tmp_path / "checkpoints" / "2" / "state")  # read-only restores leave it where it is
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ck:
        assert ck.restore({"w": np.zeros(2)})[0] == 1 and ck.steps() == [1, 2]
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint could be restored") as info:
            ck.restore({"w": np.zeros(2)}, step=2)
    assert "\n" not in str(info.value)


def test_a_checkpoint_with_unreadable_metadata_is_refused_or_moved_aside(tmp_path, caplog):
    _save_all(tmp_path, [(1, 0.1), (2, 0.2)], keep_best=2, keep_latest=2)
    (tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA").write_bytes(b"\xff{not json")
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint 2 in .* is corrupt \(its _CHECKPOINT_METADATA"):
        checkpoint.Checkpointer(tmp_path, async_save=False)
    with caplog.at_level("WARNING"), checkpoint.Checkpointer(tmp_path, async_save=False, move_corrupt=True) as ck:
        assert ck.steps() == [1]
    assert (tmp_path / "checkpoints" / "2.corrupt").is_dir() and "moved aside" in caplog.text


@pytest.mark.parametrize("which", ["newest", "best"])
def test_training_resumes_past_a_corrupt_checkpoint_of_any_age(trained, data_dir, tmp_path, caplog, which):
    run = _copy(trained, tmp_path)
    step = 4 if which == "newest" else 2
    _corrupt(run / "checkpoints" / str(step))
    with caplog.at_level(logging.WARNING, logger="saljax"):
        results = train.train_and_evaluate(_config(data_dir, "num_steps=8", TIE), run)
    assert results["final/step"] == 8
    assert (run / "checkpoints" / f"{step}.corrupt").is_dir()  # moved aside, with a message naming it
    assert f"checkpoint {step} " in caplog.text and f"{step}.corrupt" in caplog.text
    with checkpoint.Checkpointer(run) as ck:
        if which == "newest":  # resumed from 2, which stays the best
            assert ck.steps() == [2, 8] and results["best/step"] == 2
        else:  # resumed from 4; the corrupt best is found at the end, the next best is 4
            assert ck.steps() == [4, 8] and results["best/step"] == 4
    assert writers.read_metrics(run)[-1]["step"] == 8
    model, cfg, used = train.load_model(run, step="latest", with_step=True)
    assert used == 8 and model.num_classes == cfg.model.num_classes
    assert not _strays(run)


@pytest.mark.slow  # two trainings
def test_a_resume_selects_the_same_best_checkpoint_as_an_uninterrupted_run(trained, data_dir, tmp_path):
    whole = train.train_and_evaluate(_config(data_dir, "num_steps=8", TIE), tmp_path / "whole")
    assert whole["final/step"] == 8 and whole["best/step"] == 2  # ties: the earliest
    evaluations = {r["step"]: r for r in writers.read_metrics(tmp_path / "whole") if "validation/accuracy" in r}
    for key in ("validation/accuracy", "validation/ce", "test/accuracy"):
        assert whole[f"best/{key}"] == pytest.approx(evaluations[2][key], rel=1e-6)
        assert whole[key] == pytest.approx(evaluations[8][key], rel=1e-6)
    assert trained[1]["best/step"] == 2
    parts = _copy(trained, tmp_path)  # the same config stopped at step 4
    resumed = train.train_and_evaluate(_config(data_dir, "num_steps=8", TIE), parts)
    with checkpoint.Checkpointer(parts) as a, checkpoint.Checkpointer(tmp_path / "whole") as b:
        assert a.steps() == b.steps() == [2, 8]
    assert resumed == whole  # bit for bit: same steps, same data order, same selection


def test_load_model_falls_back_to_the_newest_readable_checkpoint_and_says_which(trained, tmp_path, caplog):
    run = _copy(trained, tmp_path)
    _corrupt(run / "checkpoints" / "2" / "state")  # the best
    with caplog.at_level(logging.WARNING, logger="saljax"):
        _, _, used = train.load_model(run, with_step=True)
    assert used == 4 and "loaded checkpoint 4 of" in caplog.text and "instead of the requested best (2)" in caplog.text
    _corrupt(run / "checkpoints" / "4" / "state")
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint could be restored \(2 tried\)") as info:
        train.load_model(run, step="latest")
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]  # loading never moves anything


def test_load_model_with_a_corrupt_newest_uses_the_one_before(trained, tmp_path):
    run = _copy(trained, tmp_path)
    _corrupt(run / "checkpoints" / "4" / "state")
    assert train.load_model(run, step="latest", with_step=True)[2] == 2
    with pytest.raises(ValueError, match="step must be 'best', 'latest' or a step number; got 'first'"):
        train.load_model(run, step="first")


@pytest.mark.slow  # ~4 s on 2 cores
def test_explain_falls_back_past_a_corrupt_best_checkpoint_and_rewrites_its_report_atomically(trained, tmp_path, capsys,
                                                                                            monkeypatch):
    run = _copy(trained, tmp_path)
    _corrupt(run / "checkpoints" / "2" / "state")
    argv = ["explain", "--checkpoint", run, "--out", tmp_path / "out", "--methods", "gradient", "--num-images", "1",
            "--batch-size", "16", "--no-progress", "--no-map-metrics"]
    code, err = _cli(capsys, argv)
    assert code == 0, err
    assert "instead of the requested best (2)" in err and "Traceback" not in err
    assert "step 4" in (tmp_path / "out" / "report.md").read_text()
    assert not _strays(tmp_path / "out")
    before = _snapshot(tmp_path / "out")

    def half_then_fail(obj, f, **_):  # the rewrite of metrics.json fails half-way through serialisation
        f.write('{"split": ')
        raise TypeError("cannot serialise")

    monkeypatch.setattr(report_module.json, "dump", half_then_fail)
    code, err = _cli(capsys, argv)
    assert code == 1 and err.strip().splitlines()[-1] == ("saljax explain: TypeError: cannot serialise (run with --debug"
                                                          " for the traceback)"), err
    after = _snapshot(tmp_path / "out")
    assert after["metrics.json"] == before["metrics.json"] and set(after) == set(before) and not _strays(tmp_path / "out")
    monkeypatch.undo()
    _corrupt(run / "checkpoints" / "4" / "state")  # none readable: one line, exit code 2
    code, err = _cli(capsys, ["explain", "--checkpoint", run, "--out", tmp_path / "out2", "--no-progress"])
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("saljax explain: cannot load a model from") and "no checkpoint could be restored" in last
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow  # ~4 s on 2 cores
def test_a_non_finite_loss_stops_naming_the_term_and_saves_nothing_non_finite(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--config", f"{DIGITS}:ce", "--workdir", run,
            *_overrides(data_dir, "num_steps=6", "eval_every=6", "checkpoint.every=1", "log_every=100",
                        "optimizer.learning_rate=1e30")]
    code, err = _cli(capsys, argv)
    assert code == 1, err
    assert "saljax train: non-finite loss at step" in err and "(the first such step)" in err
    assert "non-finite term(s) loss/ce = " in err or "gradient norm" in err, err
    assert "Traceback" not in err
    cfg = checkpoint.load_config(run)
    _, target = train.init_from_config(cfg)
    with checkpoint.Checkpointer(run) as ck:
        for step in ck.steps():
            assert not checkpoint.non_finite_leaves(ck.restore(target, step=step)[1])
    assert not _strays(run)


@pytest.mark.slow
def test_resume_after_sigkill_during_saves_is_bitwise_identical(data_dir, tmp_path):
    # conv_impl named: the killed run is a child process, where "auto" keeps its CPU meaning (tests/conftest.py).
    steps = ["num_steps=240", "eval_every=240", "log_every=40", "checkpoint.every=40", "model.kwargs.conv_impl='xla'"]

    def argv(run):
        return ["train", "--config", f"{DIGITS}:ce", "--workdir", str(run), *_overrides(data_dir, *steps)]

    reference = tmp_path / "uninterrupted"
    assert cli.main(argv(reference)) == 0
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "saljax.cli", *argv(killed)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    ckpt_dir = killed / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill as soon as the first checkpoint is complete: the next saves are under way
        done = [d for d in (os.listdir(ckpt_dir) if ckpt_dir.exists() else []) if d.isdigit()]
        if done and proc.poll() is None:
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with checkpoint.Checkpointer(killed) as ck:
        interrupted_at = ck.latest_step()
    assert interrupted_at is not None and interrupted_at < 240
    assert cli.main(argv(killed)) == 0
    a = jax.tree.map(np.asarray, nnx.state(train.load_model(reference, step="latest")[0]))
    b = jax.tree.map(np.asarray, nnx.state(train.load_model(killed, step="latest")[0]))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert writers.read_metrics(killed)[-1]["step"] == 240
    assert not _strays(killed)
