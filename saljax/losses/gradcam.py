"""Grad-CAM penalties: RRR-G (right for the right scientific reasons) and HINT, in the XIL framework's forms.

Grad-CAM here has no ReLU: `GC_c = sum_k alpha_k A_k`, `alpha_k = mean_ij d z_c / d A_k`, at the
classifier's last feature map `A` (B, h, w, C'), then min-maxed per sample. The channel weights
come from the head's VJP on the loss's single forward pass, so by default the whole map is
differentiated (double backprop); `weights="constant"` treats `alpha` as a constant, as the XIL
framework (Friedrich, Stammer, Schramowski, Kersting, Nature Machine Intelligence 2023) does by
calling captum without `create_graph`. XIL recomputes Grad-CAM in eval mode; saljax uses the
training pass (train-mode BatchNorm), so that statistics move once per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saljax import batch as batch_lib
from saljax import saliency
from saljax.losses import _common
from saljax.losses.base import Forward, Term, Value

Batch = batch_lib.Batch

__all__ = ["rrr_g", "hint"]

_WEIGHTS = ("differentiable", "constant")


def _normalised_grad_cam(fwd: Forward, index: jax.Array, weights: str, eps: float) -> jax.Array:
    gc = fwd.grad_cam(index, constant_weights=weights == "constant")
    return saliency.minmax_normalize(_common.as_float(gc), eps=eps)


def rrr_g(
    lam: float = 1.0,
    *,
    weights: str = "differentiable",
    reduction: str = "sum",
    eps: float = 1e-8,
    antialias: bool = False,
    name: str = "rrr_g",
) -> Term:
    """RRR-G (Schramowski et al., Nature Machine Intelligence 2020): `sum_n m_n sum_ij (A * minmax(GC_c))^2`.

    `c` is the PREDICTED class (argmax, no gradient), `GC` Grad-CAM at the last feature map without
    ReLU (see the module docstring), `A = 1 - H` resized bilinearly (`antialias` off, as PyTorch's
    interpolate) to the feature map (h, w); maps may also be given at (h, w). `weights`
    "differentiable" (default) | "constant" (XIL: alpha detached). `reduction` "sum" (XIL) | "mean"
    (over the samples with maps and the h*w cells). `eps` guards the min-max.
    """
    _common.choice("weights", weights, _WEIGHTS)
    _common.choice("reduction", reduction, ("sum", "mean"))

    def fn(fwd: Forward, batch: Batch) -> Value:
        index = jnp.argmax(jax.lax.stop_gradient(fwd.logits), axis=-1)
        gc = _normalised_grad_cam(fwd, index, weights, eps)
        outside = 1.0 - _common.map_at(batch, _common.spatial_size(gc.shape), antialias)
        per = jnp.sum((outside * gc) ** 2, axis=(1, 2))
        return _common.penalty_reduce(per, batch_lib.map_weights(batch), reduction, int(np.prod(gc.shape[1:])))

    return Term(name, fn, lam, needs_map=True, cam_maps=True, needs_feature_map=True)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source rows of a nearest upsampling from `size_in` to `size_out`, as PyTorch's mode="nearest".

    PyTorch computes `floor(i * float32(size_in / size_out))` in float32 (exactly `i // 2` when
    doubling); the same arithmetic keeps the two in agreement at every size.
    """
    i = np.arange(size_out)
    if size_out == 2 * size_in:
        return i // 2
    scale = np.float32(size_in / size_out)
    return np.minimum(np.floor(i.astype(np.float32) * scale).astype(np.int64), size_in - 1)


def _upsample_nearest(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """maps (B, h, w) -> (B, H, W), nearest neighbour as `torch.nn.functional.interpolate`."""
    rows = nearest_indices(maps.shape[1], size[0])
    cols = nearest_indices(maps.shape[2], size[1])
    return maps[:, rows][:, :, cols]


def hint(
    lam: float = 1.0,
    *,
    weights: str = "differentiable",
    reduction: str = "sum",
    eps: float = 1e-8,
    name: str = "hint",
) -> Term:
    """HINT (Selvaraju et al., ICCV 2019), XIL's simplified form: `sum_n m_n sum_{HW} (up(minmax(GC_y)) - H)^2`.

    Grad-CAM of the TRUE class without ReLU, min-maxed per sample, upsampled to the image size by
    nearest neighbour (as captum's `LayerAttribution.interpolate`), compared with the map `H` at the
    image resolution: the model's importance must match the human's (a reward for right reasons,
    where RRR-G penalises wrong ones). The paper's ranking loss over importance orderings is not
    offered. Options as `rrr_g`; "mean" divides by the samples with maps and H*W.
    """
    _common.choice("weights", weights, _WEIGHTS)
    _common.choice("reduction", reduction, ("sum", "mean"))

    def fn(fwd: Forward, batch: Batch) -> Value:
        gc = _normalised_grad_cam(fwd, _common.labels(batch), weights, eps)
        maps = _common.maps(batch)
        up = _upsample_nearest(gc, _common.spatial_size(maps.shape))
        per = jnp.sum((up - maps) ** 2, axis=(1, 2))
        return _common.penalty_reduce(per, batch_lib.map_weights(batch), reduction, int(np.prod(maps.shape[1:])))

    return Term(name, fn, lam, needs_map=True, needs_feature_map=True)
