"""saljax: saliency-guided training in JAX/Flax.

Modules, one concept each:
  saliency    explanations: gradients, SmoothGrad, Integrated Gradients, CAM, Grad-CAM
  losses      CE, GradMask, RRR, CYBORG, Divisive Decisions; `combine` and `for_method`
  classifier  a model as pure `features`/`head` functions (NNX, Linen, plain functions)
  batch       the batch layout, shape checks and value validation
  models      Flax NNX SimpleCNN, ResNet18, ResNet50 with a features/head split
  train       jit-compiled train and eval steps
  metrics     accuracy, ROC AUC, agreement of saliency with human maps
  data        TFDS builders and grain pipelines (import `saljax.data` explicitly)

Imported on demand (they pull in Orbax, grain, matplotlib): `parallel` (meshes and sharding),
`checkpoint` (Orbax checkpoints), `config` (training configs), `explain` (`saljax explain`),
`experiment` (`saljax experiment`: every method of a benchmark over seeds, result pages).
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
