"""Your own folder through the command line, as the README shows it: train, then explain, nothing else set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _saljax() -> list[str]:
    exe = shutil.which("saljax", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "saljax.cli"]


def _folder(root: Path, n: int = 24, size: int = 12) -> Path:
    """Grayscale 12x12 images of three classes (labels 'c0'..'c2'), a CSV with splits; the training and
    validation images have a map, the test images none (as often when only some images were annotated)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "maps").mkdir()
    rows = ["image,label,map,split"]
    for i in range(n):
        label = i % 3
        image = rng.integers(0, 60, (size, size), np.uint8)
        image[2 + label * 3 : 5 + label * 3, 3:9] = 230
        mask = np.zeros((size, size), np.uint8)
        mask[2 + label * 3 : 5 + label * 3, 3:9] = 255
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "maps" / f"{i}.png")
        split = "train" if i < 12 else ("validation" if i < 18 else "test")
        rows.append(f"images/{i}.png,c{label},{'' if split == 'test' else f'maps/{i}.png'},{split}")
    (root / "saliency.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_train_and_explain_a_folder_with_nothing_else_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from saljax import cli
    from saljax.explain import command as explain_command

    folder = _folder(tmp_path / "my_data")
    run = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", SALJAX_DATA_DIR=str(tmp_path / "data"))
    train = subprocess.run(
        [*_saljax(), "train", "--config", str(ROOT / "experiments/configs/folder.py:gradmask"), "--workdir", str(run),
         f"dataset.manual_dir={str(folder)!r}", "num_steps=4", "eval_every=2", "batch_size=4", "progress=False"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    out = train.stdout + train.stderr
    assert "c0" in out and "c2" in out  # the class names inferred from the CSV are announced
    assert "final (step 4)" in out and "best by validation/accuracy" in out  # both evaluations, named
    # The installed command once (above); explain and the stale case in-process, as the same entry point.
    monkeypatch.setenv("SALJAX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    # The default split, test, has no maps: one line before anything is explained, naming the way out.
    with monkeypatch.context() as m:
        m.setattr(explain_command, "run", lambda *a, **k: pytest.fail("explained a split without maps"))
        capsys.readouterr()
        assert cli.main(["explain", "--checkpoint", str(run), "--out", str(run / "explain"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "saljax explain: no sample of split 'test' has a human saliency map (has_map is False for all 6 images), "
        "so the map metrics cannot be computed; pass map_metrics=False (saljax explain --no-map-metrics) to explain "
        "without them"), err
    assert not (run / "explain").exists()
    code = cli.main(["explain", "--checkpoint", str(run), "--out", str(run / "explain"), "--no-progress",
                     "--methods", "gradient", "--batch-size", "8", "--dataset", "saliency_folder:validation"])
    assert code == 0, capsys.readouterr().err[-3000:]
    report = (run / "explain" / "report.md").read_text()
    assert "Checkpoint:" in report and "step" in report
    assert (run / "explain" / "summary.png").is_file()

    # Editing the CSV without rebuild: one clear line that the cached copy is older; with it: rebuilt.
    csv = folder / "saliency.csv"
    csv.write_text(csv.read_text().replace("images/0.png,c0", "images/0.png,c1"))
    capsys.readouterr()
    code = cli.main(["train", "--config", str(ROOT / "experiments/configs/folder.py:gradmask"), "--workdir",
                     str(tmp_path / "run2"), f"dataset.manual_dir={str(folder)!r}", "num_steps=2", "eval_every=2",
                     "batch_size=4", "progress=False"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "older" in err or "stale" in err.lower(), err[-2000:]
