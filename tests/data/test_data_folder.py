"""Tests of the ``saliency_folder`` builder: a PNG folder round trip (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import saljax.data as sd

tfds.disable_progress_bar()

CLASSES = ("cat", "dog")


def write_image(
    path: Path, width: int, height: int, box: tuple[float, float, float, float]
) -> None:
    """Dark RGB image with a bright box given in relative (x0, y0, x1, y1) coordinates."""
    array = np.full((height, width, 3), 30, np.uint8)
    x0, y0, x1, y1 = box
    array[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = 230
    Image.fromarray(array).save(path)


def write_map(path: Path, width: int, height: int, box: tuple[float, float, float, float]) -> None:
    """Grayscale map, white on the same relative box."""
    array = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    array[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = 255
    Image.fromarray(array).save(path)


def write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Six images of different sizes; maps at other resolutions with the same aspect ratio."""
    root = tmp_path / "folder"
    (root / "img").mkdir(parents=True)
    (root / "maps").mkdir()
    box = (0.25, 0.25, 0.75, 0.75)
    rows = []
    specs = [  # name, width, height, map size or None, label, group, split
        ("a", 64, 48, (32, 24), "cat", "0", "train"),
        ("b", 40, 40, (80, 80), "dog", "1", "train"),
        ("c", 96, 64, None, "cat", "2", "train"),
        ("d", 48, 64, (24, 32), "dog", "", "test"),
        ("e", 32, 32, (16, 16), "cat", "1", ""),
        ("f", 50, 30, (25, 15), "dog", "2", ""),
    ]
    for name, width, height, map_size, label, group, split in specs:
        write_image(root / "img" / f"{name}.png", width, height, box)
        map_cell = ""
        if map_size is not None:
            write_map(root / "maps" / f"{name}.png", *map_size, box)
            map_cell = f"maps/{name}.png"
        rows.append(f"img/{name}.png,{label},{map_cell},{group},{split}")
    write_csv(root / "saliency.csv", "image,label,map,group,split", rows)
    return root


def all_examples(builder: tfds.core.DatasetBuilder) -> dict[str, list[dict]]:
    out = {}
    for split in builder.info.splits.keys():
        source = builder.as_data_source(split)
        out[split] = [source[i] for i in range(len(source))]
    return out


def test_round_trip(folder: Path, tmp_path: Path) -> None:
    builder = sd.build(
        "saliency_folder",
        tmp_path / "data",
        manual_dir=folder,
        class_names=CLASSES,
        image_size=16,
    )
    splits = all_examples(builder)
    assert sorted(splits) == ["test", "train"]
    assert len(splits["train"]) == 5 and len(splits["test"]) == 1
    assert builder.info.features["label"].names == list(CLASSES)
    for exs in splits.values():
        for ex in exs:
            assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
            assert ex["saliency_map"].shape == (16, 16) and ex["saliency_map"].dtype == np.float32
            if not ex["has_map"]:
                assert np.all(ex["saliency_map"] == 0)
                continue
            # The map still marks exactly the bright box of its image.
            bright = ex["image"].mean(axis=-1) > 128
            marked = ex["saliency_map"] > 0.5
            assert np.mean(bright == marked) > 0.95
            assert 0.0 <= ex["saliency_map"].min() and ex["saliency_map"].max() <= 1.0
    train = splits["train"]
    assert sum(not ex["has_map"] for ex in train) == 1
    assert sorted(int(ex["group"]) for ex in train) == [0, 1, 1, 2, 2]
    assert sorted(int(ex["label"]) for ex in train) == [0, 0, 0, 1, 1]
    # Images are Pillow's bilinear resize of the originals.
    original = Image.open(folder / "img" / "d.png").convert("RGB")
    expected = np.asarray(original.resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(splits["test"][0]["image"], expected)


def test_tfds_manual_dir_and_random_split(folder: Path, tmp_path: Path) -> None:
    config = sd.SaliencyFolderConfig(
        name="pets",
        class_names=CLASSES,
        image_size=(12, 20),
        channels=1,
        group_names=("none", "studio", "outdoor"),
        test_fraction=1.0,
    )
    builder = tfds.builder("saliency_folder", data_dir=os.fspath(tmp_path / "data"), config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(folder))
    )
    splits = all_examples(builder)
    # Rows e and f have a blank split; with test_fraction=1 both join row d in test.
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "test": 3}
    assert builder.info.features["group"].names == ["none", "studio", "outdoor"]
    for exs in splits.values():
        for ex in exs:
            assert ex["image"].shape == (12, 20, 1)
            assert ex["saliency_map"].shape == (12, 20)


def test_group_names_in_csv(folder: Path, tmp_path: Path) -> None:
    text = (folder / "saliency.csv").read_text()
    text = text.replace("img/a.png,cat,maps/a.png,0", "img/a.png,cat,maps/a.png,outdoor")
    (folder / "saliency.csv").write_text(text)
    builder = sd.build(
        "saliency_folder",
        tmp_path / "data",
        manual_dir=folder,
        class_names=CLASSES,
        group_names=("none", "studio", "outdoor"),
        image_size=8,
    )
    groups = sorted(int(ex["group"]) for ex in all_examples(builder)["train"])
    assert groups == [1, 1, 2, 2, 2]


def test_absolute_csv_path_needs_no_manual_dir(folder: Path, tmp_path: Path) -> None:
    builder = sd.build(
        "saliency_folder",
        tmp_path / "data",
        csv_path=os.fspath(folder / "saliency.csv"),
        class_names=CLASSES,
        image_size=8,
    )
    assert builder.info.splits["train"].num_examples == 5
