"""Tests of the ``saliency_folder`` builder: a PNG folder round trip and rejection of bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from saljax.data.saliency_folder import FolderDatasetError

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


# --- bad input ------------------------------------------------------------------------------


def assert_nothing_left(data_dir: Path) -> None:
    leftovers = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*"))
    assert not leftovers, leftovers


def build_folder(folder: Path, data_dir: Path, **overrides) -> tfds.core.DatasetBuilder:
    return sd.build(
        "saliency_folder",
        data_dir,
        manual_dir=folder,
        **{"class_names": CLASSES, "image_size": 8, **overrides},
    )


def test_bad_rows_are_all_listed_and_nothing_is_written(folder: Path, tmp_path: Path) -> None:
    (folder / "img" / "broken.png").write_bytes(b"not a png at all")
    write_map(folder / "maps" / "wide.png", 40, 10, (0.2, 0.2, 0.6, 0.6))  # a.png is 64x48
    write_csv(
        folder / "saliency.csv",
        "image,label,map,group,split",
        [
            "img/a.png,cat,maps/a.png,0,train",  # row 2: fine
            "img/missing.png,cat,,0,train",  # row 3
            "img/broken.png,dog,,0,train",  # row 4
            "img/b.png,bird,maps/b.png,0,train",  # row 5
            "img/a.png,dog,maps/wide.png,0,train",  # row 6
            "img/c.png,cat,maps/nowhere.png,0,train",  # row 7
            "img/d.png,dog,,-3,train",  # row 8
            "img/e.png,cat,,0,tr ain",  # row 9
            "img/f.png,dog,,0,train",  # row 10: fine
        ],
    )
    data_dir = tmp_path / "data"
    with pytest.raises(FolderDatasetError) as info:
        build_folder(folder, data_dir)
    error = info.value
    assert isinstance(error, ValueError)
    rows = [p.row for p in error.problems]
    assert rows == [3, 4, 5, 6, 7, 8, 9]
    message = str(error)
    for row, needle in [
        (3, "missing.png: image file not found"),
        (4, "broken.png: image file unreadable"),
        (5, "label 'bird' is not one of the declared class_names"),
        (6, "wide.png: map is 40x10"),
        (7, "nowhere.png: map file not found"),
        (8, "group '-3'"),
        (9, "split 'tr ain'"),
    ]:
        assert f"row {row}: " in message and needle in message, needle
    assert "row 2:" not in message and "row 10:" not in message
    assert_nothing_left(data_dir)


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "the CSV is empty"),
        ("image,label,map\n", "no data rows"),
        ("image,map\nimg/a.png,maps/a.png\n", "missing required column(s) label"),
        ("path,class\nimg/a.png,cat\n", "missing required column(s) image, label"),
    ],
)
def test_bad_csv_structure(folder: Path, tmp_path: Path, content: str, needle: str) -> None:
    (folder / "saliency.csv").write_text(content)
    data_dir = tmp_path / "data"
    with pytest.raises(FolderDatasetError, match="problem") as info:
        build_folder(folder, data_dir)
    assert needle in str(info.value)
    assert_nothing_left(data_dir)


def test_missing_csv_and_manual_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other.txt").write_text("x")
    with pytest.raises(FolderDatasetError, match="CSV file not found"):
        build_folder(empty, data_dir)
    assert_nothing_left(data_dir)
    with pytest.raises(FolderDatasetError, match="needs a manual_dir"):
        sd.build("saliency_folder", data_dir, class_names=CLASSES, image_size=8)
    assert_nothing_left(data_dir)


def test_failed_build_keeps_other_datasets(folder: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    good = build_folder(folder, data_dir)
    (folder / "saliency.csv").write_text("image,label\nimg/a.png,bird\n")
    with pytest.raises(FolderDatasetError, match="row 2"):
        build_folder(folder, data_dir, image_size=9)
    assert good.data_path.exists()
    configs = sorted(
        p.name for p in (data_dir / "saliency_folder").iterdir() if not p.name.startswith(".")
    )
    assert configs == [good.builder_config.name]
    # A later build with the fixed CSV succeeds (nothing half-built blocks it).
    (folder / "saliency.csv").write_text("image,label\nimg/a.png,dog\n")
    fixed = build_folder(folder, data_dir, image_size=9)
    assert fixed.info.splits["train"].num_examples == 1
