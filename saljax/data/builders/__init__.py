"""The saljax TFDS builders, one module each; importing this package registers them all.

The folder is the list: every public module here is imported, so a new dataset is a new module
that decorates its builder class with ``saljax.data.registry.register``.
"""

import importlib
import pkgutil

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

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
