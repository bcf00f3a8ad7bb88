"""The saljax side of the PyTorch comparison: run `baselines.torch.run` and compare its results.

Runs in the saljax interpreter (jax, no torch). PyTorch runs in its own interpreter, named by the
environment variable `SALJAX_TORCH_PYTHON` (`make test` sets it to `.venv-torch/bin/python`);
arrays travel as `.npz` files in saljax's layouts (see `baselines.torch.run` and `layout`).

    proc = start_torch(spec, arrays)      # starts the torch interpreter; returns at once
    ...                                   # compute the saljax side meanwhile
    torch_out = proc.result()             # {name: array}
    errors = compare(got, want, floor=...)
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baselines.torch import layout
from saljax import models

__all__ = [
    "ENV_VAR",
    "JAX_ACTIVATIONS",
    "TorchRun",
    "torch_python",
    "torch_env",
    "start_torch",
    "abstract_model",
    "flat_arrays",
    "load_flat",
    "relative_error",
    "compare",
]

ENV_VAR = "SALJAX_TORCH_PYTHON"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Activation names shared with baselines.torch.models.ACTIVATIONS.
JAX_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
}


def torch_python() -> str:
    """The interpreter with PyTorch, from `$SALJAX_TORCH_PYTHON`; raises with the way to set it."""
    path = os.environ.get(ENV_VAR)
    if not path:
        raise RuntimeError(
            f"{ENV_VAR} is not set: run `make test` (it builds .venv-torch with PyTorch and sets it), "
            f"or set {ENV_VAR} to a Python that has torch and numpy (e.g. .venv-torch/bin/python after "
            "`make torch-env`)")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise RuntimeError(f"{ENV_VAR}={path!r} is not an executable Python; `make torch-env` builds .venv-torch")
    return path


def torch_env() -> dict[str, str]:
    """The environment for the torch interpreter: this one's, with the repository first on PYTHONPATH
    (so that `baselines.torch` imports); run it with `cwd=REPO_ROOT`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


class TorchRun:
    """A running `python -m baselines.torch.run`; `result()` waits and loads OUT.npz."""

    def __init__(self, spec: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, timeout: float = 600.0):
        self._dir = tempfile.TemporaryDirectory(prefix="saljax-torch-")
        self._in = Path(self._dir.name) / "in.npz"
        self._out = Path(self._dir.name) / "out.npz"
        np.savez(self._in, spec=np.asarray(json.dumps(spec)), **arrays)
        self._timeout = timeout
        self._proc = subprocess.Popen(
            [torch_python(), "-m", "baselines.torch.run", str(self._in), str(self._out)],
            cwd=REPO_ROOT, env=torch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self) -> dict[str, np.ndarray]:
        try:
            output, _ = self._proc.communicate(timeout=self._timeout)
            if self._proc.returncode != 0 or not self._out.exists():
                raise RuntimeError(f"the torch baseline failed (exit {self._proc.returncode}):\n{output}")
            with np.load(self._out, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
            self._dir.cleanup()


def start_torch(spec: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, timeout: float = 600.0) -> TorchRun:
    """Starts the torch interpreter on the cases of `spec` (see `baselines.torch.run`)."""
    return TorchRun(spec, arrays, timeout=timeout)


def abstract_model(spec: Mapping[str, Any], dtype: Any) -> nnx.Module:
    """The saljax model of a spec ({"name", "kwargs"}) with `dtype` compute and params, unallocated.

    `nnx.eval_shape` skips the initialisers (no XLA compilation); load values with `load_flat`.
    """
    kwargs = dict(spec.get("kwargs", {}))
    if "activation" in kwargs:
        kwargs["activation"] = JAX_ACTIVATIONS[kwargs["activation"]]
    for key in ("channels", "input_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return nnx.eval_shape(lambda: models.create(spec["name"], dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0), **kwargs))


def flat_arrays(state: Any) -> dict[str, np.ndarray]:
    """An nnx.State (or a pytree of them) -> `{flax path: numpy array}`."""
    return {k: np.asarray(v) for k, v in layout.flatten(nnx.to_pure_dict(state)).items()}


def load_flat(state: nnx.State, flat: Mapping[str, Any], dtype: Any) -> nnx.State:
    """`state` with every leaf replaced by `flat[path]` cast to `dtype` (BatchNorm stats included)."""
    paths = set(layout.flatten(nnx.to_pure_dict(state)))
    missing = paths - set(flat)
    if missing:
        raise KeyError(f"no values for {sorted(missing)}")
    nnx.replace_by_pure_dict(state, layout.unflatten({p: jnp.asarray(flat[p], dtype) for p in paths}))
    return state


def relative_error(got: Any, want: Any, floor: float = 0.0) -> float:
    """`max |got - want| / max(max |want|, floor)` over the tensor (0 when both are zero)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(want))), floor)
    diff = float(np.max(np.abs(got - want)))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def compare(
    got: Mapping[str, Any], want: Mapping[str, Any], *, rtol: float, floor: float = 0.0
) -> tuple[list[str], dict[str, float]]:
    """Compares tensors by name: (mismatch lines, {name: relative error}).

    A line names the tensor, its shape, the relative error, the largest absolute difference and
    where it is; keys present on one side only are mismatches too.
    """
    problems, errors = [], {}
    for name in sorted(set(got) | set(want)):
        if name not in got or name not in want:
            problems.append(f"{name}: only in {'saljax' if name in got else 'torch'}")
            continue
        a, b = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        err = relative_error(a, b, floor)
        errors[name] = err
        if not err <= rtol:  # also catches NaN
            if a.shape != b.shape:
                problems.append(f"{name}: shape {a.shape} (saljax) vs {b.shape} (torch)")
                continue
            diff = np.abs(a - b)
            where = np.unravel_index(int(np.nanargmax(diff)), diff.shape) if diff.size else ()
            problems.append(
                f"{name}{list(map(int, where))}: relative error {err:.3g} > {rtol:g} "
                f"(max |diff| {float(np.nanmax(diff)):.3g}; saljax {a[where]:.8g}, torch {b[where]:.8g}; shape {a.shape})")
    return problems, errors

