"""saljax: saliency-guided training in JAX/Flax.

Packages and modules, one concept each (what each method computes, with its conventions and
defaults: docs/methods.md in the source tree):
  saliency    explanations: gradients, SmoothGrad, Integrated Gradients, CAM, Grad-CAM
  losses      CE, GradMask, RRR, RBR, CYBORG, Divisive Decisions, RRR-G, HINT, ActDiff, SGT, CDEP,
              counterexamples; `combine` and `for_method`
  classifier  a model as pure `features`/`head` functions (NNX, Linen, plain functions)
  batch       the batch layout, shape checks and value validation
  models      Flax NNX classifiers with a features/head split; contextual decomposition
  train       jit-compiled train and eval steps, optax optimizers, the training loop, `load_model`
  metrics     accuracy, ROC AUC, localisation metrics of maps against human maps, XIL's WR
  data        TFDS builders (one registry) and grain pipelines
  checkpoint  Orbax checkpoints; `workdir` the work directory's files (config.json)
  parallel    meshes and data-parallel sharding
  config      training configs (ml_collections files with command-line overrides)
  explain     `saljax explain`: maps and metrics over a dataset split, and a report
  experiment  `saljax experiment`: every method of a benchmark over seeds, result pages
"""

__version__ = "0.1.0"

from saljax import batch, classifier, losses, metrics, models, saliency, train
from saljax.batch import validate_batch
from saljax.classifier import Classifier
from saljax.losses import combine, for_method

__all__ = [
    "__version__",
    "batch",
    "classifier",
    "losses",
    "metrics",
    "models",
    "saliency",
    "train",
    "Classifier",
    "combine",
    "for_method",
    "validate_batch",
]
