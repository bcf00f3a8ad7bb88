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

import contextlib
import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Forward", "Term", "Loss", "combine", "cross_entropy", "gradmask", "rrr", "cyborg",
    "dd_difference", "dd_paired", "dd_divergence", "rbr", "rrr_g", "hint", "actdiff", "sgt", "transformed_ce",
    "shuffle_outside", "mask_outside", "counterexamples", "for_method", "METHODS", "PRESETS",
    "contrast_score", "nonhealthy_score", "sum_log_softmax_score", "minmax_normalize",
]

Batch = Mapping[str, torch.Tensor]
Score = Callable[[torch.Tensor], torch.Tensor]


# --- scores: logits (B, K) -> (B,) -------------------------------------------------------------


def contrast_score(labels: torch.Tensor) -> Score:
    """GradMask's `|z_0 - z_1|`; for K > 2 `|z_t - logsumexp_{k != t} z_k|` (as saljax)."""

    def score(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 2:
            return (logits[:, 0] - logits[:, 1]).abs()
        true = logits.gather(1, labels[:, None])[:, 0]
        others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
        return (true - torch.logsumexp(others, dim=1)).abs()

    return score


def nonhealthy_score(logits: torch.Tensor) -> torch.Tensor:
    """`|z_1|`, GradMask's early score."""
    return logits[:, 1].abs()


def sum_log_softmax_score(logits: torch.Tensor) -> torch.Tensor:
    """RRR's `sum_k log p_k`."""
    return F.log_softmax(logits, dim=1).sum(dim=1)


def minmax_normalize(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample `(v - min) / (max - min + eps)` over the last two (spatial) axes of (B, h, w)."""
    lo = v.amin(dim=(1, 2), keepdim=True)
    hi = v.amax(dim=(1, 2), keepdim=True)
    return (v - lo) / (hi - lo + eps)


# --- the shared forward pass -----------------------------------------------------------------------


class Forward:
    """One forward pass: logits (B, K), feature map (B, C', h, w), and input gradients and CAMs from it.

    `input_gradient_fn(score) -> d/dx sum_n score(logits)_n` (B, C, H, W), kept differentiable;
    `classifier_weight` (K, C') is the Dense kernel of a GAP + Dense head (None: no CAMs).
    """

    def __init__(self, logits: torch.Tensor, feature_map: torch.Tensor, *,
                 classifier_weight: torch.Tensor | None,
                 input_gradient_fn: Callable[[Score], torch.Tensor] | None = None,
                 model: torch.nn.Module | None = None, images: torch.Tensor | None = None):
        self.logits, self.feature_map = logits, feature_map
        self._weight, self._input_gradient = classifier_weight, input_gradient_fn
        self.model, self.images = model, images

    def grad_cam(self, index: torch.Tensor, constant_weights: bool = False) -> torch.Tensor:
        """Grad-CAM without ReLU (B, h, w): `sum_k alpha_k A_k`, `alpha_k = mean_ij d z_c / d A_k`."""
        score = self.logits.gather(1, index[:, None]).sum()
        (grad,) = torch.autograd.grad(score, self.feature_map, create_graph=not constant_weights, retain_graph=True)
        alpha = grad.mean(dim=(2, 3))
        if constant_weights:
            alpha = alpha.detach()
        return torch.einsum("bchw,bc->bhw", self.feature_map, alpha)

    def rerun(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, feature map) of a train-mode pass on `images`; BatchNorm running statistics restored."""
        if self.model is None:
            raise RuntimeError("this forward pass cannot run a second pass")
        with _restored_buffers(self.model):
            feature_map = self.model.features(images)
            return self.model.head(feature_map), feature_map

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    def input_gradient(self, score: Score) -> torch.Tensor:
        """`d/dx sum_n score(logits)_n` (B, C, H, W), kept in the graph for double backprop."""
        if self._input_gradient is None:
            raise RuntimeError("this forward pass was made without input gradients")
        return self._input_gradient(score)

    def cams(self) -> torch.Tensor:
        """CAMs of every class (B, K, h, w): `sum_c W[k, c] A[:, c]`, no bias (GAP + Dense heads)."""
        if self._weight is None:
            raise ValueError("CAMs need a GAP + Dense head (head_type='gap')")
        a = self.feature_map
        with torch.autocast(a.device.type, enabled=False):
            a = a.to(torch.promote_types(a.dtype, torch.float32))
            return torch.einsum("bchw,kc->bkhw", a, self._weight)


@contextlib.contextmanager
def _restored_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Runs a pass on copies of the BatchNorm buffers, then puts the originals back.

    Swapping (not copying back in place) keeps the originals at the version autograd saved them at.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [dict(m._buffers) for m in norms]
    for m in norms:
        for name, b in m._buffers.items():
            if b is not None:
                setattr(m, name, b.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved):
            for name, b in buffers.items():
                setattr(m, name, b)


def _gap_weight(model: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    return weight if getattr(model, "head_type", "gap") == "gap" else None


@dataclasses.dataclass(frozen=True)
class Term:
    """A named, weighted term `fn(forward, batch) -> scalar`."""

    name: str
    fn: Callable[[Forward, Batch], torch.Tensor]
    weight: float = 1.0
    needs_input_gradient: bool = False
    eager_only: bool = False  # needs autograd.grad on the eager graph (no torch.func route)


@dataclasses.dataclass(frozen=True)
class Loss:
    """`sum_i weight_i * term_i` on one forward pass; returns (total, {name: value}, logits)."""

    terms: tuple[Term, ...]
    transform: Callable[..., Batch] | None = None

    @property
    def needs_input_gradient(self) -> bool:
        return any(t.needs_input_gradient for t in self.terms)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Eager autograd, as the authors: `autograd.grad(score.sum(), x, create_graph=True)`."""
        if self.transform is not None:
            batch = self.transform(batch, batch.get("uniform/transform"))
        x = batch["image"]
        if self.needs_input_gradient:
            x = x.detach().requires_grad_(True)
        feature_map = model.features(x)
        logits = model.head(feature_map)

        def input_gradient(score: Score) -> torch.Tensor:
            (grad,) = torch.autograd.grad(score(logits).sum(), x, create_graph=True)
            return grad

        fwd = Forward(logits, feature_map, classifier_weight=_gap_weight(model, model.classifier.weight),
                      input_gradient_fn=input_gradient, model=model, images=x)
        return self._total(fwd, batch)

    def functional(self, model: torch.nn.Module, params_and_buffers: Mapping[str, torch.Tensor],
                   batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """The same loss through `torch.func`: `functional_call` and a `vjp` for the input gradients.

        Differentiate it with `torch.func.grad` (and compile that with `torch.compile`). torch.func
        forbids in-place updates of captured tensors, so BatchNorm must not track running statistics
        here: prepare the model with `torch.func.replace_all_batch_norm_modules_` (train-mode outputs
        and gradients are unchanged; the running statistics are simply not updated).
        """
        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.func.functional_call(model, params_and_buffers, (x,), {"return_features": True})

        if any(t.eager_only for t in self.terms) or self.transform is not None:
            raise ValueError("this loss has terms that only the eager route computes")
        x = batch["image"]
        input_gradient: Callable[[Score], torch.Tensor] | None = None
        if self.needs_input_gradient:
            (feature_map, logits), vjp = torch.func.vjp(forward, x)

            def from_vjp(score: Score) -> torch.Tensor:
                cotangent = torch.func.grad(lambda z: score(z).sum())(logits)
                return vjp((torch.zeros_like(feature_map), cotangent))[0]

            input_gradient = from_vjp
        else:
            feature_map, logits = forward(x)
        fwd = Forward(logits, feature_map, input_gradient_fn=input_gradient,
                      classifier_weight=_gap_weight(model, params_and_buffers["classifier.weight"]))
        return self._total(fwd, batch)

    def _total(self, fwd: Forward, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        values = {t.name: t.fn(fwd, batch) for t in self.terms}
        total = sum(t.weight * values[t.name] for t in self.terms)
        return total, values, fwd.logits


def combine(*parts: Term | Loss, transform: Callable[..., Batch] | None = None) -> Loss:
    """Terms and Losses (flattened in), names unique, at most one transform: as saljax's `combine`."""
    terms: list[Term] = []
    transforms = [transform] if transform is not None else []
    for part in parts:
        if isinstance(part, Loss):
            terms.extend(part.terms)
            transforms += [part.transform] if part.transform is not None else []
        else:
            terms.append(part)
    names = [t.name for t in terms]
    if len(set(names)) != len(names) or len(transforms) > 1:
        raise ValueError(f"duplicate term names or several transforms: {names}, {len(transforms)} transforms")
    return Loss(tuple(terms), transforms[0] if transforms else None)


# --- shared pieces -------------------------------------------------------------------------------------


def _ce_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none")


def _weights(batch: Batch, like: torch.Tensor) -> torch.Tensor:
    """`m_n` (B,) in the dtype of `like`."""
    if "has_map" not in batch:
        return torch.ones(batch["image"].shape[0], dtype=like.dtype, device=like.device)
    return batch["has_map"].to(like.dtype)


def _masked_mean(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * per_sample).sum() / weights.sum().clamp(min=1.0)


def _maps(batch: Batch, like: torch.Tensor) -> torch.Tensor:
    return batch["saliency_map"].to(torch.promote_types(like.dtype, torch.float32))


def _dilate(maps: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return maps
    return F.max_pool2d(maps[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0]


def _blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W), edges replicated, clipped to [0, 1]."""
    if sigma <= 0:
        return maps
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = torch.as_tensor(taps / taps.sum(), dtype=maps.dtype, device=maps.device)
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1))
    x = F.conv2d(x, taps.view(1, 1, -1, 1))
    return x[:, 0].clamp(0.0, 1.0)


def _penalty_reduce(per_sample: torch.Tensor, weights: torch.Tensor, reduction: str, elements: int) -> torch.Tensor:
    if reduction == "sum":
        return (weights * per_sample).sum()
    return _masked_mean(per_sample, weights) / elements


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


# --- terms ------------------------------------------------------------------------------------------------


def cross_entropy(weight: float = 1.0, *, reduction: str = "mean", name: str = "ce") -> Term:
    _choice("reduction", reduction, ("mean", "sum"))

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        per = _ce_per_sample(fwd.logits, batch["label"])
        return per.mean() if reduction == "mean" else per.sum()

    return Term(name, fn, weight)


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
    """GradMask: `sum_n m_n sum |(1 - H_n) g_n|` ('default') or CE * sum (y (1 - H) g)^2 ('midl')."""
    defaults = _GRADMASK_DEFAULTS[_choice("variant", variant, tuple(_GRADMASK_DEFAULTS))]
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


# --- RBR, Grad-CAM terms (XIL's forms) --------------------------------------------------------------------


def rbr(lam: float = 1.0, *, reduction: str = "sum", name: str = "rbr") -> Term:
    """RBR, XIL's form: `sum_n m_n sum ((1 - H) * IF * IG)^2`, IF = d/dx sum(d CE / d theta), IG = RRR's gradient."""
    _choice("reduction", reduction, ("sum", "mean"))

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        ce = _ce_per_sample(fwd.logits, batch["label"]).mean()
        params = [p for p in fwd.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(ce, params, create_graph=True, allow_unused=True)
        s = torch.cat([g.flatten() for g in grads if g is not None]).sum()
        (influence,) = torch.autograd.grad(s, fwd.images, create_graph=True)
        grad = fwd.input_gradient(sum_log_softmax_score)
        off = (1.0 - _maps(batch, grad))[:, None] * influence * grad
        per = (off * off).sum(dim=(1, 2, 3))
        return _penalty_reduce(per, _weights(batch, per), reduction, grad[0].numel())

    return Term(name, fn, lam, needs_input_gradient=True, eager_only=True)


def _normalised_grad_cam(fwd: Forward, index: torch.Tensor, weights: str, eps: float) -> torch.Tensor:
    gc = fwd.grad_cam(index, constant_weights=weights == "constant")
    return minmax_normalize(gc.to(torch.promote_types(gc.dtype, torch.float32)), eps)


def rrr_g(lam: float = 1.0, *, weights: str = "differentiable", reduction: str = "sum", eps: float = 1e-8,
          antialias: bool = False, name: str = "rrr_g") -> Term:
    """RRR-G: `sum_n m_n sum_ij ((1 - H) * minmax(GradCAM_pred))^2`, maps resized bilinearly to (h, w)."""
    _choice("weights", weights, ("differentiable", "constant"))
    _choice("reduction", reduction, ("sum", "mean"))

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        gc = _normalised_grad_cam(fwd, fwd.logits.detach().argmax(dim=1), weights, eps)
        maps = _maps(batch, gc)
        if tuple(maps.shape[1:]) != tuple(gc.shape[1:]):
            maps = F.interpolate(maps[:, None], size=tuple(gc.shape[1:]), mode="bilinear", align_corners=False,
                                 antialias=antialias)[:, 0]
        per = (((1.0 - maps) * gc) ** 2).sum(dim=(1, 2))
        return _penalty_reduce(per, _weights(batch, per), reduction, gc[0].numel())

    return Term(name, fn, lam, eager_only=True)


def hint(lam: float = 1.0, *, weights: str = "differentiable", reduction: str = "sum", eps: float = 1e-8,
         name: str = "hint") -> Term:
    """HINT (XIL): `sum_n m_n sum (nearest_up(minmax(GradCAM_true)) - H)^2` at the image size."""
    _choice("weights", weights, ("differentiable", "constant"))
    _choice("reduction", reduction, ("sum", "mean"))

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        gc = _normalised_grad_cam(fwd, batch["label"], weights, eps)
        maps = _maps(batch, gc)
        up = F.interpolate(gc[:, None], size=tuple(maps.shape[1:]), mode="nearest")[:, 0]
        per = ((up - maps) ** 2).sum(dim=(1, 2))
        return _penalty_reduce(per, _weights(batch, per), reduction, maps[0].numel())

    return Term(name, fn, lam, eager_only=True)


# --- batch transforms and second-pass terms ------------------------------------------------------------------


def _outside(batch: Batch, threshold: float) -> torch.Tensor:
    """(B, H, W) bool: `H < threshold` for samples with a map."""
    has = _weights(batch, batch["image"]) > 0
    return (batch["saliency_map"] < threshold) & has[:, None, None]


def shuffle_outside(batch: Batch, priorities: torch.Tensor, *, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Outside pixels permuted among themselves by `priorities` (B, H*W), as saljax's `shuffle_outside_from`."""
    x = batch["image"]
    b, c, h, w = x.shape
    outside = _outside(batch, threshold).reshape(b, h * w)
    position = torch.arange(h * w, device=x.device).expand(b, -1)
    by_position = torch.argsort(torch.where(outside, position, h * w + position), dim=1, stable=True)
    pri = priorities.to(torch.float64)
    by_priority = torch.argsort(torch.where(outside, pri, 2.0 + pri), dim=1, stable=True)
    count = outside.sum(dim=1, keepdim=True)
    source = torch.where(position < count, by_priority, by_position)
    perm = torch.zeros_like(source).scatter_(1, by_position, source)
    pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    shuffled = pixels.gather(1, perm[..., None].expand(-1, -1, c)).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return {**batch, "image": shuffled}


def mask_outside(batch: Batch, _draw: Any = None, *, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    x = batch["image"]
    return {**batch, "image": torch.where(_outside(batch, threshold)[:, None], torch.zeros_like(x), x)}


def _data_range(x: torch.Tensor, value_range: tuple[float, float] | None) -> tuple[Any, Any]:
    if value_range is not None:
        return value_range
    return x.detach().min(), x.detach().max()


def counterexamples(batch: Batch, uniform: torch.Tensor, *, threshold: float = 0.5,
                    value_range: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
    """`1 - H` replaced by `low + (high - low) * uniform` (NCHW draw), as saljax's `counterexamples_from`."""
    x = batch["image"]
    low, high = _data_range(x, value_range)
    noise = low + (high - low) * uniform.to(x.dtype)
    return {**batch, "image": torch.where(_outside(batch, threshold)[:, None], noise, x)}


def _safe_norm(v: torch.Tensor) -> torch.Tensor:
    sq = (v * v).sum(dim=1)
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _activations(layer: str, logits: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
    if layer == "logits":
        return logits
    if layer == "pooled":
        return feature_map.mean(dim=(2, 3))
    return feature_map.permute(0, 2, 3, 1).reshape(feature_map.shape[0], -1)


def actdiff(lam: float = 1.0, *, layer: str = "pooled", threshold: float = 0.5, name: str = "actdiff") -> Term:
    """ActDiff: `mean_n m_n ||z(x~) - z(x)||_2`, x~ the outside pixels shuffled (draw `uniform/<name>`)."""
    _choice("layer", layer, ("pooled", "feature_map", "logits"))

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        shuffled = shuffle_outside(batch, batch[f"uniform/{name}"], threshold=threshold)["image"]
        logits_t, feature_map_t = fwd.rerun(shuffled)
        diff = _activations(layer, logits_t, feature_map_t) - _activations(layer, fwd.logits, fwd.feature_map)
        per = _safe_norm(diff.to(torch.promote_types(diff.dtype, torch.float32)))
        return _masked_mean(per, _weights(batch, per))

    return Term(name, fn, lam, eager_only=True)


def sgt(lam: float = 1.0, *, fraction: float = 0.5, abs_saliency: bool = False,
        value_range: tuple[float, float] | None = None, name: str = "sgt") -> Term:
    """SGT: `kl_div(log_softmax(f(x~)), softmax(f(x)), "batchmean")`, x~ the lowest-saliency features noised."""

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        x = fwd.images
        labels = batch["label"]
        grad = fwd.input_gradient(lambda z: z.gather(1, labels[:, None])[:, 0]).detach()
        sal = grad.abs() if abs_saliency else grad
        flat = sal.permute(0, 2, 3, 1).reshape(sal.shape[0], -1)  # saljax's (H, W, C) order
        k = int(fraction * flat.shape[1])
        lowest = torch.argsort(flat, dim=1, stable=True)[:, :k]
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
        mask = mask.reshape(sal.shape[0], sal.shape[2], sal.shape[3], sal.shape[1]).permute(0, 3, 1, 2)
        low, high = _data_range(x, value_range)
        noise = low + (high - low) * batch[f"uniform/{name}"].to(x.dtype)
        logits_t, _ = fwd.rerun(torch.where(mask, noise, x.detach()))
        up = lambda z: z.to(torch.promote_types(z.dtype, torch.float32))
        return F.kl_div(F.log_softmax(up(logits_t), dim=1), F.softmax(up(fwd.logits), dim=1), reduction="batchmean")

    return Term(name, fn, lam, needs_input_gradient=True, eager_only=True)


def transformed_ce(transform: Callable[..., Batch] = counterexamples, weight: float = 1.0, *,
                   name: str = "ce_transformed") -> Term:
    """Mean CE on `transform(batch, batch["uniform/<name>"])`, a second pass."""

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        changed = transform(batch, batch.get(f"uniform/{name}"))
        logits_t, _ = fwd.rerun(changed["image"])
        return _ce_per_sample(logits_t, changed["label"]).mean()

    return Term(name, fn, weight, eager_only=True)


# --- presets: saljax's table, read by path (this interpreter has no jax) -------------------------------------

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

_TERMS: Mapping[str, Callable[..., Term]] = {
    "gradmask": gradmask, "rrr": rrr, "rbr": rbr, "cyborg": cyborg, "dd_difference": dd_difference,
    "dd_paired": dd_paired, "dd_divergence": dd_divergence, "rrr_g": rrr_g, "hint": hint, "actdiff": actdiff,
    "sgt": sgt, "transformed_ce": transformed_ce,
}
_TRANSFORMS: Mapping[str, Callable[..., Batch]] = {
    "counterexamples": counterexamples, "mask_outside": mask_outside, "shuffle_outside": shuffle_outside,
}


def for_method(method: str, **options: Any) -> Loss:
    """The full loss of a method, as `saljax.losses.for_method` (same table, same option routing)."""
    return _TABLE.build(method, options, combine=combine, cross_entropy=cross_entropy, terms=_TERMS,
                        transforms=_TRANSFORMS, partial=functools.partial)


METHODS: Mapping[str, Callable[..., Loss]] = {name: functools.partial(for_method, name) for name in PRESETS}
