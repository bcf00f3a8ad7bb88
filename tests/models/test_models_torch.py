"""RRR's MLP and XIL's CNN against their PyTorch mirrors (baselines.torch.models): same weights, same
batch, same loss value, logits and parameter gradients, in float64 and float32.

Relative error per tensor `max |saljax - torch| / max(max |torch|, floor)`, floor 0 for the loss and
logits and a fraction (float64 1e-6, float32 1e-3) of the largest parameter gradient for gradients.
PyTorch runs in `$SALJAX_TORCH_PYTHON` (see tests/test_torch_parity.py for the whole loss suite).
"""

from __future__ import annotations

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines.torch import bridge, layout
from saljax import classifier, losses

# One worker computes every case (the PyTorch side runs once, in one subprocess): `--dist loadgroup`.
# Slow: PyTorch in a subprocess over every case; `make test` runs it, `make test-fast` does not.
pytestmark = [pytest.mark.xdist_group("torch_parity_models"), pytest.mark.slow]

RTOL = {"float64": 1e-5, "float32": 1e-4}
FLOOR = {"float64": 1e-6, "float32": 1e-3}
MODELS = {
    "mlp": {"name": "mlp", "kwargs": {"num_classes": 3, "in_channels": 2, "input_size": [6, 5],
                                      "hidden_sizes": [7, 4]}, "image": (4, 6, 5, 2)},
    "xil_cnn": {"name": "xil_cnn", "kwargs": {"num_classes": 3, "in_channels": 2, "input_size": [20, 18],
                                              "channels": [3, 4], "kernel_size": 3, "mlp_hidden": 6,
                                              "activation": "softplus"}, "image": (4, 20, 18, 2)},
}
METHODS = ("ce", "gradmask", "rrr")
DTYPES = ("float64", "float32")
RUNS = [(f"{m}-{method}-{dtype}", m, method, dtype) for m in MODELS for method in METHODS for dtype in DTYPES]


def _weights(key: str, seed: int) -> dict[str, np.ndarray]:
    model = bridge.abstract_model(MODELS[key], jnp.float32)
    shapes = layout.flatten(nnx.to_pure_dict(nnx.state(model)))
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in sorted(shapes.items()):
        fan_in = int(np.prod(leaf.shape[:-1])) if path.endswith("kernel") else 4
        out[path] = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
    return out


def _batch(key: str, seed: int) -> dict[str, np.ndarray]:
    b, h, w, _ = MODELS[key]["image"]
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=MODELS[key]["image"]), "label": (np.arange(b) % 3).astype(np.int32),
            "saliency_map": rng.uniform(size=(b, h, w)).astype(np.float32).astype(np.float64),
            "has_map": np.asarray([1.0, 1.0, 0.0, 1.0])}


def _saljax(key: str, method: str, dtype_name: str, weights: dict, batch: dict) -> dict[str, np.ndarray]:
    with jax.enable_x64(dtype_name == "float64"):
        dtype = jnp.dtype(dtype_name)
        graphdef, params, state = nnx.split(bridge.abstract_model(MODELS[key], dtype), nnx.Param, ...)
        params = bridge.load_flat(params, weights, dtype)
        state = bridge.load_flat(state, weights, dtype)
        jax_batch = {"image": jnp.asarray(batch["image"], dtype), "label": jnp.asarray(batch["label"]),
                     "saliency_map": jnp.asarray(batch["saliency_map"], dtype),
                     "has_map": jnp.asarray(batch["has_map"], dtype)}
        loss = losses.for_method(method)

        @jax.jit
        def run(params):
            return jax.value_and_grad(lambda p: loss(classifier.from_nnx(graphdef, p, state), jax_batch),
                                      has_aux=True)(params)

        (value, aux), grads = jax.device_get(run(params))
    out = {"loss": np.asarray(value), "logits": np.asarray(aux.logits)}
    out.update({f"grad/{k}": v for k, v in bridge.flat_arrays(grads).items()})
    return out


@pytest.fixture(scope="session")
def results() -> dict[str, list[str]]:
    bridge.torch_python()  # raises with the way to set it up
    weights = {k: _weights(k, i) for i, k in enumerate(MODELS)}
    batches = {k: _batch(k, 10 + i) for i, k in enumerate(MODELS)}
    spec = {"models": {k: {"name": m["name"], "kwargs": m["kwargs"]} for k, m in MODELS.items()},
            "cases": [{"id": run_id, "model": m, "batch": m, "dtype": d, "method": method, "options": {},
                       "route": "eager"} for run_id, m, method, d in RUNS],
            "threads": 1}
    arrays = {f"model/{k}/{p}": v for k, w in weights.items() for p, v in w.items()}
    arrays.update({f"batch/{k}/{name}": v for k, b in batches.items() for name, v in b.items()})
    torch_run = bridge.start_torch(spec, arrays)
    ours = {run_id: _saljax(m, method, d, weights[m], batches[m]) for run_id, m, method, d in RUNS}
    torch_out = torch_run.result()
    problems = {}
    for run_id, _, _, dtype in RUNS:
        prefix = f"case/{run_id}/"
        if prefix + "error" in torch_out:
            problems[run_id] = [f"torch raised: {torch_out[prefix + 'error']}"]
            continue
        want = {k[len(prefix):]: v for k, v in torch_out.items()
                if k.startswith(prefix) and k[len(prefix):].split("/")[0] in ("loss", "logits", "grad")}
        got = ours[run_id]
        scale = max(float(np.max(np.abs(v))) for k, v in want.items() if k.startswith("grad/"))
        def part(d, grad):
            return {k: v for k, v in d.items() if k.startswith("grad/") == grad}

        p1, _ = bridge.compare(part(got, False), part(want, False), rtol=RTOL[dtype])
        p2, _ = bridge.compare(part(got, True), part(want, True), rtol=RTOL[dtype], floor=FLOOR[dtype] * scale)
        problems[run_id] = p1 + p2
    return problems


@pytest.mark.parametrize("run_id", [r[0] for r in RUNS])
def test_new_models_match_torch(results, run_id):
    assert not results[run_id], "\n".join(results[run_id])


# A channels_last batch (an NHWC array permuted to NCHW, as the second-pass terms make) through the
# baseline's ResNets, forward and backward, many times: on AVX2 CPUs torch's oneDNN corrupted the heap
# in the backward of a channels_last 1x1 stride-2 convolution (the downsampling shortcut) and the
# interpreter aborted, or some input gradients were off by 1% of the largest. Gradients must match those of
# the same batch in standard memory order (two float32 kernels of this ill-conditioned ReLU ResNet-50
# differ by ~1e-4 of the largest).
_CHANNELS_LAST = """
import torch
from baselines.torch import models
torch.manual_seed(0)
for name, stem, size in (("resnet18", "cifar", 16), ("resnet50", "imagenet", 33)):
    model = models.create(name, num_classes=2, in_channels=3, width=4, stem=stem).train()
    for _ in range(20):
        nhwc = torch.randn(4, size, size, 3)
        grads = []
        for x in (nhwc.permute(0, 3, 1, 2), nhwc.permute(0, 3, 1, 2).contiguous()):
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(model(x).square().sum(), x)
            grads.append(g)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-3 * float(grads[1].abs().max()))
print("ok")
"""


# The mirror's full-size ResNets have torchvision's parameter counts (the parity tests use shallow ones).
_FULL_SIZE = """
from baselines.torch import models
for name, count in (("resnet18", 11_689_512), ("resnet50", 25_557_032)):
    model = models.create(name, num_classes=1000, in_channels=3, stem="imagenet")
    assert sum(p.numel() for p in model.parameters()) == count, name
shallow = models.create("resnet50", num_classes=2, in_channels=3, width=4, stage_sizes=[2, 1, 1, 1])
assert [len(stage) for stage in (shallow.layer1, shallow.layer2, shallow.layer3, shallow.layer4)] == [2, 1, 1, 1]
print("ok")
"""


def _assert_runs_in_torch(script: str) -> None:
    """Runs `script` in the PyTorch interpreter; it must exit 0 and print exactly "ok"."""
    done = subprocess.run([bridge.torch_python(), "-c", script], cwd=bridge.REPO_ROOT, env=bridge.torch_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stdout[-2000:], done.stderr[-2000:])


def test_full_size_resnets_have_torchvisions_parameter_count():
    _assert_runs_in_torch(_FULL_SIZE)


def test_resnets_take_a_channels_last_batch():
    _assert_runs_in_torch(_CHANNELS_LAST)
