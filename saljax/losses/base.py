"""The loss machinery: one forward pass (`Forward`), weighted terms (`Term`), their sum (`Loss`).

    loss = combine(cross_entropy(), gradmask(lam=1.0))
    value, aux = loss(classifier, batch)            # classifier: saljax.classifier.Classifier
    value, aux = loss(classifier, batch, key=key)   # terms that draw random numbers need a key

`Loss` runs ONE forward pass (`jax.vjp` of the classifier on the images) and every term reads what
it needs from it: logits, the feature map, CAMs, Grad-CAMs, or input gradients `d s / dx` for any
score `s`, each from that pass's VJP. BatchNorm statistics therefore change exactly once per loss
evaluation; the loss is a pure function that one `jax.jit` compiles, and `jax.grad` of it with
respect to the parameters differentiates through the input gradients (double backprop).

Terms that need a second pass on a modified copy `x~` (ActDiff, saliency-guided training, CE on
counterexamples) call `Forward.rerun`: the same train-mode function on `x~`, whose normalisation
uses `x~`'s own batch statistics (as a second train-mode forward in PyTorch does) and whose state
update is discarded. The running statistics move once per step, from the clean pass.

One-pass CDEP: when the loss has a contextual-decomposition term (CDEP, Rieger et al., ICML 2020)
that gives its region from the batch (`Term.region_fn`), every other term reads only the logits
(`Term.logits_only`, e.g. `cross_entropy`), and the classifier has `decompose_with_state`, the
decomposition `(beta, gamma)` IS the forward pass: logits `beta + gamma` (the ordinary logits to
rounding, with train-mode BatchNorm on the batch statistics of `beta + gamma`), the BatchNorm state
from that pass, and `Forward.decomposition` for the term. Such a Forward has no feature map and no
input gradients (asking raises). Any other combination runs the ordinary pass and the term computes
its decomposition in a second pass that updates nothing.

`combine` composes like `optax.chain`: it takes Terms and Losses alike (a Loss's terms are flattened
in), so `combine(for_method("cyborg"), rrr(0.1))` works.

A term may keep state of its own between steps (ActDiff's adversarial discriminator: its parameters
and optimizer state). Such a term has an `init`; `loss.init_state(classifier, images, key=key)`
builds the states, `loss(classifier, batch, key=key, term_state=states)` reads them and returns the
new ones in `aux.term_state`. The train state carries them (`TrainState.loss_state`), so the loss
stays a pure function.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from saljax import batch as batch_lib
from saljax import saliency
from saljax.classifier import Classifier
from saljax.losses import _common

Batch = batch_lib.Batch
Transform = Callable[[Batch, jax.Array], Batch]

__all__ = ["Forward", "Term", "Loss", "LossAux", "combine", "cross_entropy", "term_key"]


def term_key(key: jax.Array, name: str) -> jax.Array:
    """The PRNG key that the term (or transform) called `name` draws from: `fold_in(key, crc32(name))`."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class Forward:
    """What one forward pass of the classifier on `images` offers the terms."""

    def __init__(
        self,
        logits: jax.Array,
        feature_map: jax.Array | None,
        *,
        classifier: Classifier,
        images: jax.Array,
        vjp: Callable[[jax.Array], tuple[jax.Array, ...]] | None,
        key: jax.Array | None = None,
        term_state: Mapping[str, Any] | None = None,
        decomposition: tuple[jax.Array, jax.Array] | None = None,
    ):
        self.logits = logits  # (B, K)
        self._feature_map = feature_map  # (B, h, w, C'); None for the one-pass decomposition
        self.images = images  # (B, H, W, C)
        self.classifier = classifier
        self.key = key
        # (beta, gamma) (B, K) each, beta + gamma = logits: set when the pass was the contextual
        # decomposition for the loss's decomposition term (see the module docstring), else None.
        self.decomposition = decomposition
        self._vjp = vjp
        self._term_state = term_state

    def _one_pass_error(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"this forward pass was the contextual decomposition (one-pass CDEP), which gives no {what}: a term that"
            " reads it must declare it (needs_feature_map / needs_input_gradient) and not set logits_only")

    @property
    def feature_map(self) -> jax.Array:
        """The last feature map `A` (B, h, w, C') of this pass."""
        if self._feature_map is None:
            raise self._one_pass_error("feature map")
        return self._feature_map

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]

    def input_gradient(self, score: saliency.Score) -> jax.Array:
        """`d/dx sum_n score(logits)_n` (B, H, W, C), through this pass's VJP (no second forward)."""
        if self._vjp is None:
            if self.decomposition is not None:
                raise self._one_pass_error("input gradients")
            raise RuntimeError("this Forward was built without input gradients; declare needs_input_gradient")
        cotangent = jax.grad(lambda z: jnp.sum(score(z)))(self.logits)
        return self._vjp(cotangent)[0]

    def cams(self) -> jax.Array:
        """CAMs of every class (B, h, w, K); exact for a GAP + Dense head."""
        return saliency.class_activation_maps(self.classifier.head, self.feature_map)

    def grad_cam(self, index: jax.Array, *, constant_weights: bool = False) -> jax.Array:
        """Grad-CAM without ReLU, `sum_k alpha_k A_k`, `alpha_k = mean_ij d z_c / d A_k`: (B, h, w).

        `index` (B,) picks the class c. The channel weights come from the head's VJP at this pass's
        feature map, so they stay differentiable (double backprop) unless `constant_weights`.
        """
        logits, head_vjp = jax.vjp(self.classifier.head, self.feature_map)
        (grad,) = head_vjp(jax.nn.one_hot(index, logits.shape[-1], dtype=logits.dtype))
        alpha = jnp.mean(grad, axis=(1, 2))
        if constant_weights:
            alpha = jax.lax.stop_gradient(alpha)
        return jnp.einsum("bhwk,bk->bhw", self.feature_map, alpha.astype(self.feature_map.dtype))

    def rerun(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(logits, feature map) of a second pass on `images`; its BatchNorm state update is dropped."""
        feature_map, _ = self.classifier.features(images)
        return self.classifier.head(feature_map), feature_map

    def state_of(self, name: str) -> Any:
        """The state that the stateful term `name` carries into this step."""
        if self._term_state is None or name not in self._term_state:
            raise ValueError(f"the loss term {name!r} keeps state: call loss(classifier, batch, term_state=...)")
        return self._term_state[name]

    def key_for(self, name: str) -> jax.Array:
        if self.key is None:
            raise ValueError(f"the loss term {name!r} draws random numbers: call loss(classifier, batch, key=...)")
        return term_key(self.key, name)


Value = jax.Array


# `init(key, logits, feature_map) -> state` of a stateful term; it gets the shapes (jax.ShapeDtypeStruct)
# of one forward pass.
StateInit = Callable[[jax.Array, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct], Any]


@dataclasses.dataclass(frozen=True)
class Term:
    """A named, weighted loss term `fn(forward, batch) -> scalar`, and what it needs.

    A term with an `init` keeps state between steps: its `fn` reads `forward.state_of(name)` and
    returns `(scalar, new_state)`. `update_every = k > 1` asks the train step to apply the
    classifier's optimizer update on every k-th step only (the steps in between update the term's
    state and the BatchNorm statistics).
    """

    name: str
    fn: Callable[[Forward, Batch], Any]  # -> Value, or (Value, new state) for a term with an `init`
    weight: float = 1.0
    needs_input_gradient: bool = False
    needs_map: bool = False
    cam_maps: bool = False  # maps may come at the feature-map resolution too
    needs_key: bool = False  # draws random numbers: the loss must be called with key=...
    needs_params: bool = False  # differentiates with respect to the parameters inside the loss
    needs_feature_map: bool = False  # reads a conv feature map (B, h, w, C')
    needs_decomposition: bool = False  # reads the contextual decomposition (`fwd.decomposition` or `classifier.decompose`)
    init: StateInit | None = None  # keeps state between steps (see the class docstring)
    update_every: int = 1
    # `region_fn(batch) -> region` (B, H, W[, C]) of a decomposition term: lets the loss run the
    # decomposition as its forward pass and hand the term `fwd.decomposition` (see the module docstring).
    region_fn: Callable[[Batch], jax.Array] | None = None
    # Reads only `fwd.logits` of the pass (besides the batch, key and term state), so it can share the
    # one-pass CDEP forward (see the module docstring); `cross_entropy` sets it.
    logits_only: bool = False

    def scaled(self, weight: float) -> Term:
        return dataclasses.replace(self, weight=weight)


class LossAux(NamedTuple):
    terms: dict[str, jax.Array]  # unweighted value of each term
    logits: jax.Array  # (B, K)
    state: Any  # the classifier's updated state (BatchNorm statistics), or None
    term_state: dict[str, Any] | None = None  # new states of the stateful terms, by name


def _check_needs(terms: tuple[Term, ...], classifier: Classifier, batch: Batch, key: jax.Array | None,
                 term_state: Mapping[str, Any] | None) -> None:
    """Errors that can be seen before any tracing: missing key, parameters, term states or saliency maps."""
    image_size = _common.spatial_size(jnp.shape(batch[batch_lib.IMAGE]))
    for term in terms:
        if term.init is not None and (term_state is None or term.name not in term_state):
            raise ValueError(
                f"the loss term {term.name!r} keeps state between steps: call loss(classifier, batch, key=...,"
                " term_state=loss.init_state(classifier, images, key=...)), or let make_train_step carry it"
                " (init_train_state(model, optimizer, loss=loss, images=...))")
        if term.needs_key and key is None:
            raise ValueError(f"the loss term {term.name!r} draws random numbers: call loss(classifier, batch, key=...)")
        if term.needs_params and getattr(classifier, "rebind", None) is None:
            raise ValueError(
                f"the loss term {term.name!r} differentiates with respect to the parameters inside the loss: build the"
                " classifier with classifier.from_nnx or from_linen (from_functions has no parameters)")
        if term.needs_decomposition and getattr(classifier, "decompose", None) is None:
            raise ValueError(
                f"the loss term {term.name!r} needs the contextual decomposition of the classifier: build it with"
                " classifier.from_nnx from a saljax.models model (from_functions and from_linen have none)")
        if term.needs_map and not term.cam_maps:
            batch_lib.check_batch(batch, needs_map=True, map_sizes=[image_size])
        elif term.needs_map:
            batch_lib.check_batch(batch, needs_map=True)


def _one_pass_decomposition(terms: tuple[Term, ...], classifier: Classifier, x: jax.Array,
                            batch: Batch) -> tuple[tuple[jax.Array, jax.Array], Any] | None:
    """`((beta, gamma), state)` when the decomposition can serve as the forward pass, else None.

    It can when exactly one term needs the decomposition and gives its region (`region_fn`), every
    other term reads only the logits, and the classifier has `decompose_with_state`.
    """
    decompose_with_state = getattr(classifier, "decompose_with_state", None)
    decomposing = [t for t in terms if t.needs_decomposition]
    if decompose_with_state is None or len(decomposing) != 1:
        return None
    (term,) = decomposing
    needs_more = lambda t: t.needs_input_gradient or t.needs_feature_map or t.cam_maps
    if term.region_fn is None or needs_more(term):
        return None
    if not all(t.logits_only and not needs_more(t) for t in terms if t is not term):
        return None
    return decompose_with_state(x, term.region_fn(batch))


@dataclasses.dataclass(frozen=True)
class Loss:
    """`sum_i weight_i * term_i`, evaluated on one shared forward pass. Build with `combine`.

    `transform(batch, key) -> batch`, when set, replaces the batch before the pass (training on
    masked or shuffled images); it draws from `term_key(key, "transform")`.
    """

    terms: tuple[Term, ...]
    transform: Transform | None = None

    def __iter__(self) -> Iterator[Term]:
        return iter(self.terms)

    @property
    def needs_state(self) -> bool:
        """Whether some term keeps state between steps (call with `term_state=`)."""
        return any(t.init is not None for t in self.terms)

    @property
    def update_every(self) -> int:
        """The classifier's optimizer applies an update on every `update_every`-th step only."""
        return max((t.update_every for t in self.terms), default=1)

    def init_state(self, classifier: Classifier, images: Any, *, key: jax.Array) -> dict[str, Any]:
        """The initial states of the stateful terms, by name ({} when none keeps state).

        `images`: an array or `jax.ShapeDtypeStruct` of shape (B, H, W, C); only its shape is used
        (one abstract forward pass gives the shapes of the logits and the feature map).
        """
        shape = tuple(getattr(images, "shape", ()))
        if len(shape) != 4:
            raise ValueError(f"images must have shape (B, H, W, C); got {shape}")
        spec = jax.ShapeDtypeStruct(shape, getattr(images, "dtype", jnp.float32))

        def forward(x):
            feature_map, _ = classifier.features(x)
            return classifier.head(feature_map), feature_map

        logits, feature_map = jax.eval_shape(forward, spec)
        return {t.name: t.init(term_key(key, t.name), logits, feature_map) for t in self.terms if t.init is not None}

    @property
    def needs_key(self) -> bool:
        """Whether the loss draws random numbers, i.e. must be called with `key=`."""
        return self.transform is not None or any(t.needs_key for t in self.terms)

    def __call__(self, classifier: Classifier, batch: Batch, *, key: jax.Array | None = None,
                 term_state: Mapping[str, Any] | None = None) -> tuple[jax.Array, LossAux]:
        batch_lib.check_batch(batch)
        if self.transform is not None:
            if key is None:
                raise ValueError("the batch transform of this loss draws random numbers: call loss(classifier, batch, key=...)")
            batch = self.transform(batch, term_key(key, "transform"))
        _check_needs(self.terms, classifier, batch, key, term_state)
        x = jnp.asarray(batch[batch_lib.IMAGE])

        def forward(images):
            feature_map, state = classifier.features(images)
            return classifier.head(feature_map), (feature_map, state)

        one_pass = _one_pass_decomposition(self.terms, classifier, x, batch)
        decomposition: tuple[jax.Array, jax.Array] | None = None
        feature_map: jax.Array | None
        if one_pass is not None:  # the decomposition is the forward pass (see the module docstring)
            decomposition, state = one_pass
            logits, feature_map, vjp = decomposition[0] + decomposition[1], None, None
        elif any(t.needs_input_gradient for t in self.terms):
            logits, vjp, (feature_map, state) = jax.vjp(forward, x, has_aux=True)
        else:
            (logits, (feature_map, state)), vjp = forward(x), None
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier must return logits of shape (B, K) with B = {x.shape[0]}; got {logits.shape}")
        fwd = Forward(logits, feature_map, classifier=classifier, images=x, vjp=vjp, key=key, term_state=term_state,
                      decomposition=decomposition)
        values = {}
        new_states: dict[str, Any] = {}
        for term in self.terms:
            # (no feature map after one pass, and then no term reads one: _one_pass_decomposition)
            if feature_map is not None and term.needs_feature_map and jnp.ndim(feature_map) != 4:
                raise ValueError(
                    f"the loss term {term.name!r} needs a conv feature map: classifier.features must return"
                    f" (B, h, w, C'); got shape {jnp.shape(feature_map)}")
            if feature_map is not None and term.needs_map and term.cam_maps:
                sizes = [_common.spatial_size(x.shape), _common.spatial_size(feature_map.shape)]
                batch_lib.check_batch(batch, needs_map=True, map_sizes=sizes)
            if term.init is not None:
                values[term.name], new_states[term.name] = term.fn(fwd, batch)
            else:
                values[term.name] = cast(jax.Array, term.fn(fwd, batch))
        total = cast(jax.Array, sum(t.weight * values[t.name] for t in self.terms))
        return total, LossAux(terms=values, logits=logits, state=state, term_state=new_states if self.needs_state else None)


def combine(*parts: Term | Loss, transform: Transform | None = None) -> Loss:
    """One loss from Terms and Losses (whose terms are flattened in), like `optax.chain`.

    `combine(cross_entropy(), gradmask(lam=10.0))`, `combine(for_method("cyborg"), rrr(0.1))`.
    Term names must be unique (rename with a term's `name=` option). At most one transform: the
    `transform` argument or one carried by a Loss part.
    """
    if not parts:
        raise ValueError("combine needs at least one term")
    terms: list[Term] = []
    transforms = [transform] if transform is not None else []
    for part in parts:
        if isinstance(part, Loss):
            terms.extend(part.terms)
            if part.transform is not None:
                transforms.append(part.transform)
        elif isinstance(part, Term):
            terms.append(part)
        else:
            raise TypeError(f"combine takes Terms and Losses (e.g. saljax.losses.gradmask(...)); got {part!r}")
    names = [t.name for t in terms]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two terms are named {name!r}; give one another name (the term's name= option)")
    if len(transforms) > 1:
        raise ValueError(f"combine got {len(transforms)} batch transforms; a loss takes at most one")
    periods = {t.update_every for t in terms} - {1}
    if len(periods) > 1:
        raise ValueError(f"terms ask for optimizer updates every {sorted(periods)} steps; a loss takes one period")
    return Loss(tuple(terms), transforms[0] if transforms else None)


def cross_entropy(weight: float = 1.0, *, reduction: str = "mean", name: str = "ce") -> Term:
    """Softmax cross-entropy of the logits against `batch['label']`, mean or sum over the batch."""
    _common.choice("reduction", reduction, ("mean", "sum"))

    def fn(fwd: Forward, batch: Batch) -> Value:
        per = _common.ce_per_sample(fwd.logits, _common.labels(batch))
        return jnp.mean(per) if reduction == "mean" else jnp.sum(per)

    return Term(name, fn, weight, logits_only=True)
