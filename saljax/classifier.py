"""A classifier as two pure functions, `features` and `head`: the form the losses differentiate.

Saliency-guided losses differentiate the input gradient with respect to the parameters (double
backprop), and the CAM losses need the last feature map `A` as well as the logits. Both are served
by one forward pass if the model is seen as

    features: x (B, H, W, C) -> (A (B, h, w, C'), state)   # state: updated BatchNorm statistics
    head:     A (B, h', w', C') -> logits (B, K)           # GAP + Dense for the CAM methods

where both functions close over the (possibly traced) parameters. `state` carries whatever the
forward pass updates (BatchNorm running statistics in train mode), returned rather than mutated so
that the loss stays a pure function that `jax.grad` and `jax.jit` can transform; `None` when
nothing changes.

CDEP (Rieger et al., ICML 2020) needs the contextual decomposition `(beta, gamma)` of the logits
instead, with `beta + gamma` the logits: `decompose` gives it without touching the state, and
`decompose_with_state` also returns the new state, so that the decomposition can BE the forward
pass of a train step (one pass instead of two).

Adapters build a `Classifier` from a Flax NNX module (split into graphdef, params and the rest),
from a Linen module's `apply`, or from plain functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from flax import nnx

from saljax.models import decomposition

Array = jax.Array


class Classifier(NamedTuple):
    """A model seen as pure `features` and `head` functions (see the module docstring)."""

    features: Callable[[Array], tuple[Array, Any]]
    head: Callable[[Array], Array]
    # The parameters that `features` and `head` close over, and `rebind(p)`: the same classifier
    # closing over `p` instead. Losses that differentiate with respect to the parameters inside the
    # loss (RBR) need them; None for `from_functions`.
    params: Any = None
    rebind: Callable[[Any], Classifier] | None = None
    # `decompose(x, region) -> (beta, gamma)`: the contextual decomposition of the logits (B, K) into
    # the part due to `region * x` and the part due to the rest (CDEP needs it); `beta + gamma` are
    # the logits. It never updates state. None for `from_functions` and `from_linen`.
    decompose: Callable[[Array, Array], tuple[Array, Array]] | None = None
    # `decompose_with_state(x, region) -> ((beta, gamma), new_state)`: the same decomposition, plus the
    # state a forward pass on x would return (`new_state` shaped like the state of `features`; in
    # train mode BatchNorm running statistics updated from the batch statistics of `beta + gamma`).
    # The loss runs it as its only pass when nothing but the logits and the decomposition is needed.
    decompose_with_state: Callable[[Array, Array], tuple[tuple[Array, Array], Any]] | None = None

    def feature_map(self, x: Array) -> Array:
        """`A` (B, h, w, C') for inputs x (B, H, W, C), dropping the state."""
        return self.features(x)[0]

    def __call__(self, x: Array) -> Array:
        """Logits (B, K) for inputs x (B, H, W, C)."""
        return self.head(self.feature_map(x))


def from_functions(features: Callable[[Array], Array], head: Callable[[Array], Array]) -> Classifier:
    """A stateless classifier from plain functions `x -> A` and `A -> logits`."""
    return Classifier(features=lambda x: (features(x), None), head=head)


def from_nnx(graphdef: nnx.GraphDef, params: Any, state: Any) -> Classifier:
    """A classifier from a Flax NNX module split as `nnx.split(module, nnx.Param, ...)`.

    The module must define `features(x)` and `head(A)` (every `saljax.models` model does). Each
    call merges a fresh copy of the module, so BatchNorm statistics updated in train mode come back
    as the new `state` (same structure as `state`) instead of being written into a shared object:
    the forward pass may run inside `jax.vjp` nested in `jax.grad` without a TraceContextError, and
    the statistics change exactly once per loss evaluation.

    `decompose` is `saljax.models.decompose(module, x, region)` on another fresh copy: in train mode
    its BatchNorm layers normalise with the batch statistics of the ordinary activation (differentiated
    like the forward pass), in eval mode with the running ones, and it never updates the running
    statistics (its copy is discarded). `decompose_with_state` runs it with `update_stats=True` and
    returns the copy's new state like `features` does: the running statistics move as in the forward
    pass, from the batch statistics of `beta + gamma` (equal to the forward pass's to rounding). A
    module without a decomposition raises when either is called.
    """

    def features(x):
        module = nnx.merge(graphdef, params, state, copy=True)
        feature_map = module.features(x)
        new_state = nnx.state(module, nnx.Not(nnx.Param))
        return feature_map, new_state

    def head(feature_map):
        return nnx.merge(graphdef, params, state, copy=True).head(feature_map)

    def decompose(x, region):
        return decomposition.decompose(nnx.merge(graphdef, params, state, copy=True), x, region)

    def decompose_with_state(x, region):
        module = nnx.merge(graphdef, params, state, copy=True)
        parts = decomposition.decompose(module, x, region, update_stats=True)
        return parts, nnx.state(module, nnx.Not(nnx.Param))

    return Classifier(features=features, head=head, params=params,
                      rebind=lambda new_params: from_nnx(graphdef, new_params, state), decompose=decompose,
                      decompose_with_state=decompose_with_state)


def from_linen(
    module: Any,
    variables: Any,
    *,
    features_method: str | Callable = "features",
    head_method: str | Callable = "head",
    mutable: Sequence[str] | bool = ("batch_stats",),
) -> Classifier:
    """A classifier from a Linen module whose methods compute the feature map and the head.

    Collections listed in `mutable` (BatchNorm's `batch_stats` in train mode) come back as `state`;
    pass `mutable=False` for evaluation.
    """

    def features(x):
        if mutable:
            collections = mutable if isinstance(mutable, bool) else list(mutable)
            return module.apply(variables, x, method=features_method, mutable=collections)
        return module.apply(variables, x, method=features_method), None

    def head(feature_map):
        return module.apply(variables, feature_map, method=head_method)

    def rebind(params):
        return from_linen(module, {**variables, "params": params}, features_method=features_method,
                          head_method=head_method, mutable=mutable)

    return Classifier(features=features, head=head, params=variables.get("params"), rebind=rebind)
