"""Saliency-guided losses: cross-entropy plus penalties on input gradients or CAMs.

A loss is built from weighted terms and compiled as one function:

    loss = combine(cross_entropy(), gradmask(lam=1.0))
    value, aux = loss(classifier, batch)          # classifier: saljax.classifier.Classifier

`combine` runs ONE forward pass (`jax.vjp` of the classifier on the images), and every term reads
what it needs from it: logits, the feature map, CAMs, or input gradients `d s / dx` for any score
`s`, each obtained from that pass's VJP. So BatchNorm statistics are updated exactly once per
loss evaluation, the whole loss is a pure function that one `jax.jit` compiles, and `jax.grad` of
it with respect to the parameters differentiates through the input gradients (double backprop).

`aux` holds each term's unweighted value (`aux.terms`), the logits and the classifier's new state.

Terms (see METHODS.md for the conventions; every one is an option here):
- `cross_entropy`          softmax CE, mean (default) or sum over the batch.
- `gradmask`               Simpson et al. 2019: input-gradient saliency outside the lesion mask.
- `rrr`                    Ross et al. 2017: squared input gradients of sum_k log p_k off the map.
- `cyborg`                 Boyd et al. 2023: MSE between min-maxed true-class CAM and the map.
- `dd_difference`, `dd_paired`, `dd_divergence`
                           Divisive Decisions (Piland et al. 2025), three formulations that use the
                           true- and the false-class CAM of a binary head.
`for_method(name, ...)` returns the full loss each paper trains with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saljax import batch as batch_lib
from saljax import saliency
from saljax.classifier import Classifier

Array = Any
Batch = batch_lib.Batch

__all__ = [
    "Forward",
    "Term",
    "Loss",
    "LossAux",
    "combine",
    "cross_entropy",
    "gradmask",
    "rrr",
    "cyborg",
    "dd_difference",
    "dd_paired",
    "dd_divergence",
    "for_method",
    "METHODS",
]


class Forward:
    """What one forward pass of the classifier on `batch['image']` offers the terms."""

    def __init__(self, logits: Array, feature_map: Array, head: Callable[[Array], Array], vjp: Callable | None):
        self.logits = logits  # (B, K)
        self.feature_map = feature_map  # (B, h, w, C')
        self._head = head
        self._vjp = vjp

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]

    def input_gradient(self, score: saliency.Score) -> Array:
        """`d/dx sum_n score(logits)_n` (B, H, W, C), through this pass's VJP (no second forward)."""
        if self._vjp is None:
            raise RuntimeError("this Forward was built without input gradients; declare needs_input_gradient")
        cotangent = jax.grad(lambda z: jnp.sum(score(z)))(self.logits)
        return self._vjp(cotangent)[0]

    def cams(self) -> Array:
        """CAMs of every class (B, h, w, K); exact for a GAP + Dense head."""
        return saliency.class_activation_maps(self._head, self.feature_map)


Value = Array


@dataclasses.dataclass(frozen=True)
class Term:
    """A named, weighted loss term `fn(forward, batch) -> scalar`."""

    name: str
    fn: Callable[[Forward, Batch], Value]
    weight: float = 1.0
    needs_input_gradient: bool = False
    needs_map: bool = False
    cam_maps: bool = False  # maps may come at the feature-map resolution too

    def scaled(self, weight: float) -> Term:
        return dataclasses.replace(self, weight=weight)


class LossAux(NamedTuple):
    terms: dict[str, Array]  # unweighted value of each term
    logits: Array  # (B, K)
    state: Any  # the classifier's updated state (BatchNorm statistics), or None


@dataclasses.dataclass(frozen=True)
class Loss:
    """`sum_i weight_i * term_i`, evaluated on one shared forward pass. Build with `combine`."""

    terms: tuple[Term, ...]

    def __call__(self, classifier: Classifier, batch: Batch) -> tuple[Array, LossAux]:
        x = batch[batch_lib.IMAGE]
        batch_lib.check_batch(batch)

        def forward(images):
            feature_map, state = classifier.features(images)
            return classifier.head(feature_map), (feature_map, state)

        if any(t.needs_input_gradient for t in self.terms):
            logits, vjp, (feature_map, state) = jax.vjp(forward, x, has_aux=True)
        else:
            (logits, (feature_map, state)), vjp = forward(x), None
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier must return logits of shape (B, K) with B = {x.shape[0]}; got {logits.shape}")
        # Label and map values are checked on the host (batch.validate_batch); shapes suffice here.
        fwd = Forward(logits, feature_map, classifier.head, vjp)
        values = {}
        for term in self.terms:
            if term.needs_map:
                sizes = [tuple(x.shape[1:3])]
                if term.cam_maps:
                    sizes.append(tuple(feature_map.shape[1:3]))
                batch_lib.check_batch(batch, needs_map=True, map_sizes=sizes)
            if term.name in values:
                raise ValueError(f"two terms are named {term.name!r}; give one another name")
            values[term.name] = term.fn(fwd, batch)
        total = sum(t.weight * values[t.name] for t in self.terms)
        return total, LossAux(terms=values, logits=logits, state=state)


def combine(*terms: Term) -> Loss:
    """One loss from weighted terms: `combine(cross_entropy(), gradmask(lam=10.0))`."""
    if not terms:
        raise ValueError("combine needs at least one term")
    for t in terms:
        if not isinstance(t, Term):
            raise TypeError(f"combine takes Terms (e.g. saljax.losses.gradmask(...)); got {t!r}")
    return Loss(tuple(terms))


# --- shared pieces --------------------------------------------------------------------------------


def _labels(batch: Batch) -> Array:
    return jnp.asarray(batch[batch_lib.LABEL])


def _ce_per_sample(logits: Array, labels: Array) -> Array:
    # bfloat16 logits are upcast; float64 ones stay as they are.
    log_p = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def _float(values: Array) -> Array:
    """Float32 at least: float64 maps stay float64 for float64 losses."""
    values = jnp.asarray(values)
    return values.astype(jnp.promote_types(values.dtype, jnp.float32))


def _masked_mean(per_sample: Array, weights: Array) -> Array:
    """`sum_n w_n v_n / max(sum_n w_n, 1)`: mean over the samples that carry a map (0 if none)."""
    return jnp.sum(weights * per_sample) / jnp.maximum(jnp.sum(weights), 1.0)


def _dilate(maps: Array, radius: int) -> Array:
    """Grows the marked region of maps (B, H, W) by `radius` pixels (square max filter)."""
    if radius <= 0:
        return maps
    size = 2 * radius + 1
    return jax.lax.reduce_window(maps, -jnp.inf, jax.lax.max, (1, size, size), (1, 1, 1), "SAME")


def _blur(maps: Array, sigma: float) -> Array:
    """Gaussian blur of maps (B, H, W), separable, `sigma` in pixels, edges padded by replication."""
    if sigma <= 0:
        return maps
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = jnp.asarray(taps / taps.sum(), maps.dtype)
    padded = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    rows = jax.vmap(lambda m: jax.vmap(lambda r: jnp.convolve(r, taps, mode="valid"))(m))(padded)
    cols = jax.vmap(lambda m: jax.vmap(lambda c: jnp.convolve(c, taps, mode="valid"))(m.T).T)(rows)
    return jnp.clip(cols, 0.0, 1.0)


def _map_at(batch: Batch, size: tuple[int, int], antialias: bool) -> Array:
    """The saliency map (B, h, w), bilinearly resized to `size` when it has another resolution."""
    maps = _float(batch[batch_lib.SALIENCY_MAP])
    if maps.shape[1:] == size:
        return maps
    # antialias=False matches torch.nn.functional.interpolate(mode="bilinear", align_corners=False).
    return jax.image.resize(maps, (maps.shape[0], *size), "bilinear", antialias=antialias)


# --- cross-entropy ----------------------------------------------------------------------------------


def cross_entropy(weight: float = 1.0, *, reduction: str = "mean", name: str = "ce") -> Term:
    """Softmax cross-entropy of the logits against `batch['label']`, mean or sum over the batch."""
    _choice("reduction", reduction, ("mean", "sum"))

    def fn(fwd: Forward, batch: Batch) -> Value:
        per = _ce_per_sample(fwd.logits, _labels(batch))
        return jnp.mean(per) if reduction == "mean" else jnp.sum(per)

    return Term(name, fn, weight)


# --- input-gradient penalties ------------------------------------------------------------------------


def _outside_mask(batch: Batch, dilation: int = 0, blur: float = 0.0) -> Array:
    """`1 - H` (B, H, W, 1): where saliency is not allowed."""
    maps = _float(batch[batch_lib.SALIENCY_MAP])
    maps = _blur(_dilate(maps, dilation), blur)
    return (1.0 - maps)[..., None]


def _penalty_reduce(per_sample: Array, weights: Array, reduction: str, elements: int) -> Array:
    """Sum over samples (authors), or a scale-free mean over penalised samples and elements."""
    if reduction == "sum":
        return jnp.sum(weights * per_sample)
    return _masked_mean(per_sample, weights) / elements


_GRADMASK_DEFAULTS = {
    "default": {"norm": "l1", "samples": "masked", "reduction": "sum"},
    "midl": {"norm": "l2sq", "samples": "positives", "reduction": "sum"},
}


def gradmask(
    lam: float = 1.0,
    *,
    variant: str = "default",
    norm: str | None = None,
    samples: str | None = None,
    reduction: str | None = None,
    score: str = "contrast",
    mask_dilation: int = 0,
    mask_blur: float = 0.0,
    name: str = "gradmask",
) -> Term:
    """GradMask (Simpson et al. 2019): penalise input-gradient saliency outside the lesion mask.

    `g = d/dx sum_n s_n` with `s` the logit contrast `|z_n0 - z_n1|` (`score="contrast"`; for K > 2
    `|z_t - logsumexp_{k != t} z_k|`, see `saliency.contrast_score`) or the early "nonhealthy" score
    `|z_n1|` (`score="nonhealthy"`).

    variant="default" (the authors' final code), with `combine(cross_entropy(), gradmask(lam))`:
        L = mean_n CE + lam * sum_n m_n * sum_{pixels, channels} |(1 - H_n) * g_n|
    variant="midl" (the code at submission time): positives only, squared, multiplicative:
        R = sum_n m_n y_n sum ((1 - H_n) * g_n)^2, and the term's value is CE * R, so that
        `combine(cross_entropy(), gradmask(lam, variant="midl"))` gives CE * (1 + lam * R).

    Options (None: the variant's default): `norm` "l1" | "l2sq"; `samples` "masked" (every sample
    with a map) | "positives" (y = 1 only); `reduction` "sum" (the authors') | "mean" (over the
    penalised samples and all pixels and channels: independent of batch and image size, advised for
    new work). `mask_dilation` (pixels) and `mask_blur` (Gaussian sigma, pixels) widen the lesion
    mask first. Samples without a map (`has_map` 0) get no penalty.
    """
    _choice("variant", variant, tuple(_GRADMASK_DEFAULTS))
    defaults = _GRADMASK_DEFAULTS[variant]
    norm = _choice("norm", norm or defaults["norm"], ("l1", "l2sq"))
    samples = _choice("samples", samples or defaults["samples"], ("masked", "positives"))
    reduction = _choice("reduction", reduction or defaults["reduction"], ("sum", "mean"))
    _choice("score", score, ("contrast", "nonhealthy"))
    if mask_dilation < 0 or mask_blur < 0:
        raise ValueError(f"mask_dilation and mask_blur must be >= 0; got {mask_dilation}, {mask_blur}")

    def fn(fwd: Forward, batch: Batch) -> Value:
        labels = _labels(batch)
        s = saliency.contrast_score(labels) if score == "contrast" else saliency.nonhealthy_score
        grad = fwd.input_gradient(s)
        off = _outside_mask(batch, mask_dilation, mask_blur) * grad
        per = jnp.sum(jnp.abs(off) if norm == "l1" else off * off, axis=(1, 2, 3))
        weights = batch_lib.map_weights(batch)
        if samples == "positives":
            weights = weights * (labels == 1)
        penalty = _penalty_reduce(per, weights, reduction, int(np.prod(grad.shape[1:])))
        if variant == "midl":
            return jnp.mean(_ce_per_sample(fwd.logits, labels)) * penalty
        return penalty

    return Term(name, fn, lam, needs_input_gradient=True, needs_map=True)


def rrr(lam: float = 1.0, *, reduction: str = "sum", name: str = "rrr") -> Term:
    """Right for the Right Reasons (Ross et al. 2017): `sum_n m_n sum_d ((1 - H) * g)^2`.

    `g = d/dx sum_n sum_k log p_nk`: the score sums the log-softmax over ALL classes. The paper's
    `sum CE` is `cross_entropy(reduction="sum")`, and its `lam2 ||theta||^2` is the optimizer's
    weight decay (`optax.add_decayed_weights(2 * lam2)`). Its advice: choose `lam` so the penalty
    is about equal to CE at initialisation. `reduction` as in `gradmask`.
    """
    _choice("reduction", reduction, ("sum", "mean"))

    def fn(fwd: Forward, batch: Batch) -> Value:
        grad = fwd.input_gradient(saliency.sum_log_softmax_score)
        off = _outside_mask(batch) * grad
        per = jnp.sum(off * off, axis=(1, 2, 3))
        return _penalty_reduce(per, batch_lib.map_weights(batch), reduction, int(np.prod(grad.shape[1:])))

    return Term(name, fn, lam, needs_input_gradient=True, needs_map=True)


# --- CAM penalties ------------------------------------------------------------------------------------


def _cam_of(cams: Array, index: Array) -> Array:
    """cams (B, h, w, K), index (B,) -> (B, h, w)."""
    return jnp.take_along_axis(cams, index[:, None, None, None], axis=-1)[..., 0]


def _spatial_mse(a: Array, b: Array) -> Array:
    return jnp.mean((a - b) ** 2, axis=(1, 2))


def _cam_term(
    name: str,
    weight: float,
    per_sample: Callable[[Array, Array, Array, Array], Array],
    *,
    binary: bool,
    cam_class: str = "true",
    eps: float = 1e-8,
    antialias: bool = False,
) -> Term:
    """A CAM penalty averaged over the samples with maps.

    per_sample(cam_t, cam_f, map, forward) -> (B,), with the CAMs (B, h, w) of the chosen class and
    of the other class (binary heads only) and the map resized to (h, w).
    """
    _choice("cam_class", cam_class, ("true", "pred"))

    def fn(fwd: Forward, batch: Batch) -> Value:
        if binary and fwd.num_classes != 2:
            raise ValueError(
                f"{name} needs a binary head: logits of shape (B, 2); got {fwd.logits.shape}."
                " Divisive Decisions contrasts the true- and the false-class CAM of a two-class model")
        labels = _labels(batch)
        index = labels if cam_class == "true" else jnp.argmax(fwd.logits, axis=-1)
        cams = fwd.cams()
        cam_t = _cam_of(cams, index)
        cam_f = _cam_of(cams, 1 - index) if binary else None
        maps = _map_at(batch, tuple(cam_t.shape[1:]), antialias)
        per = per_sample(cam_t, cam_f, maps, eps)
        return _masked_mean(per, batch_lib.map_weights(batch))

    return Term(name, fn, weight, needs_map=True, cam_maps=True)


def cyborg(
    weight: float = 0.5,
    *,
    cam_class: str = "true",
    eps: float = 1e-8,
    antialias: bool = False,
    name: str = "cyborg",
) -> Term:
    """CYBORG (Boyd et al. 2023): `mean_{n,i,j} (minmax(CAM_c(n)) - minmax(H_n))^2`.

    The paper's loss is `alpha * CE + (1 - alpha) * term` with alpha = 0.5:
    `combine(cross_entropy(0.5), cyborg(0.5))` (or `for_method("cyborg")`). CAM at the feature-map
    resolution; `H` resized (bilinear, `antialias` off as in PyTorch's interpolate) down to (h, w)
    and min-maxed; no ReLU, no bias. `cam_class` "true" (the label, default) or "pred" (argmax, as
    in the original CYBORG code). `eps` guards the min-max (`eps=0.0`: CYBORG's code). The mean
    runs over the samples that carry a map.
    """

    def per_sample(cam_t, _, maps, eps):
        return _spatial_mse(saliency.minmax_normalize(cam_t, eps=eps), saliency.minmax_normalize(maps, eps=eps))

    return _cam_term(name, weight, per_sample, binary=False, cam_class=cam_class, eps=eps, antialias=antialias)


def dd_difference(weight: float = 0.5, *, eps: float = 1e-8, antialias: bool = False, name: str = "dd_difference") -> Term:
    """Divisive Decisions, difference form: `MSE(minmax(CAM_t - CAM_f), H)`.

    `D = CAM_t - CAM_f` decomposes the decision margin over space (`mean_ij D = (z_t - z_f) -
    (b_t - b_f)` for a GAP + Dense head); the margin must come from the salient regions. Needs a
    binary head. Combine as `combine(cross_entropy(0.5), dd_difference(0.5))`.
    """

    def per_sample(cam_t, cam_f, maps, eps):
        return _spatial_mse(saliency.minmax_normalize(cam_t - cam_f, eps=eps), maps)

    return _cam_term(name, weight, per_sample, binary=True, eps=eps, antialias=antialias)


def dd_paired(weight: float = 0.5, *, eps: float = 1e-8, antialias: bool = False, name: str = "dd_paired") -> Term:
    """Divisive Decisions, paired form: `MSE(minmax(CAM_t), H) + MSE(minmax(CAM_f), 1 - H)`.

    The true-class CAM lights up on the map, the false-class CAM off it. Needs a binary head.
    """

    def per_sample(cam_t, cam_f, maps, eps):
        on = _spatial_mse(saliency.minmax_normalize(cam_t, eps=eps), maps)
        off = _spatial_mse(saliency.minmax_normalize(cam_f, eps=eps), 1.0 - maps)
        return on + off

    return _cam_term(name, weight, per_sample, binary=True, eps=eps, antialias=antialias)


def dd_divergence(
    weight: float = 0.5,
    *,
    delta: float = 0.5,
    eps: float = 1e-8,
    antialias: bool = False,
    name: str = "dd_divergence",
) -> Term:
    """Divisive Decisions, divergence form, with `C = minmax(CAM)` per sample:

        sum H * relu(delta - (C_t - C_f)) / sum H  +  sum (1 - H) * |C_t - C_f| / sum (1 - H)

    Inside the map the normalised CAMs must differ by at least `delta` (default 0.5 on the [0, 1]
    scale of min-maxed maps); outside they should agree. The sums run over the pixels of each
    sample (guarded by `eps`), then the mean over the samples with maps. Needs a binary head.
    """
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must lie in [0, 1] (min-maxed CAMs differ by at most 1); got {delta}")

    def per_sample(cam_t, cam_f, maps, eps):
        diff = saliency.minmax_normalize(cam_t, eps=eps) - saliency.minmax_normalize(cam_f, eps=eps)
        inside = jnp.sum(maps * jax.nn.relu(delta - diff), axis=(1, 2)) / (jnp.sum(maps, axis=(1, 2)) + eps)
        outside_w = 1.0 - maps
        outside = jnp.sum(outside_w * jnp.abs(diff), axis=(1, 2)) / (jnp.sum(outside_w, axis=(1, 2)) + eps)
        return inside + outside

    return _cam_term(name, weight, per_sample, binary=True, eps=eps, antialias=antialias)


# --- the methods as their papers train them --------------------------------------------------------------


def _cam_method(term_fn: Callable[..., Term]) -> Callable[..., Loss]:
    def make(alpha: float = 0.5, **options: Any) -> Loss:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1]; got {alpha}")
        return combine(cross_entropy(alpha), term_fn(1.0 - alpha, **options))

    return make


METHODS: Mapping[str, Callable[..., Loss]] = {
    "ce": lambda **options: combine(cross_entropy(**options)),
    "gradmask": lambda lam=1.0, **options: combine(cross_entropy(), gradmask(lam, **options)),
    "gradmask_midl": lambda lam=1.0, **options: combine(cross_entropy(), gradmask(lam, variant="midl", **options)),
    "rrr": lambda lam=1.0, **options: combine(cross_entropy(reduction="sum"), rrr(lam, **options)),
    "cyborg": _cam_method(cyborg),
    "cyborg_pred": _cam_method(lambda w, **o: cyborg(w, cam_class="pred", **o)),
    "dd_difference": _cam_method(dd_difference),
    "dd_paired": _cam_method(dd_paired),
    "dd_divergence": _cam_method(dd_divergence),
}


def for_method(method: str, **options: Any) -> Loss:
    """The full loss a method trains with, e.g. `for_method("cyborg", alpha=0.5)`.

    "gradmask*" and "rrr" take `lam` and the term's options; the CAM methods take `alpha` (CE
    weight; the term gets 1 - alpha) and the term's options.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}")
    return METHODS[method](**options)
