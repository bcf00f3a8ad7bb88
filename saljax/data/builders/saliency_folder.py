"""``saliency_folder``: the user's own images, labels and saliency maps from a folder + CSV."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps

from saljax.data import registry
from saljax.data.builders import _base

_DESCRIPTION = """\
Saliency folder: images, labels and optional human saliency maps that the user keeps in a local
folder, described by one CSV file. Nothing is downloaded.

CSV layout (header row required; column names are case-insensitive; other columns are ignored):
- `image` (required): path of a PNG/JPEG/any Pillow-readable image, absolute or relative to the
  CSV's folder.
- `label` (required): the class name, exactly one of the config's `class_names`.
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
`image_size`. Maps are read as grayscale, scaled to [0, 1] (8-bit by 255, 16-bit by 65535) and
resized (bilinear) to the same size. Every row is checked before anything is written: a missing or
unreadable file, a label that is not declared, a map whose aspect ratio differs from its image's
(beyond `aspect_tolerance`), a bad group or split, an empty CSV or missing columns all stop the
build with one `FolderDatasetError` that lists every offending row.

What the maps mean: `saliency_map` holds whatever the user's annotators marked (1 = evidence the
model should use). Rows without a map get `has_map` False and an all-zero `saliency_map`, which
the saliency losses ignore. `group` is 0 unless the CSV gives one.
"""

_MANUAL_INSTRUCTIONS = """\
Put a CSV file (default name `saliency.csv`, config field `csv_path`) with columns
`image,label[,map][,group][,split]` in a folder together with the images and maps it refers to,
and pass that folder as `tfds.download.DownloadConfig(manual_dir=...)`, or give an absolute
`csv_path` in the config.
"""

REQUIRED_COLUMNS = ("image", "label")
OPTIONAL_COLUMNS = ("map", "group", "split")
_SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class FolderProblem:
    """One reason a folder dataset cannot be built.

    Attributes:
      row: line number in the CSV (the header is line 1), or None for a problem with the CSV as
        a whole.
      file: the file concerned (image, map or the CSV itself).
      reason: what is wrong and what was expected.
    """

    row: int | None
    file: str
    reason: str

    def __str__(self) -> str:
        where = "CSV" if self.row is None else f"row {self.row}"
        return f"{where}: {self.file}: {self.reason}"


class FolderDatasetError(ValueError):
    """Raised before anything is written when a folder dataset's CSV or files are unusable.

    Attributes:
      csv_path: the CSV file.
      problems: every problem found, in CSV order.
    """

    def __init__(self, csv_path: str, problems: Sequence[FolderProblem]):
        self.csv_path = csv_path
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(
            f"cannot build saliency_folder from {csv_path}: {len(self.problems)} problem(s); "
            f"nothing was written:\n{lines}"
        )


@dataclasses.dataclass(eq=False)
class SaliencyFolderConfig(tfds.core.BuilderConfig):
    """Parameters of ``saliency_folder``.

    Attributes:
      csv_path: the CSV file; absolute, or relative to the manual dir.
      class_names: the classes; the ``label`` column must hold one of these names. The label
        index is the position in this tuple.
      image_size: output size, an int (square) or (height, width).
      channels: 3 (RGB) or 1 (grayscale).
      group_names: optional names for the ``group`` column (its values may then be names).
      validation_fraction: share of rows with a blank ``split`` that go to ``validation``.
      test_fraction: share of rows with a blank ``split`` that go to ``test``.
      aspect_tolerance: largest relative difference between the aspect ratios of a map and its
        image.
      seed: seeds the random split of rows with a blank ``split``.
    """

    csv_path: str = "saliency.csv"
    class_names: tuple[str, ...] = ("0", "1")
    image_size: int | tuple[int, int] = 224
    channels: int = 3
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
            len(self.class_names) >= 2 and len(set(self.class_names)) == len(self.class_names),
            "class_names",
            "at least two distinct class names",
            self.class_names,
        )
        _base.check(
            len(set(self.group_names)) == len(self.group_names),
            "group_names",
            "distinct names",
            self.group_names,
        )
        if not isinstance(self.image_size, int):
            self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]  # checked below
        height, width = self.height_width
        _base.check(
            height >= 1
            and width >= 1
            and (isinstance(self.image_size, int) or len(self.image_size) == 2),
            "image_size",
            "a positive int or a (height, width) pair",
            self.image_size,
        )
        _base.check(self.channels in (1, 3), "channels", "1 or 3", self.channels)
        _base.check_fraction(self.validation_fraction, "validation_fraction")
        _base.check_fraction(self.test_fraction, "test_fraction")
        _base.check(
            self.validation_fraction + self.test_fraction <= 1.0,
            "validation_fraction + test_fraction",
            "at most 1",
            self.validation_fraction + self.test_fraction,
        )
        _base.check(
            self.aspect_tolerance >= 0, "aspect_tolerance", "non-negative", self.aspect_tolerance
        )
        _base.check_count(self.seed, "seed", minimum=0)

    @property
    def height_width(self) -> tuple[int, int]:
        """(height, width) of the stored images."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        return self.image_size[0], self.image_size[-1]


@dataclasses.dataclass(frozen=True)
class FolderRow:
    """A validated CSV row."""

    row: int
    image: str
    label: int
    map: str | None
    group: int
    split: str | None


def _open_oriented(path: str) -> Image.Image:
    """Decodes the whole file (so truncated files fail here) and applies EXIF orientation."""
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def read_rows(csv_path: str, config: SaliencyFolderConfig) -> list[FolderRow]:
    """Reads and validates every row of the CSV, opening every image and map once.

    Raises:
      FolderDatasetError: listing every problem found, if any.
    """
    problems: list[FolderProblem] = []
    if not os.path.isfile(csv_path):
        raise FolderDatasetError(csv_path, [FolderProblem(None, csv_path, "CSV file not found")])
    base = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise FolderDatasetError(
                csv_path,
                [
                    FolderProblem(
                        None,
                        csv_path,
                        "the CSV is empty; expected a header row "
                        f"with columns {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}",
                    )
                ],
            )
        columns = [h.strip().lower() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise FolderDatasetError(
                csv_path,
                [
                    FolderProblem(
                        1,
                        csv_path,
                        f"missing required column(s) {', '.join(missing)}; "
                        f"the header has {', '.join(columns)}",
                    )
                ],
            )
        records = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    if not records:
        raise FolderDatasetError(
            csv_path, [FolderProblem(None, csv_path, "the CSV has no data rows")]
        )

    rows = []
    for line, cells in records:
        if len(cells) > len(columns):
            problems.append(
                FolderProblem(
                    line,
                    csv_path,
                    f"has {len(cells)} cells but the header has {len(columns)} columns",
                )
            )
            continue
        cells = cells + [""] * (len(columns) - len(cells))  # Trailing blank cells may be omitted.
        cell = {c: v.strip() for c, v in zip(columns, cells)}
        row, row_problems = _validate_row(line, cell, base, config)
        problems += row_problems
        if row is not None:
            rows.append(row)
    if problems:
        raise FolderDatasetError(csv_path, problems)
    return rows


def _validate_row(
    line: int, cell: dict[str, str], base: str, config: SaliencyFolderConfig
) -> tuple[FolderRow | None, list[FolderProblem]]:
    problems: list[FolderProblem] = []

    def check_file(name: str, column: str) -> tuple[str, Image.Image | None]:
        path = os.path.join(base, name)
        if not os.path.isfile(path):
            problems.append(FolderProblem(line, path, f"{column} file not found"))
            return path, None
        try:
            return path, _open_oriented(path)
        except Exception as exc:  # pylint: disable=broad-except  # Pillow raises many types.
            problems.append(
                FolderProblem(line, path, f"{column} file unreadable ({type(exc).__name__}: {exc})")
            )
            return path, None

    image_path, image = "", None
    if not cell["image"]:
        problems.append(FolderProblem(line, "(blank)", "the image column is empty"))
    else:
        image_path, image = check_file(cell["image"], "image")

    label = cell["label"]
    if label not in config.class_names:
        problems.append(
            FolderProblem(
                line,
                image_path or "(blank)",
                f"label {label!r} is not one of the declared class_names "
                f"{list(config.class_names)}",
            )
        )

    map_path = None
    if cell.get("map"):
        map_path, saliency = check_file(cell["map"], "map")
        if image is not None and saliency is not None:
            (wi, hi), (wm, hm) = image.size, saliency.size
            ratio = (wm / hm) / (wi / hi)
            if abs(ratio - 1.0) > config.aspect_tolerance:
                problems.append(
                    FolderProblem(
                        line,
                        map_path,
                        f"map is {wm}x{hm} (aspect {wm / hm:.3f}) but its image {image_path} is "
                        f"{wi}x{hi} (aspect {wi / hi:.3f}); the aspect ratios must match",
                    )
                )

    group = 0
    if cell.get("group"):
        raw = cell["group"]
        if raw in config.group_names:
            group = config.group_names.index(raw)
        elif re.fullmatch(r"\d+", raw):
            group = int(raw)
            if config.group_names and group >= len(config.group_names):
                problems.append(
                    FolderProblem(
                        line,
                        image_path,
                        f"group {group} is out of range for the {len(config.group_names)} "
                        f"declared group_names",
                    )
                )
        else:
            expected = "a non-negative integer" + (
                f" or one of group_names {list(config.group_names)}" if config.group_names else ""
            )
            problems.append(FolderProblem(line, image_path, f"group {raw!r} is not {expected}"))

    split = cell.get("split") or None
    if split is not None and not _SPLIT_NAME.match(split):
        problems.append(
            FolderProblem(
                line,
                image_path,
                f"split {split!r} is not a valid split name (letters, digits and underscores, "
                "starting with a letter)",
            )
        )

    if problems:
        return None, problems
    return FolderRow(line, image_path, config.class_names.index(label), map_path, group, split), []


def assign_splits(
    rows: Sequence[FolderRow], config: SaliencyFolderConfig
) -> dict[str, list[FolderRow]]:
    """Groups rows by split; rows without one are split at random, stratified by class."""
    out: dict[str, list[FolderRow]] = {}
    for row in rows:
        if row.split is not None:
            out.setdefault(row.split, []).append(row)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    for label in range(len(config.class_names)):
        pool = [r for r in rows if r.split is None and r.label == label]
        order = [pool[i] for i in rng.permutation(len(pool))]
        n_test = int(round(config.test_fraction * len(order)))
        n_val = int(round(config.validation_fraction * len(order)))
        n_val = min(n_val, len(order) - n_test)
        for name, part in (
            ("test", order[:n_test]),
            ("validation", order[n_test : n_test + n_val]),
            ("train", order[n_test + n_val :]),
        ):
            if part:
                out.setdefault(name, []).extend(part)
    return out


def load_image(path: str, config: SaliencyFolderConfig) -> np.ndarray:
    """Decodes and resizes an image; returns uint8 (H, W, channels)."""
    height, width = config.height_width
    img = _open_oriented(path).convert("RGB" if config.channels == 3 else "L")
    img = img.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return array if config.channels == 3 else array[:, :, None]


def load_map(path: str, config: SaliencyFolderConfig) -> np.ndarray:
    """Decodes a grayscale map, scales it to [0, 1] and resizes it; returns float32 (H, W)."""
    height, width = config.height_width
    img = _open_oriented(path)
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64) / 65535.0
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
    else:
        values = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    resized = Image.fromarray(values.astype(np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


@registry.register
class SaliencyFolder(_base.SaliencyDatasetBuilder):
    __doc__ = _DESCRIPTION

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS
    BUILDER_CONFIGS = [
        SaliencyFolderConfig(
            name="binary",
            description="Labels '0' and '1', 224x224 RGB, manual_dir/saliency.csv.",
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "binary"

    @classmethod
    def resolve_overrides(
        cls, base: tfds.core.BuilderConfig, overrides: dict[str, Any], manual_dir: str | os.PathLike[str] | None
    ) -> dict[str, Any]:
        """A relative ``csv_path`` becomes absolute against ``manual_dir``."""
        if manual_dir is None:
            return overrides
        csv_path = os.fspath(overrides.get("csv_path", base.csv_path))
        if os.path.isabs(csv_path):
            return overrides
        folder = os.path.expanduser(os.fspath(manual_dir))
        return {**overrides, "csv_path": os.path.abspath(os.path.join(folder, csv_path))}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        height, width = config.height_width
        return self._saliency_info(_DESCRIPTION, height=height, width=width, channels=config.channels,
                                   class_names=config.class_names, group_names=config.group_names or None,
                                   with_group=True)

    def _csv_file(self, dl_manager: tfds.download.DownloadManager) -> str:
        path = self.builder_config.csv_path
        if os.path.isabs(path):
            return path
        try:
            manual_dir = dl_manager.manual_dir
        except (AssertionError, ValueError) as exc:
            raise FolderDatasetError(
                path,
                [
                    FolderProblem(
                        None,
                        path,
                        "csv_path is relative, so it needs a manual_dir "
                        f"(tfds.download.DownloadConfig(manual_dir=...)) that exists: {exc}",
                    )
                ],
            ) from None
        return os.fspath(epath.Path(manual_dir) / path)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config = self.builder_config
        # Validate every row before any example is yielded, so bad input writes nothing.
        rows = read_rows(self._csv_file(dl_manager), config)
        return {
            split: self._generate_examples(part)
            for split, part in assign_splits(rows, config).items()
        }

    def _generate_examples(self, rows: Sequence[FolderRow]) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        height, width = config.height_width
        for row in rows:
            if row.map is not None:
                saliency, has_map = load_map(row.map, config), True
            else:
                saliency, has_map = np.zeros((height, width), np.float32), False
            yield (
                row.row,
                {
                    "image": load_image(row.image, config),
                    "label": row.label,
                    "saliency_map": saliency,
                    "has_map": has_map,
                    "group": row.group,
                },
            )
