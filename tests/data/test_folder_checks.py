"""``saliency_folder``: inference from the CSV and images, leakage checks, stale copies, atomic rebuild."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
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


def error_of(folder: Path, data_dir: Path, **kwargs) -> str:
    with pytest.raises(sd.FolderDatasetError) as info:
        build(folder, data_dir, **kwargs)
    return str(info.value)


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


def test_mixed_sizes_need_an_image_size_and_large_resizes_are_announced(tmp_path, caplog) -> None:
    images = {"img/0.png": (10, 10, 1), "img/1.png": (40, 40, 2), "img/2.png": (10, 10, 3), "img/3.png": (12, 12, 4)}
    folder = make_folder(tmp_path / "f", [f"img/{i}.png,{'ab'[i % 2]},,," for i in range(4)], images)
    message = error_of(folder, tmp_path / "data")
    assert "\n" not in message
    assert "3 different sizes" in message and "row 2: 10x10" in message and "row 3: 40x40" in message
    assert "set image_size" in message
    assert not (tmp_path / "data").exists()
    with caplog.at_level(logging.WARNING, logger="saljax.data"):
        builder = build(folder, tmp_path / "data", image_size=10)
    assert builder.info.features["image"].shape == (10, 10, 1)
    assert "1 image(s)" in caplog.text and "more than 2x" in caplog.text and "row 3: 40x40 -> 10x10" in caplog.text


def test_one_label_is_not_enough(tmp_path) -> None:
    folder = make_folder(tmp_path / "f", ["img/0.png,cat,,,", "img/1.png,cat,,,"], default_images(2))
    assert "expected at least two classes" in error_of(folder, tmp_path / "data")


# --- leakage and duplicates -----------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, needles",
    [
        (["img/0.png,a,,,train", "img/1.png,b,,,train", "img/0.png,a,,,test"],
         ["row 4:", "split 'test' but row 2 puts this image in split 'train'", "data leakage"]),
        (["img/0.png,a,,,train", "img/1.png,b,,,train", "img/copy.png,a,,,test"],
         ["row 4:", "copy.png", "the same image content as", "0.png", "data leakage"]),
        (["img/0.png,a,,,train", "img/1.png,b,,,train", "img/0.png,b,,,train"],
         ["row 4:", "label 'b' but row 2 lists this image with label 'a'", "one label per image"]),
        (["img/0.png,a,,,train", "img/1.png,b,,,train", "img/copy.png,b,,,"],
         ["row 4:", "the same image content as", "one label per image"]),
        (["img/0.png,a,,1,train", "img/1.png,b,,,train", "img/0.png,a,,2,train"],
         ["row 4:", "listed again (first at row 2) with a different map or group"]),
    ],
)
def test_leakage_is_an_error_naming_both_rows(tmp_path, rows: list[str], needles: list[str]) -> None:
    images = default_images(2)
    images["img/copy.png"] = images["img/0.png"]  # same bytes under another path
    folder = make_folder(tmp_path / "f", rows, images)
    message = error_of(folder, tmp_path / "data", class_names=("a", "b"))
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "data").exists()


def test_exact_duplicate_rows_are_dropped_with_a_warning(tmp_path, caplog) -> None:
    rows = ["img/0.png,a,,,", "img/1.png,b,,,train", "img/0.png,a,,,train", "img/0.png,a,,,train"]
    folder = make_folder(tmp_path / "f", rows, default_images(2))
    with caplog.at_level(logging.WARNING, logger="saljax.data"):
        builder = build(folder, tmp_path / "data", test_fraction=1.0)  # row 2 takes row 4's explicit split
    assert list(builder.info.splits) == ["train"] and builder.info.splits["train"].num_examples == 2
    assert "2 duplicate row(s) dropped (rows 4, 5)" in caplog.text


def test_random_split_keeps_copies_of_an_image_together(tmp_path) -> None:
    images = default_images(8)
    rows = [f"img/{i}.png,{'ab'[i % 2]},,," for i in range(8)]
    for i in range(8):  # every image twice, under another path, split left blank
        images[f"dup/{i}.png"] = images[f"img/{i}.png"]
        rows.append(f"dup/{i}.png,{'ab'[i % 2]},,,")
    folder = make_folder(tmp_path / "f", rows, images)
    builder = build(folder, tmp_path / "data", test_fraction=0.5)
    seen: dict[bytes, set[str]] = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split)
        for i in range(len(source)):
            seen.setdefault(source[i]["image"].tobytes(), set()).add(split)
    assert len(seen) == 8 and all(len(splits) == 1 for splits in seen.values())
    assert {s for splits in seen.values() for s in splits} == {"train", "test"}


def test_a_non_utf8_byte_names_its_row(tmp_path) -> None:
    folder = make_folder(tmp_path / "f", ["img/0.png,a,,,", "img/1.png,b,,,"], default_images(2))
    csv = folder / "saliency.csv"
    csv.write_bytes(csv.read_bytes().replace(b"img/1.png,b", b"img/1.png,b\xe9"))
    message = error_of(folder, tmp_path / "data")
    assert "\n" not in message
    assert f"row 3: {csv}: byte 0xe9 at character 12 is not UTF-8" in message


# --- stale copies and rebuild ---------------------------------------------------------------


def test_changed_csv_is_stale_and_rebuild_replaces_the_copy(tmp_path) -> None:
    images = default_images(6)
    rows = [f"img/{i}.png,{'ab'[i % 2]},,," for i in range(4)]
    folder = make_folder(tmp_path / "f", rows, images)
    data_dir = tmp_path / "data"
    first = build(folder, data_dir)
    assert first.info.splits["train"].num_examples == 4
    make_folder(folder, [*rows, "img/4.png,a,,,", "img/5.png,b,,,"])
    with pytest.raises(sd.StaleDatasetError, match="is older than .*saliency.csv .*rebuild=True") as info:
        build(folder, data_dir)
    assert "\n" not in str(info.value)
    rebuilt = sd.from_config({"name": "saliency_folder", "data_dir": data_dir, "manual_dir": folder, "rebuild": True})
    assert rebuilt.data_path == first.data_path
    assert rebuilt.info.splits["train"].num_examples == 6
    assert len(rebuilt.as_data_source("train")) == 6
    assert build(folder, data_dir).info.splits["train"].num_examples == 6  # no longer stale
    assert not [p for p in data_dir.rglob("*") if "rebuild" in p.name or "replaced" in p.name]


def test_failed_rebuild_leaves_the_old_copy_untouched(tmp_path) -> None:
    images = default_images(4)
    rows = [f"img/{i}.png,{'ab'[i % 2]},,," for i in range(4)]
    folder = make_folder(tmp_path / "f", rows, images)
    data_dir = tmp_path / "data"
    good = build(folder, data_dir)
    before = sorted(p.name for p in Path(good.data_path).iterdir())
    # A missing map is only found while generating, i.e. inside the staging copy.
    make_folder(folder, [*rows[:3], "img/3.png,b,maps/nowhere.png,,"])
    with pytest.raises(sd.FolderDatasetError, match="row 5: .*nowhere.png: map file not found"):
        build(folder, data_dir, rebuild=True)
    assert sorted(p.name for p in Path(good.data_path).iterdir()) == before
    again = sd.SaliencyFolder(data_dir=os.fspath(data_dir), config=good.builder_config)
    assert len(again.as_data_source("train")) == 4
    assert not [p for p in data_dir.rglob("*") if "rebuild" in p.name or "replaced" in p.name]
