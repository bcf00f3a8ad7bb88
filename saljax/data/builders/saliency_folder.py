"""``saliency_folder``: the user's own images, labels and saliency maps from a folder + CSV."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from saljax.data import registry
from saljax.data.builders import _base, _folder_csv
from saljax.data.builders._folder_csv import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    FolderDatasetError,
    FolderProblem,
    FolderRow,
)

_DESCRIPTION = """\
Saliency folder: images, labels and optional human saliency maps that the user keeps in a local
folder, described by one CSV file. Nothing is downloaded.

CSV layout (UTF-8; header row required; column names are case-insensitive; other columns are
ignored):
- `image` (required): path of a PNG/JPEG/any Pillow-readable image, absolute or relative to the
  CSV's folder.
- `label` (required): the class name. Without `class_names` in the config the classes are the
  CSV's distinct labels, sorted (and logged); with it, every label must be one of them.
- `map` (optional): path of a grayscale saliency map (black 0 = not salient, white 1 =
  salient); any size with the same aspect ratio as its image. Blank = no map.
- `group` (optional): a non-negative integer, or one of the config's `group_names`
  (attack type, generator, site ...). Blank = 0.
- `split` (optional): the split the row belongs to (`train`, `validation`, `test`, or any
  name made of letters, digits and underscores, starting with a letter). Blank rows are split
  at random (stratified by class, seeded) by `validation_fraction` / `test_fraction`, the rest
  going to `train`.

How it is made: images are decoded with Pillow, EXIF orientation applied, converted to RGB
(`channels=3`) or grayscale (`channels=1`) and resized (bilinear, aspect ratio not kept) to
`image_size`. Unless given, `channels` is 1 when every image is grayscale and 3 otherwise, and
`image_size` is the images' common size (images of several sizes need an explicit `image_size`);
resizing any image by more than 2x in height or width is announced in the log. Maps are read as
grayscale, scaled to [0, 1] (8-bit by 255, 16-bit by 65535) and resized (bilinear) to the same
size.

Checks, all before anything is written, each problem one line naming the file, the CSV row and
what was expected: a missing or unreadable file, a byte that is not UTF-8, a label that is not
declared, a map whose aspect ratio differs from its image's (beyond `aspect_tolerance`), a bad
group or split, an empty CSV or missing columns, and data leakage: the same image (by path or by
file content) in two splits or under two labels, or listed twice with different maps. Exact
duplicate rows are dropped with a warning giving their count.

What the maps mean: `saliency_map` holds whatever the user's annotators marked (1 = evidence the
model should use). Rows without a map get `has_map` False and an all-zero `saliency_map`, which
the saliency losses ignore. `group` is 0 unless the CSV gives one.

The prepared copy records the CSV's sha256; building again after the CSV changed stops with a
message saying so, and `rebuild=True` regenerates it (the new copy replaces the old one only once
it is complete).
"""

_MANUAL_INSTRUCTIONS = """\
Put a CSV file (default name `saliency.csv`, config field `csv_path`) with columns
`image,label[,map][,group][,split]` in a folder together with the images and maps it refers to,
and pass that folder as `manual_dir` (`saljax.data.build(..., manual_dir=...)`,
`tfds.download.DownloadConfig(manual_dir=...)`), or give an absolute `csv_path` in the config.
"""

__all__ = [
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "FolderDatasetError",
    "FolderProblem",
    "FolderRow",
    "SaliencyFolder",
    "SaliencyFolderConfig",
    "assign_splits",
    "load_image",
    "load_map",
    "read_rows",
]


@dataclasses.dataclass(eq=False)
class SaliencyFolderConfig(tfds.core.BuilderConfig):
    """Parameters of ``saliency_folder``. Explicit values always win over inferred ones.

    Attributes:
      csv_path: the CSV file; absolute, or relative to the manual dir.
      class_names: the classes, the label index being the position here; empty: the CSV's
        distinct labels, sorted (``saljax.data.build`` fills them in).
      image_size: output size, an int (square) or (height, width); None: the images' common size.
      channels: 3 (RGB) or 1 (grayscale); None: 1 if every image is grayscale, else 3.
      group_names: optional names for the ``group`` column (its values may then be names).
      validation_fraction: share of rows with a blank ``split`` that go to ``validation``.
      test_fraction: share of rows with a blank ``split`` that go to ``test``.
      aspect_tolerance: largest relative difference between the aspect ratios of a map and its
        image.
      seed: seeds the random split of rows with a blank ``split``.
    """

    csv_path: str = "saliency.csv"
    class_names: tuple[str, ...] = ()
    image_size: int | tuple[int, int] | None = None
    channels: int | None = None
    group_names: tuple[str, ...] = ()
    validation_fraction: float = 0.0
    test_fraction: float = 0.0
    aspect_tolerance: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        self.csv_path = os.fspath(self.csv_path)
        self.class_names = tuple(str(c) for c in self.class_names)
        self.group_names = tuple(str(g) for g in self.group_names)
        _base.check(
            not self.class_names or (len(self.class_names) >= 2 and len(set(self.class_names)) == len(self.class_names)),
            "class_names", "empty (inferred) or at least two distinct class names", self.class_names,
        )
        _base.check(len(set(self.group_names)) == len(self.group_names), "group_names", "distinct names",
                    self.group_names)
        if self.image_size is not None and not isinstance(self.image_size, int):
            size = tuple(self.image_size)
            _base.check(len(size) == 2, "image_size", "a positive int or a (height, width) pair", self.image_size)
            self.image_size = (int(size[0]), int(size[1]))
        if self.image_size is not None:
            height, width = self.height_width
            _base.check(height >= 1 and width >= 1, "image_size", "a positive int or a (height, width) pair",
                        self.image_size)
        _base.check(self.channels in (None, 1, 3), "channels", "1, 3 or None (inferred)", self.channels)
        _base.check_fraction(self.validation_fraction, "validation_fraction")
        _base.check_fraction(self.test_fraction, "test_fraction")
        _base.check(self.validation_fraction + self.test_fraction <= 1.0, "validation_fraction + test_fraction",
                    "at most 1", self.validation_fraction + self.test_fraction)
        _base.check(self.aspect_tolerance >= 0, "aspect_tolerance", "non-negative", self.aspect_tolerance)
        _base.check_count(self.seed, "seed", minimum=0)

    @property
    def height_width(self) -> tuple[int, int]:
        """(height, width) of the stored images.

        Raises:
          ValueError: ``image_size`` is still None (not inferred yet).
        """
        if self.image_size is None:
            raise ValueError("config field 'image_size' is not set; saljax.data.build infers it from the images")
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        return self.image_size[0], self.image_size[-1]

    @property
    def unresolved(self) -> tuple[str, ...]:
        """The fields still left to inference (empty once the config is complete)."""
        fields = (("class_names", not self.class_names), ("image_size", self.image_size is None),
                  ("channels", self.channels is None))
        return tuple(name for name, missing in fields if missing)


def read_rows(csv_path: str, config: SaliencyFolderConfig) -> list[FolderRow]:
    """Reads and validates every row of the CSV (see ``_folder_csv.read_rows``).

    Raises:
      FolderDatasetError: listing every problem found, if any.
    """
    return _folder_csv.read_rows(csv_path, config.class_names, config.group_names, config.aspect_tolerance)


def assign_splits(rows: Sequence[FolderRow], config: SaliencyFolderConfig) -> dict[str, list[FolderRow]]:
    """Groups rows by split; rows without one are split at random, stratified by class."""
    return _folder_csv.assign_splits(rows, len(config.class_names), config.validation_fraction,
                                     config.test_fraction, config.seed)


def load_image(path: str, config: SaliencyFolderConfig) -> np.ndarray:
    """Decodes and resizes an image; returns uint8 (H, W, channels)."""
    height, width = config.height_width
    img = _folder_csv.open_oriented(path).convert("RGB" if config.channels == 3 else "L")
    img = img.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return array if config.channels == 3 else array[:, :, None]


def load_map(path: str, config: SaliencyFolderConfig) -> np.ndarray:
    """Decodes a grayscale map, scales it to [0, 1] and resizes it; returns float32 (H, W)."""
    height, width = config.height_width
    img = _folder_csv.open_oriented(path)
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64) / 65535.0
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
    else:
        values = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    resized = Image.fromarray(values.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _csv_location(config: SaliencyFolderConfig, manual_dir: str | os.PathLike[str] | None) -> str:
    """The CSV's absolute path; a relative ``csv_path`` needs ``manual_dir``."""
    path = os.path.expanduser(config.csv_path)
    if os.path.isabs(path):
        return path
    if manual_dir is None:
        raise FolderDatasetError(path, [FolderProblem(
            None, path, "csv_path is relative, so it needs a manual_dir (the folder holding the CSV); "
            "expected manual_dir=... or an absolute csv_path")])
    return os.path.abspath(os.path.join(os.path.expanduser(os.fspath(manual_dir)), path))


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug if slug[:1].isalpha() else f"data_{slug}".rstrip("_")


@registry.register
class SaliencyFolder(_base.SaliencyDatasetBuilder):
    __doc__ = _DESCRIPTION

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Classes, channels and size inferred; leakage checks; the CSV's sha256 in the metadata.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = [
        SaliencyFolderConfig(
            name="csv",
            description="A folder described by manual_dir/saliency.csv; classes, channels and size inferred.",
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "csv"

    @classmethod
    def resolve_overrides(
        cls, base: tfds.core.BuilderConfig, overrides: dict[str, Any], manual_dir: str | os.PathLike[str] | None
    ) -> dict[str, Any]:
        """Makes ``csv_path`` absolute and fills in the fields left to inference.

        ``class_names`` (the sorted labels), ``channels`` and ``image_size`` come from the CSV and
        the image headers when not given; images resized by more than 2x are announced.

        Raises:
          FolderDatasetError: the CSV cannot be found or read, images are missing or unreadable,
            or their sizes differ and no ``image_size`` is given.
        """
        config = dataclasses.replace(base, **overrides)
        csv_path = _csv_location(config, manual_dir)
        resolved = {**overrides, "csv_path": csv_path}
        labels, headers, problems = _folder_csv.scan(csv_path)
        if problems:
            # Report every problem of every row at once, as a build would.
            names = config.class_names or tuple(sorted({label for label in labels if label}))
            _folder_csv.read_rows(csv_path, names, config.group_names, config.aspect_tolerance)
            raise FolderDatasetError(csv_path, problems)
        if not config.class_names:
            resolved["class_names"] = _folder_csv.infer_class_names(csv_path, labels)
        if config.channels is None:
            resolved["channels"] = _folder_csv.infer_channels(headers)
        size = config.image_size if config.image_size is not None else _folder_csv.infer_image_size(csv_path, headers)
        resolved["image_size"] = size
        height, width = (size, size) if isinstance(size, int) else size
        _folder_csv.announce_large_resizes(csv_path, headers, height, width)
        return resolved

    @classmethod
    def derived_config_name(cls, base: tfds.core.BuilderConfig, config: tfds.core.BuilderConfig) -> str:
        """Named after the user's data: the CSV's folder (and its file name unless ``saliency.csv``)."""
        path = os.path.abspath(os.path.expanduser(config.csv_path))
        folder, stem = os.path.basename(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]
        label = folder if stem == "saliency" else f"{folder}_{stem}"
        return f"{_slug(label)}_{_base.config_digest(config)}"

    def stale_reason(self) -> str | None:
        """Says so when the CSV changed after this copy was built (its sha256 differs)."""
        built = (self.info.metadata or {}).get("csv_sha256")
        path = self.builder_config.csv_path
        if built is None or not os.path.isabs(path) or not os.path.isfile(path):
            return None
        if _folder_csv.csv_digest(path) == built:
            return None
        return (f"the prepared copy at {self.data_path} is older than {path} (the CSV changed since it was built); "
                "expected rebuild=True (dataset.rebuild=True in a training config) to rebuild it from the CSV")

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        if config.unresolved:
            raise ValueError(
                f"saliency_folder config {config.name!r} leaves {', '.join(config.unresolved)} to inference; "
                "expected saljax.data.build (which infers them from the CSV) or explicit values")
        height, width = config.height_width
        return self._saliency_info(_DESCRIPTION, height=height, width=width, channels=config.channels,
                                   class_names=config.class_names, group_names=config.group_names or None,
                                   with_group=True, metadata=tfds.core.MetadataDict())

    def _csv_file(self, dl_manager: tfds.download.DownloadManager) -> str:
        path = os.path.expanduser(self.builder_config.csv_path)
        if os.path.isabs(path):
            return path
        try:
            manual_dir = dl_manager.manual_dir
        except (AssertionError, ValueError):
            return _csv_location(self.builder_config, None)  # raises: a relative path needs a manual_dir
        return os.fspath(epath.Path(manual_dir) / path)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config = self.builder_config
        csv_path = self._csv_file(dl_manager)
        digest = _folder_csv.csv_digest(csv_path) if os.path.isfile(csv_path) else ""
        # Validate every row before any example is yielded, so bad input writes nothing.
        rows = read_rows(csv_path, config)
        self.info.metadata["csv_sha256"] = digest
        return {split: self._generate_examples(part) for split, part in assign_splits(rows, config).items()}

    def _generate_examples(self, rows: Sequence[FolderRow]) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        height, width = config.height_width
        for row in rows:
            if row.map is not None:
                saliency, has_map = load_map(row.map, config), True
            else:
                saliency, has_map = np.zeros((height, width), np.float32), False
            yield row.row, {
                "image": load_image(row.image, config),
                "label": row.label,
                "saliency_map": saliency,
                "has_map": has_map,
                "group": row.group,
            }
