"""The saljax TFDS builders, one module each; importing this package registers them all.

This is the one list of builder modules: a new dataset is a new module here that decorates its
builder class with ``saljax.data.registry.register``.
"""

from saljax.data.builders._base import StaleDatasetError
from saljax.data.builders.decoy_digits import DecoyDigits, DecoyDigitsConfig
from saljax.data.builders.decoy_mnist import DecoyMnist, DecoyMnistConfig
from saljax.data.builders.red_herring import RedHerring, RedHerringConfig
from saljax.data.builders.saliency_folder import FolderDatasetError, FolderProblem, SaliencyFolder, SaliencyFolderConfig
from saljax.data.builders.spurious_binary import SpuriousBinary, SpuriousBinaryConfig
from saljax.data.builders.synthetic_distractor import SyntheticDistractor, SyntheticDistractorConfig

__all__ = [
    "DecoyDigits",
    "DecoyDigitsConfig",
    "DecoyMnist",
    "DecoyMnistConfig",
    "FolderDatasetError",
    "FolderProblem",
    "RedHerring",
    "RedHerringConfig",
    "SaliencyFolder",
    "SaliencyFolderConfig",
    "SpuriousBinary",
    "StaleDatasetError",
    "SpuriousBinaryConfig",
    "SyntheticDistractor",
    "SyntheticDistractorConfig",
]
