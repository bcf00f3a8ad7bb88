"""Input-gradient penalties: GradMask, RRR and RBR (right for better reasons)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saljax import batch as batch_lib
from saljax import saliency
from saljax.losses import _common
from saljax.losses.base import Forward, Term, Value
from saljax.losses.preset_table import GRADMASK_VARIANTS

Batch = batch_lib.Batch

__all__ = ["gradmask", "rrr", "rbr"]


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
    """GradMask (Simpson, Dutil, Bengio, Cohen, MIDL 2019): input-gradient saliency outside the lesion mask.

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
    _common.choice("variant", variant, tuple(GRADMASK_VARIANTS))
    defaults = GRADMASK_VARIANTS[variant]
    norm = _common.choice("norm", norm or defaults["norm"], ("l1", "l2sq"))
    samples = _common.choice("samples", samples or defaults["samples"], ("masked", "positives"))
    reduction = _common.choice("reduction", reduction or defaults["reduction"], ("sum", "mean"))
    _common.choice("score", score, ("contrast", "nonhealthy"))
    if mask_dilation < 0 or mask_blur < 0:
        raise ValueError(f"mask_dilation and mask_blur must be >= 0; got {mask_dilation}, {mask_blur}")

    def fn(fwd: Forward, batch: Batch) -> Value:
        labels = _common.labels(batch)
        s = saliency.contrast_score(labels) if score == "contrast" else saliency.nonhealthy_score
        grad = fwd.input_gradient(s)
        off = _common.outside_mask(batch, mask_dilation, mask_blur) * grad
        per = jnp.sum(jnp.abs(off) if norm == "l1" else off * off, axis=(1, 2, 3))
        weights = batch_lib.map_weights(batch)
        if samples == "positives":
            weights = weights * (labels == 1)
        penalty = _common.penalty_reduce(per, weights, reduction, int(np.prod(grad.shape[1:])))
        if variant == "midl":
            return jnp.mean(_common.ce_per_sample(fwd.logits, labels)) * penalty
        return penalty

    return Term(name, fn, lam, needs_input_gradient=True, needs_map=True)


def rrr(lam: float = 1.0, *, reduction: str = "sum", name: str = "rrr") -> Term:
    """Right for the Right Reasons (Ross, Hughes, Doshi-Velez, IJCAI 2017): `sum_n m_n sum_d ((1 - H) * g)^2`.

    `g = d/dx sum_n sum_k log p_nk`: the score sums the log-softmax over ALL classes. The paper's
    `sum CE` is `cross_entropy(reduction="sum")`, and its `lam2 ||theta||^2` is the optimizer's
    weight decay (`optax.add_decayed_weights(2 * lam2)`). Its advice: choose `lam` so the penalty
    is about equal to CE at initialisation. `reduction` as in `gradmask`.
    """
    _common.choice("reduction", reduction, ("sum", "mean"))

    def fn(fwd: Forward, batch: Batch) -> Value:
        grad = fwd.input_gradient(saliency.sum_log_softmax_score)
        off = _common.outside_mask(batch) * grad
        per = jnp.sum(off * off, axis=(1, 2, 3))
        return _common.penalty_reduce(per, batch_lib.map_weights(batch), reduction, int(np.prod(grad.shape[1:])))

    return Term(name, fn, lam, needs_input_gradient=True, needs_map=True)


def _sum_of_parameter_gradient(fwd: Forward, labels: jax.Array):
    """x -> s(x) = sum of all entries of d CE(theta, x) / d theta, with CE the batch mean.

    The sum of a gradient's entries is its directional derivative along all-ones, so `s` is one
    forward-mode JVP in the parameters (no reverse pass and no parameter-sized cotangent). The
    forward passes here are train-mode reruns whose BatchNorm state update is dropped.
    """
    clf = fwd.classifier
    rebind = clf.rebind
    if rebind is None:  # checked by Loss before tracing; kept for direct callers
        raise ValueError("rbr needs a classifier with parameters (classifier.from_nnx or from_linen)")
    params = clf.params
    ones = jax.tree.map(jnp.ones_like, params)

    def ce(theta, x):
        model = rebind(theta)
        logits = model.head(model.features(x)[0])
        return jnp.mean(_common.ce_per_sample(logits, labels))

    return lambda x: jax.jvp(lambda theta: ce(theta, x), (params,), (ones,))[1]


def rbr(lam: float = 1.0, *, reduction: str = "sum", name: str = "rbr") -> Term:
    """Right for Better Reasons (Shao, Skryagin, Stammer, Schramowski, Kersting, AAAI 2021), XIL's form.

    With the identity in place of the Hessian of the influence function (as the XIL framework of
    Friedrich et al., Nature Machine Intelligence 2023, implements it):

        s  = sum of all entries of d CE / d theta      (CE: the batch mean)
        IF = d s / dx                                  (B, H, W, C)
        IG = d/dx sum_{n,k} log p_nk                   (RRR's input gradient)
        term = sum_n m_n sum_d (A * IF * IG)^2,        A = 1 - H

    Differentiating the term with respect to the parameters is third order: a parameter gradient,
    differentiated with respect to the input, then with respect to the parameters. The classifier
    must expose its parameters (`Classifier.params` and `Classifier.rebind`, which
    `classifier.from_nnx` and `from_linen` set). `reduction` "sum" (XIL) | "mean" (over samples
    with maps and all elements). The paper's full influence-function Hessian is not offered.
    """
    _common.choice("reduction", reduction, ("sum", "mean"))

    def fn(fwd: Forward, batch: Batch) -> Value:
        labels = _common.labels(batch)
        influence = jax.grad(_sum_of_parameter_gradient(fwd, labels))(fwd.images)
        grad = fwd.input_gradient(saliency.sum_log_softmax_score)
        off = _common.outside_mask(batch) * influence * grad
        per = jnp.sum(off * off, axis=(1, 2, 3))
        return _common.penalty_reduce(per, batch_lib.map_weights(batch), reduction, int(np.prod(grad.shape[1:])))

    return Term(name, fn, lam, needs_input_gradient=True, needs_map=True, needs_params=True)
