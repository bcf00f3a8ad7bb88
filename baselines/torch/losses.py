"""PyTorch CE, GradMask, RRR, CYBORG and Divisive Decisions, as the authors' code computes them.

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
- per-sample min-max over the spatial axes with an `eps` guard (1e-8; 0 is CYBORG's code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Forward", "Term", "Loss", "combine", "cross_entropy", "gradmask", "rrr", "cyborg",
    "dd_difference", "dd_paired", "dd_divergence", "for_method", "METHODS",
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
                 input_gradient_fn: Callable[[Score], torch.Tensor] | None = None):
        self.logits, self.feature_map = logits, feature_map
        self._weight, self._input_gradient = classifier_weight, input_gradient_fn

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


def _gap_weight(model: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    return weight if getattr(model, "head_type", "gap") == "gap" else None


@dataclasses.dataclass(frozen=True)
class Term:
    """A named, weighted term `fn(forward, batch) -> scalar`."""

    name: str
    fn: Callable[[Forward, Batch], torch.Tensor]
    weight: float = 1.0
    needs_input_gradient: bool = False


@dataclasses.dataclass(frozen=True)
class Loss:
    """`sum_i weight_i * term_i` on one forward pass; returns (total, {name: value}, logits)."""

    terms: tuple[Term, ...]

    @property
    def needs_input_gradient(self) -> bool:
        return any(t.needs_input_gradient for t in self.terms)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Eager autograd, as the authors: `autograd.grad(score.sum(), x, create_graph=True)`."""
        x = batch["image"]
        if self.needs_input_gradient:
            x = x.detach().requires_grad_(True)
        feature_map = model.features(x)
        logits = model.head(feature_map)

        def input_gradient(score: Score) -> torch.Tensor:
            (grad,) = torch.autograd.grad(score(logits).sum(), x, create_graph=True)
            return grad

        fwd = Forward(logits, feature_map, classifier_weight=_gap_weight(model, model.classifier.weight),
                      input_gradient_fn=input_gradient)
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


def combine(*terms: Term) -> Loss:
    return Loss(tuple(terms))


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


# --- presets -----------------------------------------------------------------------------------------------


def _cam_method(term_fn: Callable[..., Term]) -> Callable[..., Loss]:
    def make(alpha: float = 0.5, **options: Any) -> Loss:
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
    """The full loss of a method, as `saljax.losses.for_method`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}")
    return METHODS[method](**options)
