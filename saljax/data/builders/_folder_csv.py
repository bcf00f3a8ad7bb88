"""Reading and checking the CSV of a ``saliency_folder`` dataset: structure, rows, leakage, inference.

Everything here works on the CSV and the files it names; nothing depends on TFDS. Every problem
is reported as one line naming the file, the CSV row (the header is row 1) and what was expected.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

REQUIRED_COLUMNS = ("image", "label")
OPTIONAL_COLUMNS = ("map", "group", "split")
_SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Pillow modes without colour: such images are stored with one channel when channels is inferred.
_GRAY_MODES = ("1", "L", "LA", "I", "F")
# Resizing by more than this factor in height or width is announced.
RESIZE_WARNING_FACTOR = 2.0

log = logging.getLogger("saljax.data")

_NOT_FOUND = "{column} file not found; expected an existing file (a relative path is relative to the CSV's folder)"
_UNREADABLE = "{column} file unreadable ({error}); expected an image Pillow can decode"


@dataclasses.dataclass(frozen=True)
class FolderProblem:
    """One reason a folder dataset cannot be built.

    Attributes:
      row: row number in the CSV (the header is row 1), or None for the CSV as a whole.
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

    The message is one line for one problem; for several, a summary line and one line each.

    Attributes:
      csv_path: the CSV file.
      problems: every problem found, in CSV order.
    """

    def __init__(self, csv_path: str, problems: Sequence[FolderProblem]):
        self.csv_path = csv_path
        self.problems = tuple(problems)
        head = f"cannot build saliency_folder from {csv_path}"
        if len(self.problems) == 1:
            message = f"{head} (1 problem; nothing was written): {self.problems[0]}"
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            message = f"{head}: {len(self.problems)} problems; nothing was written:\n{lines}"
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class FolderRow:
    """A validated CSV row.

    Attributes:
      row: its row number in the CSV.
      image: absolute path of the image; map: of the map, or None.
      label: class index; group: group index; split: the CSV's split or None (assigned at random).
      digest: sha256 of the image file's bytes (finds the same image under two paths).
    """

    row: int
    image: str
    label: int
    map: str | None
    group: int
    split: str | None
    digest: str = ""


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What ``scan`` learns about an image without decoding it: size after EXIF rotation, mode."""

    row: int
    path: str
    height: int
    width: int
    mode: str


def csv_digest(csv_path: str) -> str:
    """sha256 of the CSV's bytes: identifies the version a dataset was built from."""
    with open(csv_path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_records(csv_path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Reads the CSV's structure: (lower-cased columns, [(row number, stripped cells by column)]).

    Blank rows are skipped; trailing blank cells may be omitted.

    Raises:
      FolderDatasetError: missing file, a byte that is not UTF-8 (naming its row), no header,
        missing required columns, no data rows, or rows with more cells than the header.
    """
    if not os.path.isfile(csv_path):
        raise FolderDatasetError(csv_path, [FolderProblem(None, csv_path, "CSV file not found")])
    with open(csv_path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        row = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise FolderDatasetError(csv_path, [FolderProblem(
            row, csv_path, f"byte 0x{data[err.start]:02x} at character {column} is not UTF-8; expected a UTF-8 CSV "
            "(re-save it as UTF-8)")]) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    expected_columns = ", ".join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    if header is None or not any(h.strip() for h in header):
        raise FolderDatasetError(csv_path, [FolderProblem(
            None, csv_path, f"the CSV is empty; expected a header row with columns {expected_columns}")])
    columns = [h.strip().lower() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise FolderDatasetError(csv_path, [FolderProblem(
            1, csv_path, f"missing required column(s) {', '.join(missing)}; the header has {', '.join(columns)}")])
    records, problems = [], []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(columns):
            problems.append(FolderProblem(
                line, csv_path, f"has {len(cells)} cells but the header has {len(columns)} columns; "
                f"expected at most {len(columns)} (quote cells that contain commas)"))
            continue
        cells = cells + [""] * (len(columns) - len(cells))
        records.append((line, {c: v.strip() for c, v in zip(columns, cells)}))
    if problems:
        raise FolderDatasetError(csv_path, problems)
    if not records:
        raise FolderDatasetError(csv_path, [FolderProblem(None, csv_path, "the CSV has no data rows")])
    return columns, records


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header only."""
    width, height = img.size
    if img.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap the axes
        width, height = height, width
    return height, width


def scan(csv_path: str) -> tuple[list[str], list[ImageHeader], list[FolderProblem]]:
    """Reads the labels and the image headers (not the pixels): what inference needs.

    Returns:
      (the label of every row, the header of every image that opens, the problems found:
      blank, missing or unreadable images).
    """
    _, records = read_records(csv_path)
    base = os.path.dirname(os.path.abspath(csv_path))
    labels, headers, problems = [], [], []
    for line, cell in records:
        labels.append(cell["label"])
        if not cell["image"]:
            problems.append(FolderProblem(line, "(blank)", "the image column is empty; expected an image path"))
            continue
        path = os.path.join(base, cell["image"])
        try:
            with Image.open(path) as img:
                height, width = _oriented_size(img)
                headers.append(ImageHeader(line, path, height, width, img.mode))
        except FileNotFoundError:
            problems.append(FolderProblem(line, path, _NOT_FOUND.format(column="image")))
        except Exception as exc:  # Pillow raises many types for unreadable files.
            problems.append(FolderProblem(line, path, _UNREADABLE.format(column="image", error=f"{type(exc).__name__}: {exc}")))
    return labels, headers, problems


def infer_class_names(csv_path: str, labels: Sequence[str]) -> tuple[str, ...]:
    """The sorted distinct labels (announced in the log: a mistyped label would become a class)."""
    names = tuple(sorted({label for label in labels if label}))
    if len(names) < 2:
        raise FolderDatasetError(csv_path, [FolderProblem(
            None, csv_path, f"the label column holds {list(names)}; expected at least two classes")])
    log.warning("saliency_folder: class_names inferred from %s (sorted labels): %s", csv_path, list(names))
    return names


def infer_channels(headers: Sequence[ImageHeader]) -> int:
    """1 when every image is grayscale, else 3."""
    return 1 if all(h.mode in _GRAY_MODES or h.mode.startswith("I;16") for h in headers) else 3


def infer_image_size(csv_path: str, headers: Sequence[ImageHeader]) -> int | tuple[int, int]:
    """The images' common size (an int when square); mixed sizes need an explicit ``image_size``."""
    sizes: dict[tuple[int, int], ImageHeader] = {}
    for h in headers:
        sizes.setdefault((h.height, h.width), h)
    if not sizes:
        raise FolderDatasetError(csv_path, [FolderProblem(None, csv_path, "no image could be read to infer image_size")])
    if len(sizes) > 1:
        examples = ", ".join(f"row {h.row}: {h.width}x{h.height}" for h in list(sizes.values())[:3])
        raise FolderDatasetError(csv_path, [FolderProblem(
            None, csv_path, f"the images have {len(sizes)} different sizes ({examples}, ...); expected one size, "
            "or set image_size (an int or (height, width)) to resize them all")])
    (height, width), = sizes
    return height if height == width else (height, width)


def announce_large_resizes(csv_path: str, headers: Sequence[ImageHeader], height: int, width: int) -> int:
    """Logs a warning when images are resized by more than 2x in either direction; returns their count."""
    def factor(h: ImageHeader) -> float:
        return max(height / h.height, h.height / height, width / h.width, h.width / width)

    large = [h for h in headers if factor(h) > RESIZE_WARNING_FACTOR]
    if large:
        h = large[0]
        log.warning("saliency_folder: %d image(s) of %s are resized by more than %gx in height or width "
                    "(e.g. row %d: %dx%d -> %dx%d, width x height)", len(large), csv_path, RESIZE_WARNING_FACTOR,
                    h.row, h.width, h.height, width, height)
    return len(large)


def _open_file(path: str) -> tuple[Image.Image, str]:
    """Decodes the whole file (so truncated files fail here), applies EXIF orientation; returns it and its sha256."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return ImageOps.exif_transpose(img), hashlib.sha256(data).hexdigest()


def open_oriented(path: str) -> Image.Image:
    """Decodes a whole image file and applies its EXIF orientation."""
    return _open_file(path)[0]


def read_rows(
    csv_path: str, class_names: Sequence[str], group_names: Sequence[str], aspect_tolerance: float
) -> list[FolderRow]:
    """Reads and validates every row, opening every image and map once, then checks for leakage.

    Exact duplicate rows are dropped (see ``check_duplicates``).

    Raises:
      FolderDatasetError: listing every problem found, if any.
    """
    _, records = read_records(csv_path)
    base = os.path.dirname(os.path.abspath(csv_path))
    rows, problems = [], []
    for line, cell in records:
        row, row_problems = _validate_row(line, cell, base, class_names, group_names, aspect_tolerance)
        problems += row_problems
        if row is not None:
            rows.append(row)
    if problems:
        raise FolderDatasetError(csv_path, problems)
    rows, problems = check_duplicates(rows, class_names)
    if problems:
        raise FolderDatasetError(csv_path, problems)
    return rows


def _validate_row(
    line: int, cell: dict[str, str], base: str, class_names: Sequence[str], group_names: Sequence[str],
    aspect_tolerance: float,
) -> tuple[FolderRow | None, list[FolderProblem]]:
    problems: list[FolderProblem] = []

    def check_file(name: str, column: str) -> tuple[str, Image.Image | None, str]:
        path = os.path.join(base, name)
        if not os.path.isfile(path):
            problems.append(FolderProblem(line, path, _NOT_FOUND.format(column=column)))
            return path, None, ""
        try:
            return (path, *_open_file(path))
        except Exception as exc:  # Pillow raises many types for unreadable files.
            problems.append(FolderProblem(line, path, _UNREADABLE.format(column=column, error=f"{type(exc).__name__}: {exc}")))
            return path, None, ""

    image_path, image, digest = "", None, ""
    if not cell["image"]:
        problems.append(FolderProblem(line, "(blank)", "the image column is empty; expected an image path"))
    else:
        image_path, image, digest = check_file(cell["image"], "image")

    label = cell["label"]
    if label not in class_names:
        problems.append(FolderProblem(
            line, image_path or "(blank)", f"label {label!r} is not one of the declared class_names {list(class_names)}"))

    map_path = None
    if cell.get("map"):
        map_path, saliency, _ = check_file(cell["map"], "map")
        if image is not None and saliency is not None:
            (wi, hi), (wm, hm) = image.size, saliency.size
            if abs((wm / hm) / (wi / hi) - 1.0) > aspect_tolerance:
                problems.append(FolderProblem(
                    line, map_path, f"map is {wm}x{hm} (aspect {wm / hm:.3f}) but its image {image_path} is "
                    f"{wi}x{hi} (aspect {wi / hi:.3f}); expected the same aspect ratio (within aspect_tolerance "
                    f"{aspect_tolerance})"))

    group = 0
    if cell.get("group"):
        raw = cell["group"]
        if raw in group_names:
            group = list(group_names).index(raw)
        elif re.fullmatch(r"\d+", raw):
            group = int(raw)
            if group_names and group >= len(group_names):
                problems.append(FolderProblem(
                    line, image_path, f"group {group} is out of range; expected an index below {len(group_names)}, "
                    f"the number of group_names"))
        else:
            expected = "a non-negative integer" + (f" or one of group_names {list(group_names)}" if group_names else "")
            problems.append(FolderProblem(line, image_path, f"group {raw!r} is not {expected}"))

    split = cell.get("split") or None
    if split is not None and not _SPLIT_NAME.match(split):
        problems.append(FolderProblem(
            line, image_path,
            f"split {split!r} is not a valid split name; expected letters, digits and underscores, starting with "
            "a letter"))

    if problems:
        return None, problems
    return FolderRow(line, image_path, list(class_names).index(label), map_path, group, split, digest), []


def check_duplicates(rows: Sequence[FolderRow], class_names: Sequence[str]) -> tuple[list[FolderRow], list[FolderProblem]]:
    """Finds data leakage and conflicting duplicates; drops duplicate rows.

    - The same image (same path, or the same bytes under another path) under two labels, or in two
      different explicit splits: an error (leakage between splits or a contradictory label).
    - The same image path listed again with a different map or group: an error (which one holds?).
    - Duplicate rows (same image path, label, map and group; the same split or a blank one): a
      warning with their count; only the first is kept (taking the explicit split if the first
      left it blank). They cannot leak or contradict, and CSVs concatenated from several sources
      often repeat rows; keeping one avoids counting an image twice.
    - The same bytes under two paths with the same label and split: both kept, with a warning.
      Rows with a blank split that show an image also placed in an explicit split follow it (see
      ``assign_splits``), so random splitting cannot leak either.

    Returns:
      (the rows to keep, in CSV order; the problems).
    """
    kept: list[FolderRow] = []
    index_by_path: dict[str, int] = {}
    index_by_digest: dict[str, int] = {}
    problems: list[FolderProblem] = []
    dropped: list[int] = []
    same_content = 0
    for row in rows:
        at = index_by_path.get(row.image, index_by_digest.get(row.digest))
        if at is None:
            index_by_path[row.image] = index_by_digest[row.digest] = len(kept)
            kept.append(row)
            continue
        other = kept[at]
        what = "this image" if other.image == row.image else f"the same image content as {other.image}"
        if other.label != row.label:
            problems.append(FolderProblem(
                row.row, row.image, f"label {class_names[row.label]!r} but row {other.row} lists {what} with label "
                f"{class_names[other.label]!r}; expected one label per image"))
        elif other.split is not None and row.split is not None and other.split != row.split:
            problems.append(FolderProblem(
                row.row, row.image, f"split {row.split!r} but row {other.row} puts {what} in split {other.split!r}; "
                "expected each image in one split only (data leakage)"))
        elif other.image != row.image:
            same_content += 1
            index_by_path[row.image] = len(kept)
            kept.append(row)
        elif (other.map, other.group) != (row.map, row.group):
            problems.append(FolderProblem(
                row.row, row.image, f"listed again (first at row {other.row}) with a different map or group; "
                "expected one map and group per image"))
        else:
            dropped.append(row.row)
            if other.split is None and row.split is not None:
                kept[at] = dataclasses.replace(other, split=row.split)
    if dropped:
        log.warning("saliency_folder: %d duplicate row(s) dropped (rows %s)", len(dropped),
                    ", ".join(str(r) for r in dropped[:10]) + (", ..." if len(dropped) > 10 else ""))
    if same_content:
        log.warning("saliency_folder: %d image(s) have the same content as another file with the same label; "
                    "both are kept", same_content)
    return kept, problems


def assign_splits(
    rows: Sequence[FolderRow], num_classes: int, validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[FolderRow]]:
    """Groups rows by split; rows without one are split at random, stratified by class, seeded.

    Rows that show the same image (by content) form one unit: a unit with an explicit split
    takes it for all its rows; the other units are assigned whole, so an image never lands in two
    splits.
    """
    explicit = {r.digest: r.split for r in rows if r.split is not None}
    out: dict[str, list[FolderRow]] = {}
    units: dict[str, list[FolderRow]] = {}
    for row in rows:
        split = row.split or explicit.get(row.digest)
        if split is not None:
            out.setdefault(split, []).append(row)
        else:
            units.setdefault(row.digest or f"row{row.row}", []).append(row)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    for label in range(num_classes):
        pool = [unit for unit in units.values() if unit[0].label == label]
        order = [pool[i] for i in rng.permutation(len(pool))]
        n_test = round(test_fraction * len(order))
        n_val = min(round(validation_fraction * len(order)), len(order) - n_test)
        for name, part in (("test", order[:n_test]), ("validation", order[n_test : n_test + n_val]),
                           ("train", order[n_test + n_val :])):
            for unit in part:
                out.setdefault(name, []).extend(unit)
    return out
