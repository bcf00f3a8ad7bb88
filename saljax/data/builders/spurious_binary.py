"""``spurious_binary``: RGB bona fide vs attack task, spurious cue, open-set attack types."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from saljax.data import registry
from saljax.data.builders import _base, _render

_DESCRIPTION = """\
Spurious binary: an RGB presentation-attack-style task for the CAM-based methods (CYBORG,
Divisive Decisions), with human maps, a spurious cue in training, and closed-set and open-set
test splits (leave-one-attack-type-out, as in iris presentation attack detection).

How it is made (`image_size` x `image_size` x 3, values rendered in [0, 1] then uint8):
- Background: a random colour with low-frequency texture and white noise.
- Object: a disc (radius 0.25..0.35 x image_size) at a random position, filled with another
  random colour and its own texture. The object holds all class evidence.
- Class 0 ("bona_fide", group 0): the object as is.
- Class 1 ("attack"): an artifact pattern is blended into the object, rendered by one of four
  attack types (the `group`): 1 "checker" (checkerboard), 2 "stripes" (oriented sinusoidal
  stripes), 3 "dots" (a dot lattice), 4 "grain" (pixel-level binary noise); random period,
  orientation and strength (`artifact_strength` range).
- Spurious cue: a small magenta square in a corner outside the object. In train and validation
  it is present with probability `cue_correlation` (0.95) when the label is 1 and
  1 - `cue_correlation` when it is 0. In both test splits it is present with probability 0.5,
  independent of the label.
- Splits: `train` and `validation` (cue correlated; attack types not in `holdout_groups`);
  `test_closed` (cue broken; the training attack types); `test_open` (cue broken; bona fide
  images and the held-out attack types only, never seen in training). Classes are balanced and
  the attack types of a split appear equally often.

What the maps mean: `saliency_map` is the object disc (1 inside, 0 outside), the region a human
marks as holding the evidence for either class; the spurious cue always lies outside it.
`has_map` is True unless `map_fraction` < 1 withheld the map of a training example (then the map
is all zeros). `group` is the attack type (0 for bona fide).
"""

_CITATION = """\
@inproceedings{boyd2023cyborg,
  title = {CYBORG: Blending Human Saliency Into the Loss Improves Deep Learning-Based Synthetic
           Face Detection},
  author = {Boyd, Aidan and Tinsley, Patrick and Bowyer, Kevin W. and Czajka, Adam},
  booktitle = {WACV},
  year = {2023}
}
"""

CLASS_NAMES = ("bona_fide", "attack")
GROUP_NAMES = ("bona_fide", "checker", "stripes", "dots", "grain")
_SPLITS = ("train", "validation", "test_closed", "test_open")
_CUE_COLOUR = np.array([1.0, 0.0, 1.0])


@dataclasses.dataclass(eq=False)
class SpuriousBinaryConfig(tfds.core.BuilderConfig):
    """Parameters of ``spurious_binary``.

    Attributes:
      image_size: side of the square RGB images, pixels.
      num_train, num_validation, num_test_closed, num_test_open: examples per split.
      cue_correlation: P(cue present | y=1) = P(cue absent | y=0) in train and validation.
      holdout_groups: attack types (1..4) kept out of train/validation/test_closed and used
        only in test_open.
      artifact_strength: (low, high) range of the artifact amplitude.
      map_fraction: share of training examples that keep their map (``has_map``).
      seed: seeds every random choice.
    """

    image_size: int = 64
    num_train: int = 1000
    num_validation: int = 200
    num_test_closed: int = 400
    num_test_open: int = 400
    cue_correlation: float = 0.95
    holdout_groups: tuple[int, ...] = (4,)
    artifact_strength: tuple[float, float] = (0.10, 0.22)
    map_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _base.check_count(self.image_size, "image_size", minimum=16)
        for name in ("num_train", "num_validation", "num_test_closed", "num_test_open"):
            _base.check_count(getattr(self, name), name)
        _base.check_fraction(self.cue_correlation, "cue_correlation")
        self.holdout_groups = tuple(int(g) for g in self.holdout_groups)
        attack_types = set(range(1, len(GROUP_NAMES)))
        _base.check(
            bool(self.holdout_groups)
            and set(self.holdout_groups) < attack_types
            and len(set(self.holdout_groups)) == len(self.holdout_groups),
            "holdout_groups",
            f"a non-empty proper subset of {sorted(attack_types)} without repeats",
            self.holdout_groups,
        )
        low, high = (float(s) for s in self.artifact_strength)
        self.artifact_strength = (low, high)
        _base.check(
            len(self.artifact_strength) == 2
            and 0 <= self.artifact_strength[0] <= self.artifact_strength[1],
            "artifact_strength",
            "a (low, high) pair with 0 <= low <= high",
            self.artifact_strength,
        )
        _base.check_fraction(self.map_fraction, "map_fraction")
        _base.check_count(self.seed, "seed", minimum=0)

    @property
    def training_groups(self) -> tuple[int, ...]:
        """Attack types seen in train, validation and test_closed."""
        return tuple(g for g in range(1, len(GROUP_NAMES)) if g not in self.holdout_groups)


def artifact_pattern(group: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The (size, size) artifact of attack type ``group``, values in [-1, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = max(2.0, size * rng.uniform(0.06, 0.11))
    phase_y, phase_x = rng.uniform(0, period, size=2)
    if group == 1:  # checker
        cells = np.floor((yy + phase_y) / (period / 2)) + np.floor((xx + phase_x) / (period / 2))
        return np.where(cells % 2 == 0, 1.0, -1.0)
    if group == 2:  # stripes
        theta = rng.uniform(0, np.pi)
        return np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    if group == 3:  # dots
        lattice = np.cos(2 * np.pi * (xx + phase_x) / period) + np.cos(
            2 * np.pi * (yy + phase_y) / period
        )
        return np.where(lattice > 1.0, 1.0, -0.3)
    if group == 4:  # grain
        return rng.choice(np.array([-1.0, 1.0]), size=(size, size))
    raise ValueError(f"unknown attack type {group}; expected 1..{len(GROUP_NAMES) - 1}")


def _corner_patch(object_mask: np.ndarray, patch: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner (y, x) of a patch in an image corner that does not touch the object."""
    size = object_mask.shape[0]
    margin = max(1, size // 32)
    options = [
        (y, x)
        for y in (margin, size - margin - patch)
        for x in (margin, size - margin - patch)
        if not object_mask[y : y + patch, x : x + patch].any()
    ]
    # The object disc is too small to touch all four corners; fall back defensively anyway.
    if not options:
        options = [(margin, margin)]
    return options[int(rng.integers(len(options)))]


def render_example(
    label: int,
    group: int,
    split: str,
    index: int,
    config: SpuriousBinaryConfig,
) -> dict[str, Any]:
    """Renders one example.

    Returns:
      image (S, S, 3) uint8, saliency_map (S, S) float32 (the object), label, has_map, group.
    """
    size = config.image_size
    rng = _render.example_rng(config.seed, 1 + _SPLITS.index(split), index)
    cells = max(2, size // 8)

    background = rng.uniform(0.15, 0.45, size=3)
    image = background + 0.08 * _render.smooth_noise(rng, size, cells, channels=3)

    radius = rng.uniform(0.25, 0.35) * size
    cy, cx = rng.uniform(radius + 1, size - radius - 1, size=2)
    obj = _render.disc_mask(size, cy, cx, radius)
    colour = rng.uniform(0.35, 0.80, size=3)
    texture = colour * (1.0 + 0.15 * _render.smooth_noise(rng, size, cells))[..., None]
    image = np.where(obj[..., None], texture, image)

    if label == 1:
        strength = rng.uniform(*config.artifact_strength)
        pattern = artifact_pattern(group, size, rng)
        image = image + (strength * pattern * obj)[..., None]

    if split in ("train", "validation"):
        agrees = rng.random() < config.cue_correlation
        cue = (label == 1) == agrees
    else:
        cue = rng.random() < 0.5
    if cue:
        patch = max(2, round(size / 8))
        y, x = _corner_patch(obj, patch, rng)
        image[y : y + patch, x : x + patch] = _CUE_COLOUR

    image = image + rng.normal(0.0, 0.03, size=image.shape)
    keep_map = split != "train" or rng.random() < config.map_fraction
    saliency = obj.astype(np.float32) if keep_map else np.zeros((size, size), np.float32)
    return {
        "image": _render.to_uint8(image),
        "label": int(label),
        "saliency_map": saliency,
        "has_map": bool(keep_map),
        "group": int(group),
    }


def _groups_for(split: str, config: SpuriousBinaryConfig) -> Sequence[int]:
    return config.holdout_groups if split == "test_open" else config.training_groups


@registry.register
class SpuriousBinary(_base.SaliencyDatasetBuilder):
    __doc__ = _DESCRIPTION

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SpuriousBinaryConfig(
            name="default",
            description="64x64 RGB, cue correlation 0.95, attack type 4 (grain) held out.",
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self._saliency_info(_DESCRIPTION, height=size, width=size, channels=3, class_names=CLASS_NAMES,
                                   group_names=GROUP_NAMES, citation=_CITATION)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Fully synthetic.
        config = self.builder_config
        sizes = {
            "train": config.num_train,
            "validation": config.num_validation,
            "test_closed": config.num_test_closed,
            "test_open": config.num_test_open,
        }
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        groups = _groups_for(split, config)
        for i in range(n):
            label = i % 2
            # Attack types cycle so that each appears equally often among the attacks.
            group = groups[(i // 2) % len(groups)] if label == 1 else 0
            yield i, render_example(label, group, split, i, config)
