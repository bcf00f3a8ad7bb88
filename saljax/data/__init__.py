"""saljax datasets: TFDS builders for saliency-guided training and grain input pipelines.

Importing this package registers the TFDS builders ``decoy_digits``, ``synthetic_distractor``,
``spurious_binary`` and ``saliency_folder``, so ``tfds.builder("decoy_digits", data_dir=...)``
works. ``build`` prepares a dataset (offline) and ``make_loader`` batches one of its splits.
"""

from saljax.data.catalog import DATASET_NAMES, build, resolve_config
from saljax.data.decoy_digits import DecoyDigits, DecoyDigitsConfig
from saljax.data.decoy_mnist import DecoyMnist, DecoyMnistConfig
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
from saljax.data.red_herring import RedHerring, RedHerringConfig
from saljax.data.saliency_folder import (
    FolderDatasetError,
    FolderProblem,
    SaliencyFolder,
    SaliencyFolderConfig,
)
from saljax.data.spurious_binary import SpuriousBinary, SpuriousBinaryConfig
from saljax.data.synthetic_distractor import SyntheticDistractor, SyntheticDistractorConfig

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
    "SyntheticDistractor",
    "SyntheticDistractorConfig",
    "augment_example",
    "build",
    "iterator_state",
    "make_loader",
    "normalize_example",
    "resolve_config",
    "restore_iterator",
]
