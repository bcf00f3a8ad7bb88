"""saljax datasets: TFDS builders for saliency-guided training and grain input pipelines.

Importing this package registers every builder of ``saljax.data.builders`` (``decoy_digits``,
``decoy_mnist``, ``red_herring``, ``synthetic_distractor``, ``spurious_binary``,
``saliency_folder``) with saljax's ``registry`` and with TFDS, so ``tfds.builder("decoy_digits",
data_dir=...)`` works. ``build`` prepares a dataset (offline), ``from_config`` does so from a
training config's ``dataset`` section, and ``make_loader`` batches one of its splits.
"""

import importlib
import sys
from types import ModuleType

from saljax.data import registry
from saljax.data.builders import (
    DecoyDigits,
    DecoyDigitsConfig,
    DecoyMnist,
    DecoyMnistConfig,
    FolderDatasetError,
    FolderProblem,
    RedHerring,
    RedHerringConfig,
    SaliencyFolder,
    SaliencyFolderConfig,
    SpuriousBinary,
    SpuriousBinaryConfig,
    StaleDatasetError,
    SyntheticDistractor,
    SyntheticDistractorConfig,
)
from saljax.data.catalog import DATASET_NAMES, build, from_config, resolve_config
from saljax.data.pipeline import (
    BATCH_KEYS,
    Augment,
    IteratorCheckpointHandler,
    IteratorCheckpointRestore,
    IteratorCheckpointSave,
    SaliencyLoader,
    augment_example,
    iterator_state,
    make_loader,
    normalize_example,
    restore_iterator,
)

# The builder modules used to live directly in saljax.data: ``import saljax.data.decoy_digits``,
# ``importlib.import_module("saljax.data.<name>")`` and ``from saljax.data import decoy_digits`` keep
# working through these aliases.
for _name in registry.names():
    sys.modules.setdefault(f"{__name__}.{_name}", sys.modules[registry.builder_class(_name).__module__])


def __getattr__(name: str) -> ModuleType:
    if name in registry.names():
        return importlib.import_module(f"saljax.data.builders.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BATCH_KEYS",
    "DATASET_NAMES",
    "Augment",
    "DecoyDigits",
    "DecoyDigitsConfig",
    "DecoyMnist",
    "DecoyMnistConfig",
    "FolderDatasetError",
    "FolderProblem",
    "IteratorCheckpointHandler",
    "IteratorCheckpointRestore",
    "IteratorCheckpointSave",
    "RedHerring",
    "RedHerringConfig",
    "SaliencyFolder",
    "SaliencyFolderConfig",
    "SaliencyLoader",
    "SpuriousBinary",
    "SpuriousBinaryConfig",
    "StaleDatasetError",
    "SyntheticDistractor",
    "SyntheticDistractorConfig",
    "augment_example",
    "build",
    "from_config",
    "iterator_state",
    "make_loader",
    "normalize_example",
    "registry",
    "resolve_config",
    "restore_iterator",
]
