"""saljax <-> PyTorch layouts of images, weights and BatchNorm statistics (pure numpy).

This is the only place where layouts are converted; it imports neither jax nor torch, so both
interpreters use it. Weights travel as flat dicts `{path: array}`:

| saljax (flax NNX)                          | PyTorch (state_dict)                        |
|--------------------------------------------|---------------------------------------------|
| `convs/0/kernel` (kh, kw, in, out) HWIO    | `convs.0.weight` (out, in, kh, kw) OIHW     |
| `classifier/kernel` (in, out)              | `classifier.weight` (out, in)               |
| `hidden/kernel` (h*w*C, n), (h, w, C) rows | `hidden.weight` (n, C*h*w), (C, h, w) cols  |
| `norms/0/scale`, `bias`                    | `norms.0.weight`, `bias`                    |
| `norms/0/mean`, `var`                      | `norms.0.running_mean`, `running_var`       |
| (none)                                     | `*.num_batches_tracked` (dropped)           |

Images are NHWC in saljax and NCHW in PyTorch; saliency maps (B, H, W) are the same in both.

Running variance: both frameworks normalise with the biased batch variance `v_b` (divide by
`N = B*h*w`), and both keep `0.9 * old + 0.1 * batch`, but flax averages `v_b` into its running
`var` while PyTorch averages the unbiased `v_b * N / (N - 1)`. `flax_running_var` recovers what
flax holds from PyTorch's `running_var`, the old value and `N`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "SEP",
    "MLP_HIDDEN",
    "torch_name",
    "flax_path",
    "to_torch",
    "from_torch",
    "nhwc_to_nchw",
    "nchw_to_nhwc",
    "flatten",
    "unflatten",
    "flax_running_var",
    "torch_running_var",
]

SEP = "/"  # separator of flax paths: "layer1/0/conv1/kernel"
MLP_HIDDEN = "hidden"  # SimpleCNN's 'mlp' head: the dense layer that reads the flattened map

_LEAF_TO_TORCH = {"scale": "weight", "mean": "running_mean", "var": "running_var", "bias": "bias"}
_LEAF_TO_FLAX = {"running_mean": "mean", "running_var": "var"}
_TORCH_ONLY = ("num_batches_tracked",)


def torch_name(path: str) -> str:
    """state_dict name of the flax path, e.g. `norms/0/scale` -> `norms.0.weight`, `*/kernel` -> `*.weight`."""
    *modules, leaf = path.split(SEP)
    leaf = "weight" if leaf == "kernel" else _LEAF_TO_TORCH.get(leaf, leaf)
    return ".".join([*modules, leaf])


def flax_path(name: str, *, is_norm: bool) -> str:
    """flax path of a state_dict name; `is_norm` tells BatchNorm's `weight` (`scale`) from a kernel."""
    *modules, leaf = name.split(".")
    if leaf == "weight":
        leaf = "scale" if is_norm else "kernel"
    else:
        leaf = _LEAF_TO_FLAX.get(leaf, leaf)
    return SEP.join([*modules, leaf])


def _is_mlp_hidden(path: str) -> bool:
    return path.split(SEP)[0] == MLP_HIDDEN


def _check_feature_shape(feature_shape: tuple[int, int, int] | None, path: str) -> tuple[int, int, int]:
    if feature_shape is None:
        raise ValueError(
            f"{path!r} reads a flattened feature map: pass mlp_feature_shape=(h, w, C) to convert its layout")
    return tuple(int(n) for n in feature_shape)  # type: ignore[return-value]


def _kernel_to_torch(path: str, kernel: np.ndarray, feature_shape: tuple[int, int, int] | None) -> np.ndarray:
    if kernel.ndim == 4:  # HWIO -> OIHW
        return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    if kernel.ndim != 2:
        raise ValueError(f"{path!r}: a kernel must be 4-D (conv) or 2-D (dense); got shape {kernel.shape}")
    if _is_mlp_hidden(path):
        # Rows are flattened in (h, w, C) order; torch flattens NCHW maps in (C, h, w) order.
        h, w, c = _check_feature_shape(feature_shape, path)
        n = kernel.shape[1]
        kernel = kernel.reshape(h, w, c, n).transpose(2, 0, 1, 3).reshape(c * h * w, n)
    return np.ascontiguousarray(kernel.T)  # (in, out) -> (out, in)


def _kernel_to_flax(path: str, weight: np.ndarray, feature_shape: tuple[int, int, int] | None) -> np.ndarray:
    if weight.ndim == 4:  # OIHW -> HWIO
        return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
    if weight.ndim != 2:
        raise ValueError(f"{path!r}: a weight must be 4-D (conv) or 2-D (dense); got shape {weight.shape}")
    kernel = weight.T
    if _is_mlp_hidden(path):
        h, w, c = _check_feature_shape(feature_shape, path)
        n = kernel.shape[1]
        kernel = kernel.reshape(c, h, w, n).transpose(1, 2, 0, 3).reshape(h * w * c, n)
    return np.ascontiguousarray(kernel)


def to_torch(
    flat: Mapping[str, Any], *, mlp_feature_shape: tuple[int, int, int] | None = None
) -> dict[str, np.ndarray]:
    """flax flat dict (params and BatchNorm statistics) -> PyTorch state_dict arrays.

    `mlp_feature_shape` (h, w, C): the feature map that SimpleCNN's 'mlp' head flattens; needed
    only when `hidden/kernel` is present. Dtypes are kept.
    """
    out = {}
    for path, value in flat.items():
        value = np.asarray(value)
        if path.split(SEP)[-1] == "kernel":
            value = _kernel_to_torch(path, value, mlp_feature_shape)
        out[torch_name(path)] = value
    return out


def from_torch(
    state: Mapping[str, Any],
    *,
    norm_modules: set[str] | frozenset[str],
    mlp_feature_shape: tuple[int, int, int] | None = None,
) -> dict[str, np.ndarray]:
    """PyTorch state_dict (or gradients keyed by parameter name) -> flax flat dict.

    `norm_modules`: the dotted names of the BatchNorm modules (`{"norms.0", "layer1.0.bn1", ...}`),
    whose `weight` is flax's `scale`. `num_batches_tracked` has no flax counterpart and is dropped.
    """
    out = {}
    for name, value in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf in _TORCH_ONLY:
            continue
        value = np.asarray(value)
        path = flax_path(name, is_norm=module in norm_modules)
        if path.split(SEP)[-1] == "kernel":
            value = _kernel_to_flax(path, value, mlp_feature_shape)
        out[path] = value
    return out


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    """Images (B, H, W, C) -> (B, C, H, W)."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """Images (B, C, H, W) -> (B, H, W, C)."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def flatten(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict (keys str or int, as `nnx.to_pure_dict`) -> `{"a/0/b": leaf}`."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{SEP}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[Any, Any]:
    """`{"a/0/b": leaf}` -> nested dict; all-digit keys become ints (nnx list indices)."""
    tree: dict[Any, Any] = {}
    for path, value in flat.items():
        keys = [int(k) if k.isdigit() else k for k in path.split(SEP)]
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


def flax_running_var(torch_var: np.ndarray, old_var: np.ndarray, count: int, momentum: float = 0.1) -> np.ndarray:
    """The running variance flax holds after the update that left PyTorch with `torch_var`.

    PyTorch: `torch_var = (1 - m) old + m v_b N / (N - 1)`; flax: `(1 - m) old + m v_b`, with
    `m` PyTorch's momentum (0.1 == flax's 0.9) and `N = count` values per channel (B*h*w).
    """
    if count < 2:
        raise ValueError(f"the unbiased variance needs count >= 2 values per channel; got {count}")
    decayed = (1.0 - momentum) * np.asarray(old_var)
    return decayed + (np.asarray(torch_var) - decayed) * ((count - 1) / count)


def torch_running_var(flax_var: np.ndarray, old_var: np.ndarray, count: int, momentum: float = 0.1) -> np.ndarray:
    """Inverse of `flax_running_var`: PyTorch's `running_var` from flax's updated `var`."""
    if count < 2:
        raise ValueError(f"the unbiased variance needs count >= 2 values per channel; got {count}")
    decayed = (1.0 - momentum) * np.asarray(old_var)
    return decayed + (np.asarray(flax_var) - decayed) * (count / (count - 1))
