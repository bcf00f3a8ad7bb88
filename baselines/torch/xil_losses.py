"""PyTorch RBR, RRR-G, HINT (XIL's forms), ActDiff, SGT, counterexamples and the image transforms.

As `saljax.losses` computes them, written the way their authors' PyTorch code works (autograd.grad
with create_graph, F.interpolate, kl_div). Random draws come from saljax through the batch
(`batch["uniform/<term name>"]`), see `baselines.torch.losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from baselines.torch import decomposition
from baselines.torch._loss_base import (
    Batch,
    Forward,
    Term,
    _ce_per_sample,
    _choice,
    _maps,
    _masked_mean,
    _penalty_reduce,
    _weights,
    minmax_normalize,
    sum_log_softmax_score,
)

__all__ = ["cdep", "rbr", "rrr_g", "hint", "actdiff", "actdiff_discriminator", "discriminator_step", "sgt",
           "transformed_ce", "shuffle_outside", "mask_outside", "counterexamples"]


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


# --- ActDiff's adversarial discriminator ------------------------------------------------------------------


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp(min=1e-12)


def _discriminate(params: dict[str, Any], u: dict[str, torch.Tensor], z: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D's logits (B,): spectrally normalised layers (one power iteration each, u, v constant), ReLU, a plain layer."""
    h, new_u = z, {}
    for name in sorted(u, key=lambda n: int(n[len("layer"):])):
        kernel, bias = params[name]["kernel"], params[name]["bias"]  # kernel (fan_in, fan_out), saljax's layout
        with torch.no_grad():
            v = _normalize(kernel @ u[name])
            new_u[name] = _normalize(v @ kernel)
        sigma = torch.dot(new_u[name], v @ kernel)
        h = torch.relu(h @ (kernel / sigma) + bias)
    return (h @ params["out"]["kernel"] + params["out"]["bias"])[:, 0], new_u


def _bce(logit: torch.Tensor, target: float) -> torch.Tensor:
    log_p = F.logsigmoid(logit).clamp(min=-100.0)
    log_q = F.logsigmoid(-logit).clamp(min=-100.0)
    return -(target * log_p + (1.0 - target) * log_q)


def _adam(params: dict[str, Any], grads: dict[str, Any], opt: dict[str, Any], lr: float,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> tuple[dict[str, Any], dict[str, Any]]:
    """torch.optim.Adam's step (no weight decay) on nested dicts; `opt` = {"count", "mu", "nu"}."""
    count = opt["count"] + 1
    t = float(count)

    def tree(f: Callable[..., Any], *trees: Any) -> Any:
        if isinstance(trees[0], dict):
            return {k: tree(f, *(x[k] for x in trees)) for k in trees[0]}
        return f(*trees)

    mu = tree(lambda m, g: b1 * m + (1 - b1) * g, opt["mu"], grads)
    nu = tree(lambda n, g: b2 * n + (1 - b2) * g * g, opt["nu"], grads)
    new = tree(lambda p, m, n: p - lr * (m / (1 - b1 ** t)) / ((n / (1 - b2 ** t)).sqrt() + eps), params, mu, nu)
    return new, {"count": count, "mu": mu, "nu": nu}


def discriminator_step(state: dict[str, Any], z: torch.Tensor, z_t: torch.Tensor, weights: torch.Tensor, *,
                       lam: float, lr: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """`saljax.losses.adversarial.discriminator_step`: D's Adam step on lam * (BCE(D(z), 1) + BCE(D(z~), 0))
    with z, z~ detached, then the classifier's term BCE(D'(z), 0) + BCE(D'(z~), 1) with D' held constant.

    `state`: {"params", "u", "opt_state": {"count", "mu", "nu"}} (kernels (fan_in, fan_out)).
    """
    params = {k: {n: p.detach().requires_grad_(True) for n, p in layer.items()} for k, layer in state["params"].items()}
    real, u1 = _discriminate(params, state["u"], z.detach())
    fake, u2 = _discriminate(params, u1, z_t.detach())
    plain = _masked_mean(_bce(real, 1.0), weights) + _masked_mean(_bce(fake, 0.0), weights)
    leaves = [p for layer in params.values() for p in layer.values()]
    flat = torch.autograd.grad(lam * plain, leaves)
    it = iter(flat)
    grads = {k: {n: next(it) for n in layer} for k, layer in params.items()}
    with torch.no_grad():
        new_params, opt = _adam({k: {n: p.detach() for n, p in layer.items()} for k, layer in params.items()},
                                grads, state["opt_state"], lr)
    real, u3 = _discriminate(new_params, u2, z)
    fake, u4 = _discriminate(new_params, u3, z_t)
    value = _masked_mean(_bce(real, 0.0), weights) + _masked_mean(_bce(fake, 1.0), weights)
    return value, {"params": new_params, "u": u4, "opt_state": opt, "metrics": {"discriminator": plain.detach()}}


def actdiff_discriminator(lam: float = 1.0, *, lr: float = 1e-4, update_every: int = 1,
                          hidden: tuple[int, ...] = (1024, 1024, 1024), layer: str = "pooled", threshold: float = 0.5,
                          name: str = "actdiff_discriminator", state: dict[str, Any] | None = None) -> Term:
    """ActDiff's adversarial variant (draw `uniform/<name>` as actdiff). The discriminator's state lives in
    the mutable dict `state` (give its "params", "u", "opt_state" from saljax's); each call advances it.
    `update_every` and `hidden` are the caller's business here (the training loop; the given state's shapes).
    """
    _choice("layer", layer, ("pooled", "feature_map", "logits"))
    del update_every, hidden
    holder = state if state is not None else {}

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        if "params" not in holder:
            raise ValueError(f"the loss term {name!r} keeps state: build it with state={{'params': ..., 'u': ...,"
                             " 'opt_state': ...}}")
        shuffled = shuffle_outside(batch, batch[f"uniform/{name}"], threshold=threshold)["image"]
        logits_t, feature_map_t = fwd.rerun(shuffled.detach())
        z = _activations(layer, fwd.logits, fwd.feature_map)
        z_t = _activations(layer, logits_t, feature_map_t)
        dtype = torch.promote_types(z.dtype, torch.float32)
        value, new = discriminator_step(holder, z.to(dtype), z_t.to(dtype), _weights(batch, z.to(dtype)), lam=lam, lr=lr)
        holder.update(new)
        return value

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


# --- CDEP (XIL's form) ----------------------------------------------------------------------------------------


def cdep(lam: float = 1.0, *, name: str = "cdep") -> Term:
    """CDEP (Rieger et al. 2020), XIL's form: `mean_{n: m_n = 1} mean_c softmax([beta_nc, gamma_nc])[0]`.

    `(beta, gamma)` the contextual decomposition of the logits (`baselines.torch.decomposition`) with
    the region `A = 1 - H`; the authors' `softmax(stack((rel, irrel)))[:, 0]` is `sigmoid(beta - gamma)`.
    The decomposition reads the model's parameters directly: eager route only.
    """

    def fn(fwd: Forward, batch: Batch) -> torch.Tensor:
        if fwd.model is None or fwd.images is None:
            raise RuntimeError("cdep needs the model and the images of the forward pass (eager route)")
        region = 1.0 - _maps(batch, fwd.images)
        beta, gamma = decomposition.decompose(fwd.model, fwd.images, region)
        dtype = torch.promote_types(beta.dtype, torch.float32)
        share = torch.softmax(torch.stack((beta.to(dtype), gamma.to(dtype)), dim=-1), dim=-1)[..., 0]
        per = share.mean(dim=1)
        return _masked_mean(per, _weights(batch, per))

    return Term(name, fn, lam, eager_only=True)
