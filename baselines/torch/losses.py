"""PyTorch CE, GradMask, RRR, CYBORG, Divisive Decisions and the XIL comparison methods, as their authors compute them.

The same terms, options, defaults and presets as `saljax.losses` (names and signatures match):

    loss = combine(cross_entropy(), gradmask(lam=1.0))     # or for_method("gradmask", lam=1.0)
    total, terms, logits = loss(model, batch)
    total.backward()

`model` is a `baselines.torch.models` classifier (`features`, `head`, `classifier`); `batch` holds
torch tensors: `image` (B, C, H, W) NCHW, `label` (B,) int64, `saliency_map` (B, H, W) or (B, h, w)
in [0, 1], `has_map` (B,) 0/1 (all ones when absent).

How the authors compute things, and so this baseline:
- input gradients: one forward pass with `x.requires_grad_()`, then
  `torch.autograd.grad(score.sum(), x, create_graph=True)`, so that `backward()` of the penalty
  differentiates through the gradient (double backprop);
- CAM: `einsum` of the last feature map with the Dense weight, no bias, no ReLU;
- maps to the CAM size: `F.interpolate(mode="bilinear", align_corners=False)`;
- per-sample min-max over the spatial axes with an `eps` guard (1e-8; 0 is CYBORG's code);
- Grad-CAM: `autograd.grad` of the chosen logit w.r.t. the feature map (`create_graph` unless the
  weights are constant), no ReLU;
- second passes on a modified copy `x~` (ActDiff, SGT, counterexamples) run in train mode with the
  BatchNorm running statistics restored afterwards (they move once per step, as in saljax).

Random draws cannot be reproduced across frameworks: the terms that need them read saljax's draw
from the batch, `batch["uniform/<term name>"]` (`uniform/transform` for a loss-level transform), in
the layout of the tensor it perturbs (NCHW for images).

The method defaults are not repeated here: `for_method` reads saljax's table
(`saljax/losses/preset_table.py`, plain Python) by path.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from baselines.torch import xil_losses
from baselines.torch._loss_base import (
    Batch,
    Forward,
    Loss,
    Term,
    _blur,
    _ce_per_sample,
    _choice,
    _dilate,
    _maps,
    _masked_mean,
    _penalty_reduce,
    _weights,
    combine,
    contrast_score,
    minmax_normalize,
    nonhealthy_score,
    sum_log_softmax_score,
)
from baselines.torch.xil_losses import (
    actdiff,
    cdep,
    counterexamples,
    hint,
    mask_outside,
    rbr,
    rrr_g,
    sgt,
    shuffle_outside,
    transformed_ce,
)

__all__ = [
    "Forward", "Term", "Loss", "combine", "cross_entropy", "gradmask", "rrr", "cyborg",
    "dd_difference", "dd_paired", "dd_divergence", "rbr", "rrr_g", "hint", "actdiff", "sgt", "transformed_ce", "cdep",
    "shuffle_outside", "mask_outside", "counterexamples", "for_method", "METHODS", "PRESETS",
    "contrast_score", "nonhealthy_score", "sum_log_softmax_score", "minmax_normalize",
]

# --- saljax's table of defaults, read by path (this interpreter has no jax) ---------------------------------

_TABLE_PATH = Path(__file__).resolve().parents[2] / "saljax" / "losses" / "preset_table.py"


def _load_table() -> Any:
    spec = importlib.util.spec_from_file_location("_saljax_preset_table", _TABLE_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load saljax's preset table from {_TABLE_PATH}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TABLE = _load_table()
PRESETS: Mapping[str, Mapping[str, Any]] = _TABLE.PRESETS


# --- terms ------------------------------------------------------------------------------------------------


def cross_entropy(weight: float = 1.0, *, reduction: str = "mean", name: str = "ce") -> Term:
    _choice("reduction", reduction, ("mean", "sum"))

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        per = _ce_per_sample(fwd.logits, batch["label"])
        return per.mean() if reduction == "mean" else per.sum()

    return Term(name, fn, weight)


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
    """GradMask: `sum_n m_n sum |(1 - H_n) g_n|` ('default') or CE * sum (y (1 - H) g)^2 ('midl')."""
    defaults = _TABLE.GRADMASK_VARIANTS[_choice("variant", variant, tuple(_TABLE.GRADMASK_VARIANTS))]
    norm = _choice("norm", norm or defaults["norm"], ("l1", "l2sq"))
    samples = _choice("samples", samples or defaults["samples"], ("masked", "positives"))
    reduction = _choice("reduction", reduction or defaults["reduction"], ("sum", "mean"))
    _choice("score", score, ("contrast", "nonhealthy"))

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        labels = batch["label"]
        s = contrast_score(labels) if score == "contrast" else nonhealthy_score
        grad = fwd.input_gradient(s)
        outside = 1.0 - _blur(_dilate(_maps(batch, grad), mask_dilation), mask_blur)
        off = outside[:, None] * grad  # (B, 1, H, W) broadcast over channels
        per = (off.abs() if norm == "l1" else off * off).sum(dim=(1, 2, 3))
        weights = _weights(batch, per)
        if samples == "positives":
            weights = weights * (labels == 1).to(per.dtype)
        penalty = _penalty_reduce(per, weights, reduction, grad[0].numel())
        if variant == "midl":
            return _ce_per_sample(fwd.logits, labels).mean() * penalty
        return penalty

    return Term(name, fn, lam, needs_input_gradient=True)


def rrr(lam: float = 1.0, *, reduction: str = "sum", name: str = "rrr") -> Term:
    """RRR: `sum_n m_n sum ((1 - H) d/dx sum_k log p_k)^2`."""
    _choice("reduction", reduction, ("sum", "mean"))

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        grad = fwd.input_gradient(sum_log_softmax_score)
        off = (1.0 - _maps(batch, grad))[:, None] * grad
        per = (off * off).sum(dim=(1, 2, 3))
        return _penalty_reduce(per, _weights(batch, per), reduction, grad[0].numel())

    return Term(name, fn, lam, needs_input_gradient=True)


def _cam_term(name: str, weight: float, per_sample: Callable, *, binary: bool, cam_class: str = "true",
              eps: float = 1e-8, antialias: bool = False) -> Term:
    _choice("cam_class", cam_class, ("true", "pred"))

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        if binary and fwd.num_classes != 2:
            raise ValueError(f"{name} needs a binary head; got logits of shape {tuple(fwd.logits.shape)}")
        labels = batch["label"]
        index = labels if cam_class == "true" else fwd.logits.argmax(dim=1)
        cams = fwd.cams()  # (B, K, h, w)
        rows = torch.arange(cams.shape[0], device=cams.device)
        cam_t = cams[rows, index]
        cam_f = cams[rows, 1 - index] if binary else None
        maps = _maps(batch, cam_t)
        if tuple(maps.shape[1:]) != tuple(cam_t.shape[1:]):
            maps = F.interpolate(maps[:, None], size=tuple(cam_t.shape[1:]), mode="bilinear",
                                 align_corners=False, antialias=antialias)[:, 0]
        per = per_sample(cam_t, cam_f, maps, eps)
        return _masked_mean(per, _weights(batch, per))

    return Term(name, fn, weight)


def _spatial_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean(dim=(1, 2))


def cyborg(weight: float = 0.5, *, cam_class: str = "true", eps: float = 1e-8, antialias: bool = False,
           name: str = "cyborg") -> Term:
    """CYBORG: `mean_ij (minmax(CAM_c) - minmax(H))^2`, c the label ('true') or the argmax ('pred')."""

    def per_sample(cam_t, _, maps, eps):
        return _spatial_mse(minmax_normalize(cam_t, eps), minmax_normalize(maps, eps))

    return _cam_term(name, weight, per_sample, binary=False, cam_class=cam_class, eps=eps, antialias=antialias)


def dd_difference(weight: float = 0.5, *, eps: float = 1e-8, antialias: bool = False,
                  name: str = "dd_difference") -> Term:
    """`MSE(minmax(CAM_t - CAM_f), H)`."""

    def per_sample(cam_t, cam_f, maps, eps):
        return _spatial_mse(minmax_normalize(cam_t - cam_f, eps), maps)

    return _cam_term(name, weight, per_sample, binary=True, eps=eps, antialias=antialias)


def dd_paired(weight: float = 0.5, *, eps: float = 1e-8, antialias: bool = False, name: str = "dd_paired") -> Term:
    """`MSE(minmax(CAM_t), H) + MSE(minmax(CAM_f), 1 - H)`."""

    def per_sample(cam_t, cam_f, maps, eps):
        return _spatial_mse(minmax_normalize(cam_t, eps), maps) + _spatial_mse(minmax_normalize(cam_f, eps), 1.0 - maps)

    return _cam_term(name, weight, per_sample, binary=True, eps=eps, antialias=antialias)


def dd_divergence(weight: float = 0.5, *, delta: float = 0.5, eps: float = 1e-8, antialias: bool = False,
                  name: str = "dd_divergence") -> Term:
    """`sum H relu(delta - (C_t - C_f)) / sum H + sum (1 - H) |C_t - C_f| / sum (1 - H)`, C = minmax(CAM)."""
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must lie in [0, 1]; got {delta}")

    def per_sample(cam_t, cam_f, maps, eps):
        diff = minmax_normalize(cam_t, eps) - minmax_normalize(cam_f, eps)
        inside = (maps * F.relu(delta - diff)).sum(dim=(1, 2)) / (maps.sum(dim=(1, 2)) + eps)
        outside_w = 1.0 - maps
        outside = (outside_w * diff.abs()).sum(dim=(1, 2)) / (outside_w.sum(dim=(1, 2)) + eps)
        return inside + outside

    return _cam_term(name, weight, per_sample, binary=True, eps=eps, antialias=antialias)


# --- presets: the terms, by name, for saljax's table (loaded above) ------------------------------------------

# The mirror of every term the table names, by name: defined in this module or in xil_losses.
_TERMS: Mapping[str, Callable[..., Term]] = {
    row["term"]: getattr(xil_losses, row["term"], None) or globals()[row["term"]]
    for row in PRESETS.values() if row["term"] is not None
}
_TRANSFORMS: Mapping[str, Callable[..., Batch]] = {
    "counterexamples": counterexamples, "mask_outside": mask_outside, "shuffle_outside": shuffle_outside,
}


def for_method(method: str, **options: Any) -> Loss:
    """The full loss of a method, as `saljax.losses.for_method` (same table, same option routing)."""
    return _TABLE.build(method, options, combine=combine, cross_entropy=cross_entropy, terms=_TERMS,
                        transforms=_TRANSFORMS, partial=functools.partial)


METHODS: Mapping[str, Callable[..., Loss]] = {name: functools.partial(for_method, name) for name in PRESETS}
