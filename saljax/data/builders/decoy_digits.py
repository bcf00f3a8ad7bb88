"""``decoy_digits``: the DecoyMNIST protocol of "Right for the Right Reasons" on sklearn digits."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from saljax.data import registry
from saljax.data.builders import _base, _render

_DESCRIPTION = """\
Decoy digits: the DecoyMNIST protocol of Ross, Hughes and Doshi-Velez (2017, "Right for the Right
Reasons") applied to the 1,797 real 8x8 handwritten digits bundled with scikit-learn
(`sklearn.datasets.load_digits`), so it builds offline.

How it is made:
- Digits (values 0..16) are scaled to 0..255 and upscaled to `image_size` x `image_size`
  (`interpolation`: "bilinear" by default, with half-pixel centres; or "nearest"). One channel.
- The 1,797 images are split once, stratified by class and seeded by `seed`, into
  train / validation / test (`train_fraction`, `validation_fraction`, rest test; 60/20/20 by
  default). `max_examples` keeps a class-balanced subset first (for quick experiments).
- A square decoy swatch of side max(1, round(4 * image_size / 28)) (DecoyMNIST's 4x4 at 28x28,
  scaled) is painted in a corner drawn uniformly at random. Its shade is `255 - 25 * y` in train
  and validation (it reveals the label) and `255 - 25 * r` in test, r a random digit independent
  of the label, so a model that reads the swatch fails at test time.
- The `clean` config paints no swatch.

What the maps mean: `saliency_map` is 1 everywhere except on the swatch, where it is 0; it marks
the pixels a model may use (RRR's annotation A is 1 - map). Without a swatch the map is all ones.
`has_map` is True unless `map_fraction` < 1 withheld the map of a training example (then the map
is all zeros). Labels are the digits 0..9.

Reference numbers (RRR on MNIST): no penalty 0.516 test accuracy; with the input-gradient penalty
0.961, the clean-data accuracy.
"""

_CITATION = """\
@inproceedings{ross2017right,
  title = {Right for the Right Reasons: Training Differentiable Models by Constraining their
           Explanations},
  author = {Ross, Andrew Slavin and Hughes, Michael C. and Doshi-Velez, Finale},
  booktitle = {IJCAI},
  year = {2017}
}
"""

_SPLITS = ("train", "validation", "test")
_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@dataclasses.dataclass(eq=False)
class DecoyDigitsConfig(tfds.core.BuilderConfig):
    """Parameters of ``decoy_digits``.

    Attributes:
      image_size: side of the square output images, pixels.
      interpolation: "bilinear" or "nearest" upscaling of the 8x8 digits.
      decoy: paint the decoy swatch (False gives clean digits).
      train_fraction: share of each class in train.
      validation_fraction: share of each class in validation; test gets the rest.
      max_examples: keep a class-balanced subset of this many digits (None: all 1,797).
      map_fraction: share of training examples that keep their map (``has_map``).
      seed: seeds the split, the corners, the test shades and ``map_fraction``.
    """

    image_size: int = 32
    interpolation: str = "bilinear"
    decoy: bool = True
    train_fraction: float = 0.6
    validation_fraction: float = 0.2
    max_examples: int | None = None
    map_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _base.check_count(self.image_size, "image_size", minimum=8)
        _base.check(
            self.interpolation in ("bilinear", "nearest"),
            "interpolation",
            '"bilinear" or "nearest"',
            self.interpolation,
        )
        _base.check_fraction(self.train_fraction, "train_fraction")
        _base.check_fraction(self.validation_fraction, "validation_fraction")
        _base.check(
            self.train_fraction + self.validation_fraction <= 1.0,
            "train_fraction + validation_fraction",
            "at most 1",
            self.train_fraction + self.validation_fraction,
        )
        if self.max_examples is not None:
            _base.check_count(self.max_examples, "max_examples", minimum=10)
        _base.check_fraction(self.map_fraction, "map_fraction")
        _base.check_count(self.seed, "seed", minimum=0)


def swatch_size(image_size: int) -> int:
    """Side of the decoy swatch: DecoyMNIST's 4 px at 28 px, scaled, at least 1 px."""
    return max(1, int(round(4 * image_size / 28)))


decoy_shade = _render.decoy_shade


def split_indices(labels: np.ndarray, config: DecoyDigitsConfig) -> dict[str, np.ndarray]:
    """Stratified, seeded partition of the digit indices into the three splits.

    Args:
      labels: (N,) digit labels.
      config: supplies the fractions, ``max_examples`` and ``seed``.

    Returns:
      Split name -> sorted (n_split,) int array of indices into ``labels``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    order = rng.permutation(len(labels))
    if config.max_examples is not None:
        # Round-robin over classes so that a subset stays class-balanced.
        rank = np.zeros(len(labels), dtype=int)
        seen: dict[int, int] = {}
        for i in order:
            rank[i] = seen.get(int(labels[i]), 0)
            seen[int(labels[i])] = rank[i] + 1
        order = order[np.lexsort((np.arange(len(order)), rank[order]))][: config.max_examples]
    out: dict[str, list[int]] = {s: [] for s in _SPLITS}
    for c in np.unique(labels):
        idx = [int(i) for i in order if labels[i] == c]
        n_train = int(round(config.train_fraction * len(idx)))
        n_val = int(round(config.validation_fraction * len(idx)))
        n_val = min(n_val, len(idx) - n_train)
        out["train"] += idx[:n_train]
        out["validation"] += idx[n_train : n_train + n_val]
        out["test"] += idx[n_train + n_val :]
    return {s: np.array(sorted(v), dtype=int) for s, v in out.items()}


def render_example(
    digit: np.ndarray, label: int, split: str, index: int, config: DecoyDigitsConfig
) -> dict[str, Any]:
    """Renders one example.

    Args:
      digit: (8, 8) float digit with values 0..16.
      label: its digit class.
      split: "train", "validation" or "test" (test draws a random shade).
      index: position of the digit in ``load_digits`` (seeds its randomness).
      config: the builder config.

    Returns:
      The feature dict: image (S, S, 1) uint8, saliency_map (S, S) float32, label, has_map.
    """
    size = config.image_size
    rng = _render.example_rng(config.seed, 1 + _SPLITS.index(split), index)
    scaled = np.asarray(digit, dtype=np.float64) * (255.0 / 16.0)
    if config.interpolation == "bilinear":
        up = _render.resize_bilinear(scaled, size, size)
    else:
        up = _render.resize_nearest(scaled, size, size)
    image = np.round(np.clip(up, 0, 255)).astype(np.uint8)
    saliency = np.ones((size, size), dtype=np.float32)
    corner = int(rng.integers(4))
    random_digit = int(rng.integers(10))
    keep_map = split != "train" or rng.random() < config.map_fraction
    if config.decoy:
        s = swatch_size(size)
        shade = decoy_shade(label) if split != "test" else decoy_shade(random_digit)
        y0 = 0 if corner in (0, 1) else size - s
        x0 = 0 if corner in (0, 2) else size - s
        _render.paint_swatch(image, saliency, y0, x0, s, shade)
    if not keep_map:
        saliency = np.zeros_like(saliency)
    return {
        "image": image[:, :, None],
        "label": int(label),
        "saliency_map": saliency,
        "has_map": bool(keep_map),
    }


@registry.register
class DecoyDigits(_base.SaliencyDatasetBuilder):
    __doc__ = _DESCRIPTION

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: DecoyMNIST protocol on scikit-learn digits."}
    BUILDER_CONFIGS = [
        DecoyDigitsConfig(
            name="default", description="32x32 digits with the decoy swatch (bilinear upscaling)."
        ),
        DecoyDigitsConfig(name="clean", decoy=False, description="32x32 digits, no swatch."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self._saliency_info(_DESCRIPTION, height=size, width=size, channels=1,
                                   class_names=[str(d) for d in range(10)], citation=_CITATION)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # The digits ship with scikit-learn: nothing to download.
        # Imported here: scikit-learn takes seconds to import and only building needs it.
        from sklearn.datasets import load_digits  # only when this dataset is built: sklearn loads slowly

        digits = load_digits()
        images, labels = digits.images, digits.target.astype(int)
        parts = split_indices(labels, self.builder_config)
        return {
            split: self._generate_examples(images, labels, split, idx)
            for split, idx in parts.items()
            if len(idx)
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, split: str, indices: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in indices:
            yield int(i), render_example(images[i], labels[i], split, int(i), self.builder_config)
