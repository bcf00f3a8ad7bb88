"""CAM penalties: CYBORG and the three Divisive Decisions formulations."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from saljax import batch as batch_lib
from saljax import saliency
from saljax.losses import _common
from saljax.losses.base import Forward, Term, Value

Batch = batch_lib.Batch

__all__ = ["cyborg", "dd_difference", "dd_paired", "dd_divergence"]




def _cam_of(cams: jax.Array, index: jax.Array) -> jax.Array:
    """cams (B, h, w, K), index (B,) -> (B, h, w)."""
    return jnp.take_along_axis(cams, index[:, None, None, None], axis=-1)[..., 0]


def _spatial_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean((a - b) ** 2, axis=(1, 2))


def _cam_term(
    name: str,
    weight: float,
    per_sample: Callable[[jax.Array, jax.Array | None, jax.Array, float], jax.Array],
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
    _common.choice("cam_class", cam_class, ("true", "pred"))

    def fn(fwd: Forward, batch: Batch) -> Value:
        if binary and fwd.num_classes != 2:
            raise ValueError(
                f"{name} needs a binary head: logits of shape (B, 2); got {fwd.logits.shape}."
                " Divisive Decisions contrasts the true- and the false-class CAM of a two-class model")
        labels = _common.labels(batch)
        index = labels if cam_class == "true" else jnp.argmax(fwd.logits, axis=-1)
        cams = fwd.cams()
        cam_t = _cam_of(cams, index)
        cam_f = _cam_of(cams, 1 - index) if binary else None
        maps = _common.map_at(batch, _common.spatial_size(cam_t.shape), antialias)
        per = per_sample(cam_t, cam_f, maps, eps)
        return _common.masked_mean(per, batch_lib.map_weights(batch))

    return Term(name, fn, weight, needs_map=True, cam_maps=True, needs_feature_map=True)


def cyborg(
    weight: float = 0.5,
    *,
    cam_class: str = "true",
    eps: float = 1e-8,
    antialias: bool = False,
    name: str = "cyborg",
) -> Term:
    """CYBORG (Boyd, Tinsley, Bowyer, Czajka, WACV 2023): `mean_{n,i,j} (minmax(CAM_c(n)) - minmax(H_n))^2`.

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
    """Divisive Decisions (Piland, Sweet, Czajka 2025), difference form: `MSE(minmax(CAM_t - CAM_f), H)`.

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
