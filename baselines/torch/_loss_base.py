"""The machinery of the PyTorch losses: scores, the shared forward pass, Term, Loss, combine, helpers.

See `baselines.torch.losses` for the public names and how the baseline computes things.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

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
