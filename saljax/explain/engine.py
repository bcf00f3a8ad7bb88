"""The map engine: one jit-compiled function per model structure computes every requested map of a batch."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saljax import models, saliency
from saljax.explain.settings import BINARY_METHODS, CAM_METHODS, METHODS, ExplainConfig


def model_attr(model: Any, name: str) -> Any:
    return getattr(model, name, None)


def resolve_methods(model: nnx.Module, methods: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The methods to compute for `model`, checked; None picks every method the model supports.

    Raises:
      ValueError: unknown method; a CAM method (`CAM_METHODS`) on a model whose `head_type` is not
        'gap'; a true/false CAM or divergence map on a model whose `num_classes` is not 2.
    """
    head_type = model_attr(model, "head_type")
    num_classes = model_attr(model, "num_classes")
    if methods is None:
        return tuple(
            m
            for m in METHODS
            if (m not in CAM_METHODS or head_type == "gap") and (m not in BINARY_METHODS or num_classes == 2)
        )
    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m.strip()]
    methods = tuple(m.strip() for m in methods)
    if not methods:
        raise ValueError(f"methods must name at least one of {METHODS}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown explanation method(s) {unknown}; expected some of {METHODS}")
    for m in methods:
        if m in CAM_METHODS and head_type != "gap":
            raise ValueError(
                f"method {m!r} needs class activation maps, which are defined only for a model whose head is "
                f"global average pooling + Dense (head_type 'gap'); this model has head_type {head_type!r}"
            )
        if m in BINARY_METHODS and num_classes != 2:
            raise ValueError(
                f"method {m!r} compares the CAMs of the true and the false class and needs a binary model "
                f"(num_classes == 2); this model has num_classes={num_classes!r}"
            )
    return tuple(dict.fromkeys(methods))  # drop repeats, keep order


def _reduce_channels(values: jax.Array, how: str) -> jax.Array:
    """(B, H, W, C) -> non-negative (B, H, W) float32."""
    values = values.astype(jnp.float32)
    if how == "abs_sum":
        return jnp.sum(jnp.abs(values), axis=-1)
    if how == "square_sum":
        return jnp.sum(values * values, axis=-1)
    return jnp.max(jnp.abs(values), axis=-1)


def _upsample(values: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w) -> (B, H, W), bilinear with half-pixel centres (`jax.image.resize`)."""
    values = values.astype(jnp.float32)
    if tuple(values.shape[1:]) == tuple(size):
        return values
    return jax.image.resize(values, (values.shape[0], *size), method="bilinear")


def _score_fn(score: str, target: jax.Array) -> Callable[[jax.Array], jax.Array]:
    return saliency.logit_score(target) if score == "logit" else saliency.log_softmax_score(target)


def make_explain_fn(
    model: nnx.Module, methods: Sequence[str], config: ExplainConfig = ExplainConfig()
) -> Callable[[jax.Array, jax.Array, jax.Array], dict[str, Any]]:
    """One jit-compiled function computing every map of a batch, with the model in eval mode.

    Vanilla gradient, gradient x input and Grad-CAM share one forward pass and one VJP through
    `features` and `head` (the head's VJP gives `d s / d A` for Grad-CAM, continuing it through
    `features` gives `d s / dx`); the CAMs reuse that pass's feature map. Integrated Gradients and
    SmoothGrad run their own passes (`lax.scan` over the steps / samples).

    Args:
      model: an NNX model with `features`, `head`, `num_classes` (e.g. `saljax.models.create`);
        it is viewed with `use_running_average=True` and never modified.
      methods: names from `METHODS`, checked with `resolve_methods`.
      config: settings (target, score, reduce, IG and SmoothGrad parameters).

    Returns:
      `f(images (B, H, W, C), labels (B,) int, key) -> {"logits": (B, K), "maps": {method: (B, H,
      W)}, "lowres": {method: (B, h, w)}}` where "lowres" holds the feature-map-resolution maps
      (Grad-CAM, CAMs, divergence) before upsampling. `key` seeds SmoothGrad's noise.
    """
    methods = resolve_methods(model, tuple(methods))
    graphdef, state = nnx.split(models.in_mode(model, train=False))
    # Only the fields that change the computation key the cache (not batch size or metric options).
    jitted = _compiled_explain_fn(
        graphdef,
        methods,
        (config.target, config.score, config.reduce, config.ig_steps, config.ig_rule, config.ig_baseline,
         config.smoothgrad_samples, config.smoothgrad_stdevs, config.smoothgrad_type, config.max_unroll,
         config.steps_per_pass),
    )
    return lambda images, labels, key: jitted(state, images, labels, key)


@functools.lru_cache(maxsize=32)
def _compiled_explain_fn(graphdef: Any, methods: tuple[str, ...], options: tuple) -> Callable:
    """The jitted map computation of `make_explain_fn`, shared by models of one structure.

    Cached so that explaining several splits (or checkpoints of one architecture) compiles once;
    the parameters are an argument, never baked in.
    """
    (target_mode, score_name, reduce, ig_steps, ig_rule, ig_baseline, sg_samples, sg_stdevs, sg_type, max_unroll,
     steps_per_pass) = options
    wanted = set(methods)
    shared_grad = bool(wanted & {"gradient", "gradient_x_input", "grad_cam"})
    input_grad = bool(wanted & {"gradient", "gradient_x_input"})
    cams_needed = bool(wanted & set(CAM_METHODS))

    def compute(state, images, labels, key):
        net = nnx.merge(graphdef, state)
        size = images.shape[1:3]
        feature_map, features_vjp = jax.vjp(net.features, images)
        logits, head_vjp = jax.vjp(net.head, feature_map)
        target = labels if target_mode == "true" else jnp.argmax(logits, axis=-1).astype(labels.dtype)
        score = _score_fn(score_name, jax.lax.stop_gradient(target))
        maps: dict[str, jax.Array] = {}
        lowres: dict[str, jax.Array] = {}
        if shared_grad:
            cotangent = jax.grad(lambda z: jnp.sum(score(z)))(logits)
            (grad_a,) = head_vjp(cotangent)
            if "grad_cam" in wanted:
                grad_cam = saliency.grad_cam_from_gradient(feature_map.astype(jnp.float32), grad_a.astype(jnp.float32))
                lowres["grad_cam"] = grad_cam
                maps["grad_cam"] = _upsample(grad_cam, size)
            if input_grad:
                (grad_x,) = features_vjp(grad_a)
                if "gradient" in wanted:
                    maps["gradient"] = _reduce_channels(grad_x, reduce)
                if "gradient_x_input" in wanted:
                    maps["gradient_x_input"] = _reduce_channels(images * grad_x, reduce)
        # Up to max_unroll steps run as unrolled vmapped passes (faster on XLA:CPU), more in a scan.
        if "integrated_gradients" in wanted:
            attributions = saliency.integrated_gradients(
                net, images, score, baselines=ig_baseline, n_steps=ig_steps, method=ig_rule,
                internal_batch_size=steps_per_pass if ig_steps <= max_unroll else None)
            maps["integrated_gradients"] = _reduce_channels(attributions, reduce)  # type: ignore[arg-type]
        if "smoothgrad" in wanted:
            grads = saliency.smoothgrad(
                net, images, score, key=key, nt_samples=sg_samples, stdevs=sg_stdevs, nt_type=sg_type,
                internal_batch_size=steps_per_pass if sg_samples <= max_unroll else None)
            maps["smoothgrad"] = _reduce_channels(grads, reduce)
        if "rrr_gradient" in wanted:
            # RRR's score over all classes, through the same forward pass: a second VJP, no second forward.
            cotangent = jax.grad(lambda z: jnp.sum(saliency.sum_log_softmax_score(z)))(logits)
            (rrr_grad,) = features_vjp(head_vjp(cotangent)[0])
            maps["rrr_gradient"] = jnp.sum(rrr_grad.astype(jnp.float32), axis=-1)
        if cams_needed:
            cams = saliency.class_activation_maps(net.head, feature_map).astype(jnp.float32)  # (B, h, w, K)
            true_cam = saliency.select_class(cams, labels)
            false_cam = saliency.select_class(cams, 1 - labels)
            for name, value in (
                ("cam_true", true_cam),
                ("cam_false", false_cam),
                ("divergence", true_cam - false_cam),
            ):
                if name in wanted:
                    lowres[name] = value
                    maps[name] = _upsample(value, size)
        return {"logits": logits.astype(jnp.float32), "maps": maps, "lowres": lowres}

    return jax.jit(compute)


def explain_batch(
    model: nnx.Module,
    images: jax.Array,
    labels: jax.Array,
    *,
    methods: Sequence[str] | None = None,
    config: ExplainConfig = ExplainConfig(),
    key: jax.Array | None = None,
) -> dict[str, Any]:
    """The maps of one batch as numpy arrays (see `make_explain_fn`), without metrics.

    Compiled once per model structure, map settings and batch shape. For a dataset use `explain`,
    which also regroups the batches into one shape.
    """
    methods = resolve_methods(model, methods if methods is not None else config.methods)
    fn = make_explain_fn(model, methods, config)
    key = jax.random.key(config.seed) if key is None else key
    out = fn(jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32), key)
    return jax.tree.map(np.asarray, jax.device_get(out))


def supports_decomposition(model: nnx.Module) -> bool:
    """Whether every layer of `model` declares its contextual decomposition (CDEP's rules)."""
    return hasattr(model, "decompose_features") and hasattr(model, "decompose_head")


def make_cd_share_fn(model: nnx.Module, target: str = "true") -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """`f(images, labels, maps) -> (B,)`: the share of the explained class's logit due to `1 - H`.

    With the contextual decomposition `z = beta + gamma` of the logits, `beta` due to the region that
    must not matter (`(1 - H) * x`), the share is `exp(beta_c) / (exp(beta_c) + exp(gamma_c))` for the
    true (`target="true"`) or predicted class: CDEP's penalty per image, as a post-hoc measure.
    """
    graphdef, state = nnx.split(models.in_mode(model, train=False))

    @jax.jit
    def share(state: Any, images: jax.Array, labels: jax.Array, maps: jax.Array) -> jax.Array:
        net = nnx.merge(graphdef, state)
        beta, gamma = models.decompose(net, images, (1.0 - maps)[..., None])
        logits = beta + gamma
        index = labels if target == "true" else jnp.argmax(logits, axis=-1)
        return jax.nn.sigmoid(saliency.select_class((beta - gamma)[:, None, None, :], index)[:, 0, 0])

    return lambda images, labels, maps: share(state, images, labels, maps)
