"""Saliency maps: pure, batched, jit/vmap-able and differentiable with respect to the parameters.

Models are plain callables, so NNX modules, Linen `apply` closures and functions all fit:
- gradient methods take `model: x (B, H, W, C) -> logits (B, K)`;
- CAM methods take `features: x -> A (B, h, w, C')` and `head: A -> logits (B, K)`.

`target` is what is explained: an int array (B,) (or a scalar, broadcast) of classes whose logit
is the score, or a callable `logits (B, K) -> scores (B,)` such as `log_softmax_score(y)` or
GradMask's `contrast_score(y)`. Argument names follow captum (`target`, `baselines`, `n_steps`,
`nt_samples`, `stdevs`).

Input gradients come from ONE forward pass and a VJP (`jax.vjp`), so a model with BatchNorm in
train mode runs its statistics update once. Gradients of a batch use `d/dx sum_n s_n`; with
BatchNorm in train mode samples interact, as in PyTorch's `autograd.grad(scores.sum(), x)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Score = Callable[[Array], Array]
Target = Array | int | Score

__all__ = [
    "logit_score",
    "log_softmax_score",
    "sum_log_softmax_score",
    "contrast_score",
    "nonhealthy_score",
    "input_gradient",
    "vanilla_gradient",
    "gradient_x_input",
    "smoothgrad",
    "integrated_gradients",
    "class_activation_maps",
    "cam",
    "grad_cam",
    "grad_cam_from_gradient",
    "select_class",
    "minmax_normalize",
]


# --- scores: logits (B, K) -> (B,) -------------------------------------------------------------


def _class_index(target: Array | int, logits: Array) -> Array:
    t = jnp.asarray(target)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"target must be an int array of class indices or a callable; got dtype {t.dtype}")
    b, k = logits.shape[0], logits.shape[-1]
    if not isinstance(target, jax.core.Tracer):  # concrete indices are checked here, traced ones cannot be
        values = np.asarray(target)
        if values.size and (values.min() < 0 or values.max() >= k):
            raise ValueError(f"target class indices must lie in [0, {k}) for {k} classes; got {np.unique(values).tolist()}")
    if t.ndim == 0:
        return jnp.full((b,), t)
    if t.shape != (b,):
        raise ValueError(f"target must have shape (B,) = ({b},) or be a scalar; got shape {t.shape}")
    return t


def _pick(values: Array, index: Array) -> Array:
    """values (B, K), index (B,) -> values[n, index[n]] (B,)."""
    return jnp.take_along_axis(values, index[:, None], axis=-1)[:, 0]


def logit_score(target: Array | int) -> Score:
    """`s_n = z[n, target_n]`: the target logit."""
    return lambda logits: _pick(logits, _class_index(target, logits))


def log_softmax_score(target: Array | int) -> Score:
    """`s_n = log p[n, target_n]`."""
    return lambda logits: _pick(jax.nn.log_softmax(logits), _class_index(target, logits))


def sum_log_softmax_score(logits: Array) -> Array:
    """`s_n = sum_k log p[n, k]`: RRR's score (all classes at once)."""
    return jnp.sum(jax.nn.log_softmax(logits), axis=-1)


def contrast_score(target: Array | int) -> Score:
    """GradMask's two-class logit contrast `|z_n0 - z_n1|`, generalised to K classes.

    For K classes: `|z_t - logsumexp_{k != t} z_k|`, the true-class logit against all others; for
    K = 2 it is exactly `|z_0 - z_1|`, the authors' score. (Note `grad(jnp.abs)(0.) == 1` in JAX
    and 0 in PyTorch; it matters only at an exact tie.)
    """

    def score(logits):
        t = _class_index(target, logits)
        k = logits.shape[-1]
        if k < 2:
            raise ValueError(f"contrast_score needs at least 2 classes; logits have shape {logits.shape}")
        true = _pick(logits, t)
        others = jnp.where(jax.nn.one_hot(t, k, dtype=bool), -jnp.inf, logits)
        return jnp.abs(true - jax.nn.logsumexp(others, axis=-1))

    return score


def nonhealthy_score(logits: Array) -> Array:
    """`|z_n1|`: the score of GradMask's early "nonhealthy" code (class 1 = lesion)."""
    if logits.shape[-1] < 2:
        raise ValueError(f"nonhealthy_score needs a class 1; logits have shape {logits.shape}")
    return jnp.abs(logits[:, 1])


def _as_score(target: Target) -> Score:
    return target if callable(target) else logit_score(target)


# --- gradient methods ----------------------------------------------------------------------------


def _check_inputs(inputs: Array, name: str = "inputs") -> None:
    if jnp.ndim(inputs) != 4:
        raise ValueError(f"{name} must have shape (B, H, W, C) (NHWC); got shape {jnp.shape(inputs)}")


def _check_logits(logits: Array, batch: int) -> None:
    if logits.ndim != 2 or logits.shape[0] != batch:
        raise ValueError(f"the model must return logits of shape (B, K) with B = {batch}; got {logits.shape}")


def input_gradient(model: Callable[[Array], Array], inputs: Array, target: Target) -> tuple[Array, Array]:
    """`g = d/dx sum_n s_n(model(x))` from one forward pass and a VJP.

    Returns:
      (g (B, H, W, C), logits (B, K)).
    """
    _check_inputs(inputs)
    score = _as_score(target)
    logits, vjp = jax.vjp(model, inputs)
    _check_logits(logits, inputs.shape[0])
    cotangent = jax.grad(lambda z: jnp.sum(score(z)))(logits)
    (grad,) = vjp(cotangent)
    return grad, logits


def vanilla_gradient(model: Callable[[Array], Array], inputs: Array, target: Target) -> Array:
    """Vanilla gradient `d s(z) / dx`, shape (B, H, W, C)."""
    return input_gradient(model, inputs, target)[0]


def gradient_x_input(model: Callable[[Array], Array], inputs: Array, target: Target) -> Array:
    """Gradient x input `x * d s(z) / dx`, shape (B, H, W, C)."""
    return inputs * vanilla_gradient(model, inputs, target)


def _fold_gradients(
    model: Callable[[Array], Array],
    target: Target,
    make_input: Callable[[Any], Array],
    params: Any,
    internal_batch_size: int | None,
    accumulate: Callable[[Any, Array, Any], Any],
    carry: Any,
) -> Any:
    """Folds `accumulate(carry, grads, params_chunk)` over input gradients at `make_input(p)`.

    `params` is a pytree whose leaves share a leading axis (one entry per step or sample), and
    `grads` is (n, B, H, W, C) for a chunk of n entries. `internal_batch_size=None` runs one entry
    at a time in a `lax.scan` (memory of one pass); an int k runs k entries per vmapped pass, the
    passes unrolled and serialised by an optimisation barrier. XLA:CPU runs a scan body around a
    conv net several times slower than the same ops unrolled; without the barrier XLA would run
    the unrolled passes side by side and hold all their activations at once.
    """
    grad_at = lambda p: vanilla_gradient(model, make_input(p), target)
    if internal_batch_size is None:
        def step(c, p):
            return accumulate(c, grad_at(p)[None], jax.tree.map(lambda a: a[None], p)), None

        return jax.lax.scan(step, carry, params)[0]
    if internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be >= 1 or None; got {internal_batch_size}")
    count = jax.tree.leaves(params)[0].shape[0]
    for start in range(0, count, internal_batch_size):
        chunk = jax.tree.map(lambda a, s=start: a[s:s + internal_batch_size], params)
        chunk, carry = jax.lax.optimization_barrier((chunk, carry))
        carry = accumulate(carry, jax.vmap(grad_at)(chunk), chunk)
    return carry


_NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def smoothgrad(
    model: Callable[[Array], Array],
    inputs: Array,
    target: Target,
    *,
    key: Array,
    nt_samples: int = 25,
    stdevs: float = 0.15,
    relative: bool = True,
    nt_type: str = "smoothgrad",
    internal_batch_size: int | None = None,
) -> Array:
    """SmoothGrad: statistics of gradients at noisy copies of the inputs, shape (B, H, W, C).

    `e ~ N(0, sigma^2)` per element, with `sigma = stdevs * (max - min)` over each sample's values
    when `relative` (the SmoothGrad paper's noise level), or `sigma = stdevs` (captum's convention).
    `nt_type`: "smoothgrad" (mean of g), "smoothgrad_sq" (mean of g^2), "vargrad" (variance of g).
    `internal_batch_size`: noisy copies per vmapped pass; None runs them one at a time in a
    `lax.scan` (memory of one pass), an int k is faster on CPU at k times the memory.
    """
    _check_inputs(inputs)
    if nt_type not in _NT_TYPES:
        raise ValueError(f"nt_type must be one of {_NT_TYPES}; got {nt_type!r}")
    if nt_samples < 1:
        raise ValueError(f"nt_samples must be >= 1; got {nt_samples}")
    if relative:
        axes = tuple(range(1, inputs.ndim))
        span = jnp.max(inputs, axis=axes, keepdims=True) - jnp.min(inputs, axis=axes, keepdims=True)
        sigma = stdevs * span
    else:
        sigma = jnp.asarray(stdevs)

    zeros = jnp.zeros_like(inputs)
    total, total_sq = _fold_gradients(
        model, target, lambda k: inputs + sigma * jax.random.normal(k, inputs.shape, inputs.dtype),
        jax.random.split(key, nt_samples), internal_batch_size,
        lambda c, g, _: (c[0] + g.sum(0), c[1] + (g * g).sum(0)), (zeros, zeros))
    mean = total / nt_samples
    if nt_type == "smoothgrad":
        return mean
    mean_sq = total_sq / nt_samples
    if nt_type == "smoothgrad_sq":
        return mean_sq
    return mean_sq - mean * mean


_IG_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def _ig_nodes(method: str, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes a_k in [0, 1] and weights w_k (summing to 1) of the path integral's quadrature."""
    if method not in _IG_METHODS:
        raise ValueError(f"method must be one of {_IG_METHODS}; got {method!r}")
    if n_steps < (2 if method == "riemann_trapezoid" else 1):
        raise ValueError(f"n_steps must be >= {2 if method == 'riemann_trapezoid' else 1} for {method}; got {n_steps}")
    k = np.arange(n_steps, dtype=np.float64)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return (nodes + 1.0) / 2.0, weights / 2.0
    if method == "riemann_trapezoid":
        weights = np.full(n_steps, 1.0 / (n_steps - 1))
        weights[[0, -1]] /= 2.0
        return k / (n_steps - 1), weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return (k + offset) / n_steps, np.full(n_steps, 1.0 / n_steps)


def integrated_gradients(
    model: Callable[[Array], Array],
    inputs: Array,
    target: Target,
    *,
    baselines: Array | float = 0.0,
    n_steps: int = 50,
    method: str = "gausslegendre",
    return_convergence_delta: bool = False,
    internal_batch_size: int | None = None,
) -> Array | tuple[Array, Array]:
    """Integrated Gradients `(x - x0) * sum_k w_k g(x0 + a_k (x - x0))`, shape (B, H, W, C).

    `method` picks the quadrature of the path integral: Riemann sums (left, right, middle,
    trapezoid) or Gauss-Legendre (exact for polynomial paths of degree < 2 n_steps). Completeness:
    the attributions of sample n sum to `s(x_n) - s(x0_n)`; with `return_convergence_delta` the
    per-sample error of that sum (B,) is returned too. `internal_batch_size` as in `smoothgrad`.
    """
    _check_inputs(inputs)
    baselines = jnp.broadcast_to(jnp.asarray(baselines, inputs.dtype), inputs.shape)
    nodes, weights = _ig_nodes(method, n_steps)
    delta_x = inputs - baselines

    path = (jnp.asarray(nodes, inputs.dtype), jnp.asarray(weights, inputs.dtype))
    total = _fold_gradients(
        model, target, lambda p: baselines + p[0] * delta_x, path, internal_batch_size,
        lambda t, g, p: t + jnp.tensordot(p[1], g, axes=1), jnp.zeros_like(inputs))
    attributions = delta_x * total
    if not return_convergence_delta:
        return attributions
    score = _as_score(target)
    expected = score(model(inputs)) - score(model(baselines))
    return attributions, jnp.sum(attributions, axis=tuple(range(1, inputs.ndim))) - expected


# --- CAM methods ---------------------------------------------------------------------------------


def class_activation_maps(head: Callable[[Array], Array], feature_map: Array) -> Array:
    """CAMs of every class, `CAM_c = sum_k W[k, c] A[..., k]` (no bias, no ReLU): (B, h, w, K).

    The head is applied to every feature-map pixel as a 1x1 map and linearised at zero (a JVP), so
    the kernel `W` need not be exposed and the bias drops out exactly. Exact when the head is
    GAP + Dense: then `z_c = b_c + mean_ij CAM_c(i, j)`.
    """
    if feature_map.ndim != 4:
        raise ValueError(f"feature_map must have shape (B, h, w, C'); got {feature_map.shape}")
    b, h, w, c = feature_map.shape
    pixels = feature_map.reshape(b * h * w, 1, 1, c)
    _, cams = jax.jvp(head, (jnp.zeros_like(pixels),), (pixels,))
    return cams.reshape(b, h, w, -1)


def cam(
    features: Callable[[Array], Array], head: Callable[[Array], Array], inputs: Array, target: Array | int
) -> Array:
    """CAM of the target class (B,) at the feature-map resolution: (B, h, w)."""
    _check_inputs(inputs)
    return select_class(class_activation_maps(head, features(inputs)), target)


def select_class(maps: Array, target: Array | int) -> Array:
    """The map of each sample's target class: maps (B, h, w, K), target (B,) or scalar -> (B, h, w)."""
    index = _class_index(target, maps[:, 0, 0, :])
    return jnp.take_along_axis(maps, index[:, None, None, None], axis=-1)[..., 0]


def grad_cam_from_gradient(feature_map: Array, feature_gradient: Array, *, relu: bool = True) -> Array:
    """Grad-CAM from a feature map A (B, h, w, C') and `d s / d A` of the same shape: (B, h, w).

    `sum_k alpha_k A_k` with `alpha_k = mean_ij d s / d A_k` (Selvaraju et al., ICCV 2017), followed
    by a ReLU unless `relu=False` (the signed form some training penalties use).
    """
    alpha = jnp.mean(feature_gradient, axis=(1, 2))
    weighted = jnp.einsum("bhwk,bk->bhw", feature_map, alpha)
    return jax.nn.relu(weighted) if relu else weighted


def grad_cam(
    features: Callable[[Array], Array], head: Callable[[Array], Array], inputs: Array, target: Target
) -> Array:
    """Grad-CAM `relu(sum_k alpha_k A_k)`, `alpha_k = mean_ij d s / d A_k`: (B, h, w)."""
    _check_inputs(inputs)
    feature_map = features(inputs)
    return grad_cam_from_gradient(feature_map, vanilla_gradient(head, feature_map, target))


def minmax_normalize(values: Array, *, eps: float = 1e-8, axes: tuple[int, ...] = (1, 2)) -> Array:
    """Per-sample min-max `(v - min) / (max - min + eps)` over the spatial `axes`.

    `eps` guards constant maps (CYBORG's code has none: `eps=0.0` reproduces it, NaN included).
    """
    lo = jnp.min(values, axis=axes, keepdims=True)
    hi = jnp.max(values, axis=axes, keepdims=True)
    return (values - lo) / (hi - lo + eps)
