"""``synthetic_distractor``: a shape inside a lesion decides the class; a corner bar misleads."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from saljax.data import registry
from saljax.data.builders import _base, _render

_DESCRIPTION = """\
Synthetic distractor: a binary task in the spirit of GradMask's follow-up experiment, where a
model that uses the evidence outside the lesion fails at test time.

How it is made (grayscale, `image_size` x `image_size`, values rendered in [0, 1] then uint8):
- Background: a random base level (0.15..0.30), low-frequency texture and white noise
  (`noise_std`).
- Lesion: a disc of radius 0.20..0.28 x image_size placed at random in the lower 70% of the image,
  slightly brighter than the background.
- Class evidence, inside the lesion near its centre: class 1 ("cross") is a plus sign, class 0
  ("ring") an annulus; random size (0.45..0.70 x lesion radius), position jitter and contrast.
- Distractor, outside the lesion: a bright horizontal bar in the top-left corner (encodes 0) or the
  top-right corner (encodes 1). In train and validation it encodes the true label (with
  probability `distractor_agreement`, 1.0 by default); in test it encodes the opposite label.
  A model that reads the bar scores near 0 accuracy on test. With `flip_validation` (the
  `flipped_validation` config) validation is flipped like test, as the follow-up paper's
  validation set is, so that selecting a checkpoint on validation can see the shortcut.

What the maps mean: `saliency_map` is the lesion disc (1 inside, 0 outside): the region that holds
the class evidence. GradMask penalises input gradients outside it. `has_map` is True unless
`map_fraction` < 1 withheld the map of a training example (then the map is all zeros).
"""

_CITATION = """\
@inproceedings{simpson2019gradmask,
  title = {GradMask: Reduce Overfitting by Regularizing Saliency},
  author = {Simpson, Becks and Dutil, Francis and Bengio, Yoshua and Cohen, Joseph Paul},
  booktitle = {International Conference on Medical Imaging with Deep Learning (MIDL),
               Extended Abstract Track},
  year = {2019}
}
"""

_SPLITS = ("train", "validation", "test")
CLASS_NAMES = ("ring", "cross")


@dataclasses.dataclass(eq=False)
class SyntheticDistractorConfig(tfds.core.BuilderConfig):
    """Parameters of ``synthetic_distractor``.

    Attributes:
      image_size: side of the square images, pixels.
      num_train, num_validation, num_test: examples per split (classes alternate, so balanced).
      noise_std: standard deviation of the white background noise (intensity in [0, 1]).
      distractor_agreement: probability that the bar encodes the true label in train/validation.
      map_fraction: share of training examples that keep their map (``has_map``).
      flip_validation: the bar encodes the opposite label in validation too (as in test).
      seed: seeds every random choice.
    """

    image_size: int = 64
    num_train: int = 800
    num_validation: int = 200
    num_test: int = 400
    noise_std: float = 0.08
    distractor_agreement: float = 1.0
    map_fraction: float = 1.0
    flip_validation: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _base.check_count(self.image_size, "image_size", minimum=16)
        for name in ("num_train", "num_validation", "num_test"):
            _base.check_count(getattr(self, name), name)
        _base.check(self.noise_std >= 0, "noise_std", "non-negative", self.noise_std)
        _base.check_fraction(self.distractor_agreement, "distractor_agreement")
        _base.check_fraction(self.map_fraction, "map_fraction")
        _base.check_count(self.seed, "seed", minimum=0)


def render_example(
    label: int, split: str, index: int, config: SyntheticDistractorConfig
) -> dict[str, Any]:
    """Renders one example.

    Returns:
      image (S, S, 1) uint8, saliency_map (S, S) float32 (the lesion), label, has_map.
    """
    size = config.image_size
    rng = _render.example_rng(config.seed, 1 + _SPLITS.index(split), index)

    image = rng.uniform(0.15, 0.30) + 0.06 * _render.smooth_noise(rng, size, max(2, size // 8))

    radius = rng.uniform(0.20, 0.28) * size
    cx = rng.uniform(radius + 1, size - radius - 1)
    cy = rng.uniform(max(0.30 * size + radius, 0.5 * size), size - radius - 1)
    lesion = _render.disc_mask(size, cy, cx, radius)
    image = image + lesion * rng.uniform(0.05, 0.15)

    # Class evidence: a cross (1) or a ring (0), centred near the lesion centre.
    arm = rng.uniform(0.45, 0.70) * radius
    half_width = max(0.75, arm / 3.0)
    sy = cy + rng.uniform(-0.2, 0.2) * (radius - arm)
    sx = cx + rng.uniform(-0.2, 0.2) * (radius - arm)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = yy - sy, xx - sx
    if label == 1:
        shape = ((np.abs(dy) <= half_width) & (np.abs(dx) <= arm)) | (
            (np.abs(dx) <= half_width) & (np.abs(dy) <= arm)
        )
    else:
        dist = np.sqrt(dy**2 + dx**2)
        shape = np.abs(dist - arm) <= half_width
    image = image + (shape & lesion) * rng.uniform(0.25, 0.45)

    # Distractor bar in a top corner; its side encodes `code`.
    if split == "test" or (split == "validation" and config.flip_validation):
        code = 1 - label
    else:
        code = label if rng.random() < config.distractor_agreement else 1 - label
    bar_h, bar_w = max(1, round(size / 16)), max(2, round(size / 4))
    margin = max(1, round(size / 32))
    x0 = margin if code == 0 else size - margin - bar_w
    image[margin : margin + bar_h, x0 : x0 + bar_w] = rng.uniform(0.70, 0.95)

    image = image + rng.normal(0.0, config.noise_std, size=image.shape)
    keep_map = split != "train" or rng.random() < config.map_fraction
    saliency = lesion.astype(np.float32) if keep_map else np.zeros((size, size), np.float32)
    return {
        "image": _render.to_uint8(image)[:, :, None],
        "label": int(label),
        "saliency_map": saliency,
        "has_map": bool(keep_map),
    }


@registry.register
class SyntheticDistractor(_base.SaliencyDatasetBuilder):
    __doc__ = _DESCRIPTION

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SyntheticDistractorConfig(
            name="default", description="64x64, 800/200/400 examples, distractor flipped at test."
        ),
        SyntheticDistractorConfig(
            name="flipped_validation",
            flip_validation=True,
            description="64x64, 800/200/400 examples, distractor flipped at validation and test.",
        ),
        SyntheticDistractorConfig(
            name="small",
            num_train=64,
            description="64x64 with 64 training examples (GradMask's smallest nsamples).",
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self._saliency_info(_DESCRIPTION, height=size, width=size, channels=1, class_names=CLASS_NAMES,
                                   citation=_CITATION)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # Fully synthetic.
        config = self.builder_config
        sizes = {
            "train": config.num_train,
            "validation": config.num_validation,
            "test": config.num_test,
        }
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(n):
            yield i, render_example(i % 2, split, i, self.builder_config)
