"""``red_herring``: the synthetic cross-counting task of "Saliency is a possible red herring"."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from saljax.data import registry
from saljax.data.builders import _base, _render

_DESCRIPTION = """\
Red herring: the synthetic task of Viviano, Simpson, Dutil, Bengio and Cohen (2021, "Saliency is
a possible red herring when diagnosing poor generalization"), where a distractor that reveals the
label in training sits on the other side at validation and test time.

How it is made (28x28, binary: pixels are 0 or 255, one channel):
- Class 0 ("one_cross") holds ONE cross, class 1 ("two_crosses") TWO crosses. A cross is a plus
  sign of half-arm 1 or 2 (5 or 9 pixels), drawn at a random position fully inside the image.
  Two crosses never overlap or touch (their bounding boxes are at least one pixel apart) and no
  cross's mask reaches either distractor position, so the class is exactly the number of
  crosses and the map never covers the distractor (the paper's stored data lets a few crosses
  touch each other or the distractor).
- Distractor: a solid rectangle of 2 rows x 3 columns at rows 23-24 and columns 3-5 (left) for
  class 0, columns 22-24 (right) for class 1.
- Classes alternate (example i has class i mod 2), so every split is balanced: train 500
  (250 per class), validation 128, test 128 by default. Each split has its own seed
  (`train_seed`, `validation_seed`, `test_seed`).
- Validation and test images AND maps are flipped left-right, so the distractor sits on the
  other side (class 0 right, class 1 left): a model that reads it scores near 0 AUC there, and
  checkpoints selected on validation already see the shift.

What the maps mean: `saliency_map` is 1 on the crosses dilated as the paper's code does it: a
Gaussian blur (standard deviation `mask_sigma` = 0.5 pixel, kernel truncated at radius
int(4 * mask_sigma + 0.5) = 2, SciPy's default) followed by `> 0`, i.e. the crosses grown by two
pixels (a square neighbourhood); 0 elsewhere, in particular on the distractor. `has_map` is
True unless `map_fraction` < 1 withheld the map of a training example (then the map is all
zeros).

Published test AUCs (ResNet-18, mean +- std over 10 seeds): baseline 0.00, ActDiff 1.00,
GradMask 0.76, RRR 0.49.
"""

_CITATION = """\
@inproceedings{viviano2021saliency,
  title = {Saliency is a Possible Red Herring When Diagnosing Poor Generalization},
  author = {Viviano, Joseph D. and Simpson, Becks and Dutil, Francis and Bengio, Yoshua and
            Cohen, Joseph Paul},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2021}
}
"""

_SPLITS = ("train", "validation", "test")
CLASS_NAMES = ("one_cross", "two_crosses")
IMAGE_SIZE = 28
# Distractor rectangle: rows [23, 24], columns [3, 5] (class 0) or [22, 24] (class 1), inclusive.
DISTRACTOR_ROWS = (23, 25)
DISTRACTOR_COLUMNS = ((3, 6), (22, 25))
_MAX_TRIES = 10_000


@dataclasses.dataclass(eq=False)
class RedHerringConfig(tfds.core.BuilderConfig):
    """Parameters of ``red_herring``.

    Attributes:
      num_train, num_validation, num_test: examples per split (classes alternate, so balanced).
      train_seed, validation_seed, test_seed: each split's own seed.
      mask_sigma: standard deviation (pixels) of the Gaussian blur that dilates the cross mask
        (0.5, the paper's ``blur``, grows the crosses by 2 pixels).
      map_fraction: share of training examples that keep their map (``has_map``).
    """

    num_train: int = 500
    num_validation: int = 128
    num_test: int = 128
    train_seed: int = 0
    validation_seed: int = 1
    test_seed: int = 2
    mask_sigma: float = 0.5
    map_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_validation", "num_test"):
            _base.check_count(getattr(self, name), name, minimum=2)
        for name in ("train_seed", "validation_seed", "test_seed"):
            _base.check_count(getattr(self, name), name, minimum=0)
        _base.check(0.0 < float(self.mask_sigma) <= 1.0, "mask_sigma", "a number in (0, 1]", self.mask_sigma)
        _base.check_fraction(self.map_fraction, "map_fraction")


def distractor_mask(label: int) -> np.ndarray:
    """Boolean (28, 28) mask of the distractor rectangle of ``label`` before any flip."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    (r0, r1), (c0, c1) = DISTRACTOR_ROWS, DISTRACTOR_COLUMNS[int(label)]
    mask[r0:r1, c0:c1] = True
    return mask


def cross_mask(cy: int, cx: int, half_arm: int) -> np.ndarray:
    """Boolean (28, 28) plus sign centred at (cy, cx) with arms of ``half_arm`` pixels."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[cy - half_arm : cy + half_arm + 1, cx] = True
    mask[cy, cx - half_arm : cx + half_arm + 1] = True
    return mask


def blur_radius(sigma: float) -> int:
    """Radius of the truncated Gaussian kernel: int(4 * sigma + 0.5), as SciPy's ``gaussian_filter``."""
    return int(4.0 * float(sigma) + 0.5)


def dilate_by_blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (separable, truncated at ``blur_radius(sigma)``, zero padding) then ``> 0``.

    Every kernel weight is positive, so this equals a dilation by a square of side 2r + 1;
    computing it as the blur keeps the paper's definition.

    Args:
      mask: (H, W) boolean or {0, 1} array.
      sigma: blur standard deviation in pixels.

    Returns:
      (H, W) boolean array.
    """
    r = blur_radius(sigma)
    offsets = np.arange(-r, r + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(np.asarray(mask, dtype=np.float64), r)
    height, width = np.shape(mask)
    rows = sum(kernel[k] * padded[k : k + height, :] for k in range(2 * r + 1))
    blurred = sum(kernel[k] * rows[:, k : k + width] for k in range(2 * r + 1))
    return np.asarray(blurred > 0)


def _place_crosses(rng: np.random.Generator, count: int, sigma: float) -> list[tuple[int, int, int]]:
    """Rejection-samples ``count`` crosses (cy, cx, half_arm) that neither touch each other nor,
    with their dilated masks, either distractor position."""
    forbidden = distractor_mask(0) | distractor_mask(1)
    r = blur_radius(sigma)
    for _ in range(_MAX_TRIES):
        crosses: list[tuple[int, int, int]] = []
        for _ in range(count):
            arm = int(rng.integers(1, 3))
            cy, cx = (int(v) for v in rng.integers(arm, IMAGE_SIZE - arm, size=2))
            crosses.append((cy, cx, arm))
        apart = all(
            max(abs(a[0] - b[0]), abs(a[1] - b[1])) - a[2] - b[2] >= 2
            for i, a in enumerate(crosses) for b in crosses[i + 1 :]
        )
        # The dilation is a square of radius r, so test the crosses' grown bounding boxes cheaply.
        clear = not any(
            forbidden[max(cy - a - r, 0) : cy + a + r + 1, max(cx - a - r, 0) : cx + a + r + 1].any()
            for cy, cx, a in crosses
        )
        if apart and clear:
            return crosses
    raise RuntimeError(f"could not place {count} crosses in {_MAX_TRIES} tries")  # pragma: no cover


def render_example(label: int, split: str, index: int, config: RedHerringConfig) -> dict[str, Any]:
    """Renders one example.

    Args:
      label: 0 (one cross) or 1 (two crosses).
      split: "train" (distractor on the label's side) or "validation" / "test" (image and map
        flipped left-right).
      index: position in the split (with the split's seed, seeds the example).
      config: the builder config.

    Returns:
      image (28, 28, 1) uint8 in {0, 255}, saliency_map (28, 28) float32 in {0, 1}, label, has_map.
    """
    seed = getattr(config, f"{split}_seed")
    rng = _render.example_rng(seed, 1 + _SPLITS.index(split), index)
    crosses = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for cy, cx, arm in _place_crosses(rng, int(label) + 1, config.mask_sigma):
        crosses |= cross_mask(cy, cx, arm)
    image = crosses | distractor_mask(label)
    saliency = dilate_by_blur(crosses, config.mask_sigma)
    if split != "train":
        image, saliency = image[:, ::-1], saliency[:, ::-1]
    keep_map = split != "train" or rng.random() < config.map_fraction
    return {
        "image": np.ascontiguousarray(image, dtype=np.uint8)[:, :, None] * np.uint8(255),
        "label": int(label),
        "saliency_map": np.ascontiguousarray(saliency, dtype=np.float32) * np.float32(keep_map),
        "has_map": bool(keep_map),
    }


@registry.register
class RedHerring(_base.SaliencyDatasetBuilder):
    __doc__ = _DESCRIPTION

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: Viviano et al.'s synthetic cross-counting task."}
    BUILDER_CONFIGS = [
        RedHerringConfig(name="default", description="28x28 crosses, 500/128/128, distractor flipped at validation and test."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self._saliency_info(_DESCRIPTION, height=IMAGE_SIZE, width=IMAGE_SIZE, channels=1,
                                   class_names=CLASS_NAMES, citation=_CITATION)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Fully synthetic.
        config = self.builder_config
        sizes = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(n):
            yield i, render_example(i % 2, split, i, self.builder_config)
