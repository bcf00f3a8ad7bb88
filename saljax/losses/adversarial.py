"""ActDiff's adversarial variant: a discriminator between the activations of `x` and of `x~`.

Viviano, Simpson, Dutil, Bengio, Cohen, "Saliency is a possible red herring when diagnosing poor
generalization", ICLR 2021, in the form of the authors' released ResNet code:

- `x~` is `x` with the pixels outside the mask permuted per image (as ActDiff), `z` the pooled
  features before the head (`layer="pooled"`), for `x` ("real", label 1) and `x~` ("fake", label 0).
- The discriminator `D` is an MLP `d -> 1024 -> 1024 -> 1024 -> 1`: three spectrally normalised
  linear layers, each followed by ReLU, then a plain linear layer and a sigmoid. Spectral
  normalisation is PyTorch's: one power iteration per call (the vector `u` is state), the weight
  divided by `u^T W v` with `u`, `v` held constant. Initialisation: PyTorch's `nn.Linear`
  (uniform in `+-1/sqrt(fan_in)`), `u` a normalised standard normal draw.
- Every step, first `D` takes one Adam step (`lr`, default 1e-4; betas 0.9, 0.999, eps 1e-8) on
  `lam * (BCE(D(z), 1) + BCE(D(z~), 0))` with `z`, `z~` held constant; then the classifier's term
  is `BCE(D'(z), 0) + BCE(D'(z~), 1)` with the updated `D'` held constant (labels flipped, not a
  gradient reversal), differentiated through both passes. `D` is called four times per step, each
  call advancing `u`, in that order.
- The classifier's optimizer applies its update on every `update_every`-th step only (the authors'
  `disc_iter`); the gradients of the other steps are dropped, not accumulated. `D` steps every step.

BCE is written with `log_sigmoid` and clamped at -100 as PyTorch's `BCELoss` clamps its logs; it
equals `BCELoss(sigmoid(a))` wherever the float32 sigmoid does not round to 0 or 1. Means run over
the samples that carry a map (`has_map`; all of them in the authors' setting). The `x~` pass moves
no BatchNorm statistics (see `saljax.losses.base`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from saljax import batch as batch_lib
from saljax.losses import _common, transforms
from saljax.losses.base import Forward, Term, Value
from saljax.losses.second_pass import ACTDIFF_LAYERS, _activations

Batch = batch_lib.Batch

__all__ = ["actdiff_discriminator", "discriminator_init", "discriminator_apply", "discriminator_step"]

_EPS = 1e-12  # PyTorch's spectral_norm eps
_LOG_CLAMP = -100.0  # PyTorch's BCELoss clamps log(p) and log(1 - p) at -100


def discriminator_init(key: jax.Array, in_features: int, hidden: Sequence[int] = (1024, 1024, 1024)) -> dict[str, Any]:
    """Parameters and power-iteration vectors of `D`: `{"params": {...}, "u": {...}}`.

    `params["layer<i>"]` = {"kernel": (fan_in, fan_out), "bias": (fan_out,)} for the spectrally
    normalised layers, `params["out"]` the final (fan_in, 1) layer; `u["layer<i>"]` (fan_out,).
    """
    sizes = [in_features, *hidden]
    keys = jax.random.split(key, 3 * len(hidden) + 2)
    params: dict[str, Any] = {}
    us: dict[str, jax.Array] = {}

    def linear(k_w: jax.Array, k_b: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
        bound = 1.0 / math.sqrt(fan_in)
        return {"kernel": jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
                "bias": jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound)}

    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"layer{i}"] = linear(keys[3 * i], keys[3 * i + 1], fan_in, fan_out)
        us[f"layer{i}"] = _normalize(jax.random.normal(keys[3 * i + 2], (fan_out,), jnp.float32))
    params["out"] = linear(keys[-2], keys[-1], sizes[-1], 1)
    return {"params": params, "u": us}


def _normalize(v: jax.Array) -> jax.Array:
    return v / jnp.maximum(jnp.linalg.norm(v), _EPS)


def discriminator_apply(params: dict[str, Any], u: dict[str, jax.Array], z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`D`'s logits (B,) on `z` (B, d) and the advanced power-iteration vectors (one iteration per layer)."""
    h = z
    new_u = {}
    for name in sorted(u, key=lambda n: int(n[len("layer"):])):
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        w = jax.lax.stop_gradient(kernel)
        v = _normalize(w @ u[name])  # W^T u with W = kernel^T (fan_out, fan_in), PyTorch's layout
        new_u[name] = _normalize(v @ w)  # W v
        sigma = jnp.dot(new_u[name], v @ kernel)
        h = jax.nn.relu(h @ (kernel / sigma) + bias)
    return (h @ params["out"]["kernel"] + params["out"]["bias"])[:, 0], new_u


def _bce(logit: jax.Array, target: float) -> jax.Array:
    """Per-sample BCE of `sigmoid(logit)` against a constant target, logs clamped at -100."""
    log_p = jnp.maximum(jax.nn.log_sigmoid(logit), _LOG_CLAMP)
    log_q = jnp.maximum(jax.nn.log_sigmoid(-logit), _LOG_CLAMP)
    return -(target * log_p + (1.0 - target) * log_q)


def discriminator_step(
    state: dict[str, Any], z: jax.Array, z_t: jax.Array, weights: jax.Array, *, lam: float, lr: float
) -> tuple[jax.Array, dict[str, Any]]:
    """One step of the game: `D`'s Adam step, then the classifier's term. Returns (term, new state).

    `z`, `z_t` (B, d): activations of `x` and `x~` (differentiable: the term's gradient reaches the
    classifier through both); `weights` (B,) the samples to average over. The new state holds `D`'s
    parameters, `u`, Adam state and `metrics["discriminator"]`, its loss before the step (without lam).
    """
    z, z_t = _common.as_float(z), _common.as_float(z_t)
    z_c, z_t_c = jax.lax.stop_gradient(z), jax.lax.stop_gradient(z_t)

    def d_loss(params: dict[str, Any]) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
        real, u1 = discriminator_apply(params, state["u"], z_c)
        fake, u2 = discriminator_apply(params, u1, z_t_c)
        plain = _common.masked_mean(_bce(real, 1.0), weights) + _common.masked_mean(_bce(fake, 0.0), weights)
        return lam * plain, (plain, u2)

    grads, (plain, u2) = jax.grad(d_loss, has_aux=True)(state["params"])
    updates, opt_state = optax.adam(lr).update(grads, state["opt_state"], state["params"])
    params = jax.lax.stop_gradient(optax.apply_updates(state["params"], updates))
    real, u3 = discriminator_apply(params, u2, z)
    fake, u4 = discriminator_apply(params, u3, z_t)
    value = _common.masked_mean(_bce(real, 0.0), weights) + _common.masked_mean(_bce(fake, 1.0), weights)
    new_state = {"params": params, "u": jax.lax.stop_gradient(u4), "opt_state": opt_state,
                 "metrics": {"discriminator": jax.lax.stop_gradient(plain)}}
    return value, new_state


def actdiff_discriminator(
    lam: float = 1.0,
    *,
    lr: float = 1e-4,
    update_every: int = 1,
    hidden: Sequence[int] = (1024, 1024, 1024),
    layer: str = "pooled",
    threshold: float = 0.5,
    name: str = "actdiff_discriminator",
) -> Term:
    """ActDiff's adversarial variant (Viviano et al., ICLR 2021): the classifier fools a discriminator of z(x) vs z(x~).

    See the module docstring for the exact game. `lam` weighs the classifier's term (the total is
    `combine(cross_entropy(), actdiff_discriminator(lam))` = CE + lam * term) and, as in the
    authors' code, the discriminator's own loss. `lr`: the discriminator's Adam rate; `update_every`:
    the classifier's optimizer steps on every k-th step only (the authors' `disc_iter`; 0 and 1
    both mean every step there). Defaults are the authors' code defaults (their lam default 0
    switches the method off; saljax uses 1 as for ActDiff); their tuned setting on the red-herring
    synthetic data is lam 10, update_every 10, lr 0.01 (classifier Adam 3.71e-4). `x~`: the draw is
    uniform (B, H*W) from `term_key(key, name)`, as `actdiff`. The term keeps state (`init`): train
    with `make_train_step` on a state from `init_train_state(..., loss=loss, images=...)`.
    """
    _common.choice("layer", layer, ACTDIFF_LAYERS)
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an integer >= 1; got {update_every!r}")
    hidden = tuple(hidden)
    if not hidden or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in hidden):
        raise ValueError(f"hidden must be a non-empty sequence of positive integers; got {hidden!r}")

    def init(key: jax.Array, logits: jax.ShapeDtypeStruct, feature_map: jax.ShapeDtypeStruct) -> dict[str, Any]:
        z = jax.eval_shape(lambda lg, fm: _activations(layer, lg, fm), logits, feature_map)
        state = discriminator_init(key, int(z.shape[-1]), hidden)
        state["opt_state"] = optax.adam(lr).init(state["params"])
        state["metrics"] = {"discriminator": jnp.zeros((), jnp.float32)}
        return state

    def fn(fwd: Forward, batch: Batch) -> tuple[Value, dict[str, Any]]:
        x = fwd.images
        priorities = jax.random.uniform(fwd.key_for(name), (x.shape[0], x.shape[1] * x.shape[2]), x.dtype)
        shuffled = transforms.shuffle_outside_from(batch, priorities, threshold=threshold)[batch_lib.IMAGE]
        logits_t, feature_map_t = fwd.rerun(jax.lax.stop_gradient(shuffled))
        z = _activations(layer, fwd.logits, fwd.feature_map)
        z_t = _activations(layer, logits_t, feature_map_t)
        return discriminator_step(fwd.state_of(name), z, z_t, batch_lib.map_weights(batch), lam=lam, lr=lr)

    return Term(name, fn, lam, needs_map=True, needs_key=True, needs_feature_map=layer != "logits", init=init,
                update_every=update_every)
