"""``saliency_folder``: classes, channels and size inferred from the CSV and images.

Leakage checks, bad rows, stale copies and atomic rebuilds: tests/test_bad_input.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

import saljax.data as sd

tfds.disable_progress_bar()


def write_png(path: Path, height: int, width: int, value: int, mode: str = "L") -> None:
    """A flat image; ``value`` makes the file's content unique."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width) if mode == "L" else (height, width, 3)
    Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path)


def make_folder(root: Path, rows: list[str], images: dict[str, tuple[int, int, int]] | None = None,
                mode: str = "L") -> Path:
    """Writes ``images`` (name -> (height, width, value)) and the CSV ``image,label,map,group,split``."""
    for name, (height, width, value) in (images or {}).items():
        write_png(root / name, height, width, value, mode)
    (root / "saliency.csv").write_text("\n".join(["image,label,map,group,split", *rows]) + "\n")
    return root


def default_images(n: int = 6, size: tuple[int, int] = (12, 12)) -> dict[str, tuple[int, int, int]]:
    return {f"img/{i}.png": (*size, 20 + 10 * i) for i in range(n)}


def build(folder: Path, data_dir: Path, **kwargs) -> tfds.core.DatasetBuilder:
    return sd.build("saliency_folder", data_dir, manual_dir=folder, **kwargs)


# --- inference ------------------------------------------------------------------------------


def test_classes_channels_and_size_are_inferred_and_named_after_the_folder(tmp_path, caplog) -> None:
    labels = ["zebra", "ant", "cat", "ant", "zebra", "cat"]
    folder = make_folder(tmp_path / "My Pets", [f"img/{i}.png,{lab},,," for i, lab in enumerate(labels)],
                         default_images(size=(12, 20)))
    with caplog.at_level(logging.WARNING, logger="saljax.data"):
        builder = build(folder, tmp_path / "data")
    assert builder.info.features["label"].names == ["ant", "cat", "zebra"]
    assert "['ant', 'cat', 'zebra']" in caplog.text and "inferred" in caplog.text
    assert builder.info.features["image"].shape == (12, 20, 1)
    assert builder.builder_config.name.startswith("my_pets_")
    assert sd.SaliencyFolder.DEFAULT_BUILDER_CONFIG_NAME == "csv"
    source = builder.as_data_source("train")
    assert sorted(int(source[i]["label"]) for i in range(len(source))) == [0, 0, 1, 1, 2, 2]
    # The same folder again reuses the copy (same inferred config).
    assert build(folder, tmp_path / "data").data_path == builder.data_path


def test_rgb_images_give_three_channels_and_explicit_fields_win(tmp_path) -> None:
    folder = make_folder(tmp_path / "f", [f"img/{i}.png,{'ab'[i % 2]},,," for i in range(4)],
                         default_images(4, (10, 10)), mode="RGB")
    inferred = build(folder, tmp_path / "data")
    assert inferred.info.features["image"].shape == (10, 10, 3)
    explicit = build(folder, tmp_path / "data", class_names=("b", "a"), channels=1, image_size=(6, 8))
    assert explicit.info.features["label"].names == ["b", "a"]
    assert explicit.info.features["image"].shape == (6, 8, 1)


def test_mixed_sizes_with_an_image_size_are_resized_and_large_resizes_are_announced(tmp_path, caplog) -> None:
    # without image_size they are refused: tests/test_bad_input.py
    images = {"img/0.png": (10, 10, 1), "img/1.png": (40, 40, 2), "img/2.png": (10, 10, 3), "img/3.png": (12, 12, 4)}
    folder = make_folder(tmp_path / "f", [f"img/{i}.png,{'ab'[i % 2]},,," for i in range(4)], images)
    with caplog.at_level(logging.WARNING, logger="saljax.data"):
        builder = build(folder, tmp_path / "data", image_size=10)
    assert builder.info.features["image"].shape == (10, 10, 1)
    assert "1 image(s)" in caplog.text and "more than 2x" in caplog.text and "row 3: 40x40 -> 10x10" in caplog.text
