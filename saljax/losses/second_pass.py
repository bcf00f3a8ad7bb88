"""Terms with a second forward pass on a modified copy `x~`: ActDiff, saliency-guided training, CE on `x~`.

The second pass is `Forward.rerun`: the same train-mode function on `x~`, normalised with `x~`'s
own batch statistics and with its BatchNorm state update discarded, so that running statistics
move once per step (from the clean pass). Each term draws one uniform array from
`term_key(key, name)`; the loss must be called with `key=`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from saljax import batch as batch_lib
from saljax import saliency
from saljax.losses import _common, transforms
from saljax.losses.base import Forward, Term, Value

Batch = batch_lib.Batch

__all__ = ["actdiff", "sgt", "transformed_ce", "ACTDIFF_LAYERS"]

# Activations ActDiff can compare; "pooled" is the spatial mean of the last feature map (the
# features a GAP head classifies).
ACTDIFF_LAYERS = ("pooled", "feature_map", "logits")


def _activations(layer: str, logits: jax.Array, feature_map: jax.Array) -> jax.Array:
    if layer == "logits":
        return logits
    if layer == "pooled":
        return jnp.mean(feature_map, axis=(1, 2))
    return feature_map.reshape(feature_map.shape[0], -1)


def _safe_norm(v: jax.Array) -> jax.Array:
    """Euclidean norm of each row (B, D) with a zero (not NaN) gradient at v = 0."""
    sq = jnp.sum(v * v, axis=1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def actdiff(lam: float = 1.0, *, layer: str = "pooled", threshold: float = 0.5, name: str = "actdiff") -> Term:
    """ActDiff (Viviano, Simpson, Dutil, Bengio, Cohen, ICLR 2021): `mean_n m_n ||z(x~_n) - z(x_n)||_2`.

    `x~` is `x` with the pixels outside the mask (`H < threshold`) randomly permuted among
    themselves, per image (`transforms.shuffle_outside`; draw: uniform (B, H*W)); `z` the flattened
    activations of `layer`: "pooled" (default, the authors': the pooled features before the head),
    "feature_map" or "logits". Mean over the samples with maps. The total is
    `combine(cross_entropy(), actdiff(lam))` = CE + lam * term (the authors' released ResNet code
    omits lam; saljax applies it). Both passes are differentiated; the `x~` pass moves no BatchNorm
    statistics.
    """
    _common.choice("layer", layer, ACTDIFF_LAYERS)

    def fn(fwd: Forward, batch: Batch) -> Value:
        x = fwd.images
        priorities = jax.random.uniform(fwd.key_for(name), (x.shape[0], x.shape[1] * x.shape[2]), x.dtype)
        shuffled = transforms.shuffle_outside_from(batch, priorities, threshold=threshold)[batch_lib.IMAGE]
        logits_t, feature_map_t = fwd.rerun(shuffled)
        z = _activations(layer, fwd.logits, fwd.feature_map)
        z_t = _activations(layer, logits_t, feature_map_t)
        return _common.masked_mean(_safe_norm(_common.as_float(z_t - z)), batch_lib.map_weights(batch))

    return Term(name, fn, lam, needs_map=True, needs_key=True, needs_feature_map=layer != "logits")


def _ordered_bits(v: jax.Array) -> jax.Array:
    """Integers ordered like the floats `v` (with -0 taken as +0): the sign-magnitude bits made two's complement."""
    itype = jnp.dtype(f"int{8 * v.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(jnp.where(v == 0, jnp.zeros_like(v), v), itype)
    return bits ^ ((bits >> (8 * v.dtype.itemsize - 1)) & jnp.iinfo(itype).max)


def sgt_mask(saliency_map: jax.Array, fraction: float) -> jax.Array:
    """(B, H, W, C) bool: the `floor(fraction * H*W*C)` lowest-saliency input features of each image.

    Ties go to the earlier position (flattened), as a stable argsort would choose. The k-th lowest
    value is found by bisection on the floats' bit patterns (one count per bit) rather than a sort:
    sorting H*W*C values per image was most of a SimpleCNN SGT step on CPU.
    """
    b = saliency_map.shape[0]
    flat = saliency_map.reshape(b, -1)
    k = int(fraction * flat.shape[1])
    if k == 0:
        return jnp.zeros(saliency_map.shape, bool)
    keys = _ordered_bits(flat)
    info = jnp.iinfo(keys.dtype)

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        # Invariant: the k-th lowest key lies in [low, high].
        low, high = bounds
        mid = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2) without overflow
        enough = jnp.sum(keys <= mid, axis=1, keepdims=True) >= k
        return jnp.where(enough, low, mid + 1), jnp.where(enough, mid, high)

    start = (jnp.full((b, 1), info.min, keys.dtype), jnp.full((b, 1), info.max, keys.dtype))
    kth, _ = jax.lax.fori_loop(0, info.bits, halve, start)
    below, tie = keys < kth, keys == kth
    room = k - jnp.sum(below, axis=1, keepdims=True)
    return (below | (tie & (jnp.cumsum(tie, axis=1) <= room))).reshape(saliency_map.shape)


def sgt(
    lam: float = 1.0,
    *,
    fraction: float = 0.5,
    abs_saliency: bool = False,
    value_range: tuple[float, float] | None = None,
    name: str = "sgt",
) -> Term:
    """Saliency-guided training (Ismail, Corrada Bravo, Feizi, NeurIPS 2021): `KL(softmax f(x) || softmax f(x~))`.

    The saliency is the input gradient of the target (label) logit, without gradient through it
    (`abs_saliency`: its magnitude; the authors' code sorts the signed gradient); the `fraction`
    (default 0.5) lowest-saliency input features of each image (pixels x channels) are replaced by
    uniform noise in the data range (`value_range`, or the batch's min and max; draw: uniform
    (B, H, W, C)), giving `x~`. The KL divergence is averaged over the batch (PyTorch's
    `kl_div(log_softmax(f(x~)), softmax(f(x)), reduction="batchmean")`) and differentiated through
    both passes. The paper's loss is `combine(cross_entropy(), sgt(1.0))`. No map is needed.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1]; got {fraction}")

    def fn(fwd: Forward, batch: Batch) -> Value:
        x = fwd.images
        grad = jax.lax.stop_gradient(fwd.input_gradient(saliency.logit_score(_common.labels(batch))))
        mask = sgt_mask(jnp.abs(grad) if abs_saliency else grad, fraction)
        low, high = transforms.data_range(x, value_range)
        noise = low + (high - low) * jax.random.uniform(fwd.key_for(name), x.shape, x.dtype)
        logits_t, _ = fwd.rerun(jnp.where(mask, noise, x))
        log_p = jax.nn.log_softmax(_common.as_float(fwd.logits))
        log_q = jax.nn.log_softmax(_common.as_float(logits_t))
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))

    return Term(name, fn, lam, needs_input_gradient=True, needs_key=True)


def transformed_ce(
    transform: Callable[..., Batch] = transforms.counterexamples,
    weight: float = 1.0,
    *,
    name: str = "ce_transformed",
) -> Term:
    """Mean CE on `transform(batch, key)` (a second pass): CE on counterexamples or other augmented copies.

    `combine(cross_entropy(0.5), transformed_ce(counterexamples, 0.5))` is the mean CE over the
    batch and its counterexamples together (Teso and Kersting, AIES 2019; XIL's form), with the
    BatchNorm statistics of the clean half only.
    """

    def fn(fwd: Forward, batch: Batch) -> Value:
        changed = transform(batch, fwd.key_for(name))
        logits_t, _ = fwd.rerun(jnp.asarray(changed[batch_lib.IMAGE]))
        return jnp.mean(_common.ce_per_sample(logits_t, _common.labels(changed)))

    return Term(name, fn, weight, needs_map=True, needs_key=True)
