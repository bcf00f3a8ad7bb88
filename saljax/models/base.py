"""The base class of saljax's classifiers: the ``features`` / ``head`` contract.

Saliency-guided losses need two views of a model: the logits, and the last feature map ``A``
that class activation maps (CAM; Zhou et al., CVPR 2016) and Grad-CAM (Selvaraju et al., ICCV
2017) read. Every saljax model is an :class:`ImageClassifier`, an ``nnx.Module`` that splits its
forward pass into

``features(x) -> A``
    ``x``: float ``(B, H, W, in_channels)`` (NHWC). ``A``: ``(B, h, w, C')`` in the computation
    dtype, ``C' = model.feature_channels``.
``head(A) -> logits``
    ``(B, h', w', C') -> (B, num_classes)``, float32 (float64 for float64 parameters).
``__call__(x) = head(features(x))``

``head_type`` says what the head is, and so whether CAMs are exact:

``'gap'``
    Global average pooling over the spatial axes + ONE ``nnx.Linear(C', K)`` stored as
    ``model.classifier`` (this class's default :meth:`ImageClassifier.head`). It accepts maps of
    any spatial size, 1x1 included, and for every class ``c``::

        z_c = b_c + mean_ij CAM_c(i, j),   CAM_c = sum_k W[k, c] * A[..., k]

    so ``model.head(A[:, i:i+1, j:j+1, :]) - b`` is the CAM at pixel ``(i, j)``. It runs in
    float32 at least (features are cast up first), so the identity holds to float32 precision
    even with bfloat16 compute.
anything else (``'mlp'``, ``'dense'``, ...)
    CAMs are not defined: CAM-based losses and maps must refuse the model
    (:func:`require_cam_head` raises the error they should raise).

Adding a model: subclass :class:`ImageClassifier`, set the attributes listed in its docstring in
``__init__``, implement :meth:`ImageClassifier.backbone` (``features`` checks the input and calls
it), override :meth:`ImageClassifier.head` unless it is GAP + ``classifier``, and register it with
:func:`saljax.models.register` to make it available to :func:`saljax.models.create` and the CLIs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from saljax.models import decomposition as cd

__all__ = ["ImageClassifier", "require_cam_head"]


class ImageClassifier(nnx.Module):
    """An ``nnx.Module`` classifier with the ``features`` / ``head`` contract (module docstring).

    Subclasses set in ``__init__``:

    - ``in_channels``, ``num_classes``: input channels and classes ``K``;
    - ``feature_channels``: ``C'`` of the feature map;
    - ``head_type``: ``'gap'`` for GAP + ``classifier``, another name for other heads;
    - ``dtype``: the computation dtype;
    - ``classifier``: the last ``nnx.Linear`` (its ``dtype`` is the head's, at least float32);

    and implement :meth:`backbone`. Train / eval mode: ``model.train()`` / ``model.eval()`` (or
    ``nnx.view(model, use_running_average=...)``) switch every BatchNorm.
    """

    #: The name :func:`saljax.models.create` knows a built-in model by: a class of a module in
    #: ``saljax/models/`` that sets it is registered when the package is imported.
    registry_name: ClassVar[str | None] = None

    in_channels: int
    num_classes: int
    feature_channels: int
    head_type: str
    dtype: Any
    classifier: nnx.Linear

    def backbone(self, x: jax.Array) -> jax.Array:
        """The feature extractor proper: checked ``(B, H, W, in_channels)`` -> ``(B, h, w, C')``."""
        raise NotImplementedError(f"{type(self).__name__} must implement backbone(x)")

    def _check_input(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, H, W, in_channels={self.in_channels}) (NHWC), got shape {tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
        return x

    def _check_feature_map(self, a: Any) -> jax.Array:
        a = jnp.asarray(a)
        if a.ndim != 4 or a.shape[-1] != self.feature_channels:
            raise ValueError(
                f"feature map A must have shape (B, h, w, C'={self.feature_channels}), got shape {tuple(a.shape)}"
            )
        return a

    def features(self, x: jax.Array) -> jax.Array:
        """Last feature map.

        Args:
          x: float ``(B, H, W, in_channels)`` images, NHWC.

        Returns:
          ``(B, h, w, feature_channels)`` in the computation dtype.

        Raises:
          ValueError: at trace time, if ``x`` is not a rank-4 float array with ``in_channels``
            channels (or, for fixed-size models, not of the size given at construction).
        """
        return self.backbone(self._check_input(x))

    def head(self, a: jax.Array) -> jax.Array:
        """GAP + Dense head: ``(B, h, w, C') -> (B, num_classes)`` float32 logits.

        Works for any spatial size ``h, w >= 1``; on a ``(B, 1, 1, C')`` map it is exactly
        ``model.classifier`` applied to that vector.
        """
        dtype = self.classifier.dtype  # at least float32 (see the module docstring)
        a = self._check_feature_map(a).astype(dtype)
        pooled = jnp.mean(a, axis=(1, 2))  # (B, C')
        return self.classifier(pooled).astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``head(features(x))``: ``(B, H, W, in_channels) -> (B, num_classes)`` float32."""
        return self.head(self.features(x))

    def decompose_features(self, parts: cd.Parts) -> cd.Parts:
        """Contextual decomposition of :meth:`backbone` (:mod:`saljax.models.decomposition`).

        ``parts``: ``(beta, gamma)`` of the checked input; returns those of the feature map. A model
        that supports CDEP overrides this next to its ``backbone``, with the rules of
        :mod:`saljax.models.decomposition`.
        """
        raise ValueError(
            f"model {type(self).__name__} declares no contextual decomposition: implement decompose_features(parts)"
        )

    def decompose_head(self, parts: cd.Parts) -> cd.Parts:
        """Contextual decomposition of :meth:`head`: ``(beta, gamma)`` of the feature map -> of the logits.

        The default decomposes the GAP + ``classifier`` head; other heads override it.
        """
        if self.head_type != "gap":
            raise ValueError(
                f"model {type(self).__name__} (head_type {self.head_type!r}) must implement decompose_head(parts)"
            )
        parts = cd.cast(parts, self.classifier.dtype)
        return cd.layer(self.classifier, cd.global_avg_pool(parts))


def in_mode(model: nnx.Module, *, train: bool) -> nnx.Module:
    """`model` in train mode (batch statistics) or eval mode (running statistics), as a view.

    `model` itself is not changed. A model without BatchNorm (e.g. the MLP) has no mode and comes
    back as it is.
    """
    return nnx.view(model, use_running_average=not train, raise_if_not_found=False)


def require_cam_head(model: Any, method: str) -> None:
    """Raises unless ``model``'s CAMs are exact (``head_type == 'gap'``).

    Args:
      model: a model with a ``head_type`` attribute.
      method: what needs the CAMs (a loss or map name), for the message.

    Raises:
      ValueError: naming ``method``, the model class and its ``head_type``.
    """
    head_type = getattr(model, "head_type", None)
    if head_type != "gap":
        raise ValueError(
            f"{method} needs class activation maps, defined only for a global-average-pooling + Dense head "
            f"(head_type 'gap'); model {type(model).__name__} has head_type {head_type!r}"
        )
