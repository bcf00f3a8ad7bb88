"""saljax against its PyTorch baseline (baselines.torch): same weights, same batch, same numbers.

For every model (SimpleCNN with the GAP and the MLP head, ResNet18 and ResNet50 with one block of
each kind per stage) and every loss (all `saljax.losses.METHODS` presets and their options), in
float64 and in float32, with BatchNorm in train mode (and for CDEP also in eval mode), the loss
value, each term, the logits, the gradient of every parameter and the updated BatchNorm statistics
must agree:

    relative error = max |saljax - torch| / max(max |torch|, floor)   per tensor
    float64: <= 1e-5    float32: <= 1e-4

`floor` is 0 for the loss, its terms and the logits. For gradients and BatchNorm statistics it is
a fraction (float64 1e-6, float32 1e-3) of the case's largest parameter gradient S, so that a
tensor far smaller than the others is held to an absolute error instead of amplifying rounding
noise; gradients that vanish mathematically (SimpleCNN's conv biases, each followed by train-mode
BatchNorm) are pure rounding noise and compared with S itself. PyTorch's running_var holds the
unbiased batch variance where flax's holds the biased one: it is converted with
`layout.flax_running_var` (exact given N = B*h*w) before the comparison; the running mean is
compared as it is.

saljax runs as it is, float64 included; note that its models compute the head (GAP + Dense) and
so the logits in float32 whatever `dtype` is, and its losses read maps as float32: in float64 the
agreement is therefore ~1e-6, not ~1e-12 (the maps here hold float32 values, so both sides read
the same maps). Its convolutions are XLA's, as `conv_impl="auto"` runs them on GPU and TPU (see
tests/conftest.py); the CPU's matmul form of strided convolutions is held to XLA's to second order
in tests/models.

The comparison methods that draw random numbers (ActDiff, SGT, counterexamples, shuffled images)
use saljax's draws on both sides: saljax draws from `term_key(jax.random.key(KEY), name)` and the
same arrays travel to PyTorch with the case's batch. Grad-CAM terms, RBR and the second-pass
methods are compared with the eager PyTorch route only (see ROUTES).

PyTorch runs in its own interpreter, `$SALJAX_TORCH_PYTHON` (`make test` sets it): all cases
travel in one .npz to one `python -m baselines.torch.run` call, which runs while the saljax side
compiles one program per model and dtype. Inputs are random normal (tie-free: `abs`, `min`, `max`
and `relu` are not differentiated at a tie, where JAX and PyTorch pick different subgradients).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines.torch import bridge, layout
from saljax import classifier, losses, models

# One worker computes every case (the PyTorch side runs once, in one subprocess): `--dist loadgroup`.
# Slow: PyTorch in a subprocess over every case; `make test` runs it, `make test-fast` does not.
pytestmark = [pytest.mark.xdist_group("torch_parity"), pytest.mark.slow]

DTYPES = ("float64", "float32")
RTOL = {"float64": 1e-5, "float32": 1e-4}
FLOOR = {"float64": 1e-6, "float32": 1e-3}

# Tiny models: 16x16 images (33x33 for ResNet50's ImageNet stem, so that its last map is 2x2 and
# CAMs are not single pixels), widths 4 to 8. `image`: the batch's (B, H, W, C). ResNet50 uses a
# smooth activation: with ReLU this tiny network is so ill-conditioned that PyTorch's own float32
# gradients differ from its float64 ones by ~1e-3, which no float32 comparison could resolve.
# The ResNets are shallow: every kind of block once, which is all the depth repeats (ResNet18: the
# identity block, then a downsampling one per stage; ResNet50: a projecting bottleneck, an identity
# one, then a downsampling one per stage). Compiling double backprop through the full depth cost
# ~50 s more for no further check; the full networks' layout is checked in tests/models.
MODELS = {
    "cnn": {"name": "simple_cnn", "kwargs": {"num_classes": 2, "in_channels": 3, "channels": [6, 8]},
            "image": (4, 16, 16, 3)},
    "cnn_mlp": {"name": "simple_cnn",
                "kwargs": {"num_classes": 3, "in_channels": 2, "channels": [4, 6], "head_type": "mlp",
                           "mlp_hidden": 8, "input_size": [16, 12], "activation": "softplus"},
                "image": (4, 16, 12, 2)},
    "resnet18": {"name": "resnet18", "kwargs": {"num_classes": 2, "in_channels": 3, "width": 4, "stem": "cifar",
                                                 "stage_sizes": [1, 1, 1, 1]},
                 "image": (4, 16, 16, 3)},
    "resnet50": {"name": "resnet50",
                 "kwargs": {"num_classes": 2, "in_channels": 3, "width": 4, "stem": "imagenet",
                            "stage_sizes": [2, 1, 1, 1], "activation": "softplus"},
                 "image": (4, 33, 33, 3)},
    # XIL's DecoyMNIST CNN (VALID convs, ReLU, 2x2 max-pools, MLP head) and RRR's MLP: for CDEP.
    "xil": {"name": "xil_cnn", "kwargs": {"num_classes": 3, "in_channels": 1, "input_size": [16, 14],
                                          "channels": [3, 4], "kernel_size": 3, "mlp_hidden": 6},
            "image": (4, 16, 14, 1)},
    "mlp": {"name": "mlp", "kwargs": {"num_classes": 3, "in_channels": 2, "input_size": [6, 5],
                                      "hidden_sizes": [7, 4], "activation": "softplus"}, "image": (4, 6, 5, 2)},
}

# Both PyTorch routes: "eager" (autograd with create_graph=True, as the authors) and "func"
# (torch.func: functional_call, vjp, grad; no running statistics there). Grad-CAM terms, RBR and the
# second-pass methods differentiate the eager graph (autograd.grad w.r.t. the feature map or the
# parameters, BatchNorm buffers restored after a second pass): eager only.
ROUTES = ("eager", "func")
EAGER = ("eager",)


class Case(NamedTuple):
    """One comparison: batch "<model>" has maps at the image size, "cnn_small_maps" at the CAM size."""

    model: str
    batch: str
    method: str
    options: dict
    dtypes: tuple[str, ...] = DTYPES
    routes: tuple[str, ...] = ROUTES
    train: bool = True  # False: BatchNorm in eval mode (running statistics) on both sides

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        mode = "" if self.train else "eval"
        return "-".join(filter(None, [self.model if self.batch == self.model else self.batch, self.method, opts, mode]))


# Methods whose losses draw random numbers: (term name, draw shape: "image" (B, H, W, C) or "pixels"
# (B, H*W)); saljax draws them from `term_key(KEY, name)` and PyTorch reads the same draws.
DRAWS = {
    "actdiff": [("actdiff", "pixels")],
    "sgt": [("sgt", "image")],
    "counterexamples": [("ce_transformed", "image")],
    "shuffled_images": [("transform", "pixels")],
}
EAGER_ONLY = {"actdiff", "sgt", "counterexamples", "masked_images", "shuffled_images", "rrr_g", "hint", "rbr", "cdep"}
KEY = 0  # jax.random.key(KEY) is every loss's key
# Methods whose terms keep state between steps (a discriminator): their parity with PyTorch is checked
# in test_adversarial.py, step by step against PyTorch's own modules and the baseline's mirror.
STATEFUL = {"actdiff_discriminator"}

CASES = [
    *[Case("cnn", "cnn", m, {}, ("float32",) if m == "rbr" else DTYPES, EAGER if m in EAGER_ONLY else ROUTES)
      for m in losses.METHODS if m not in STATEFUL],
    Case("cnn", "cnn", "rrr_g", {"weights": "constant", "reduction": "mean"}, routes=EAGER),
    Case("cnn", "cnn_small_maps", "rrr_g", {}, routes=EAGER),
    Case("cnn", "cnn", "hint", {"weights": "constant", "reduction": "mean"}, routes=EAGER),
    Case("cnn", "cnn", "actdiff", {"layer": "feature_map", "lam": 0.5}, routes=EAGER),
    Case("cnn", "cnn", "actdiff", {"layer": "logits"}, routes=EAGER),
    Case("cnn", "cnn", "sgt", {"abs_saliency": True, "fraction": 0.3}, routes=EAGER),
    Case("cnn", "cnn", "counterexamples", {"alpha": 0.7, "value_range": (-1.0, 2.0)}, routes=EAGER),
    # RBR in float32 on the ReLU SimpleCNN only: PyTorch's third derivative through train-mode
    # BatchNorm is wrong (its batch-norm double backward treats the batch statistics as constants).
    # With softplus or tanh, autograd gives d term / d conv bias ~1e-2 where finite differences (and
    # saljax) give 0, since BatchNorm removes that bias; without BatchNorm autograd and finite
    # differences agree. With ReLU PyTorch's error is ~5e-6 relative: below float32's tolerance, at
    # float64's. saljax's RBR is checked against finite differences through BatchNorm in
    # test_xil_methods.py.
    Case("cnn", "cnn", "rbr", {"reduction": "mean"}, ("float32",), routes=EAGER),
    Case("cnn_mlp", "cnn_mlp", "sgt", {}, routes=EAGER),
    Case("resnet18", "resnet18", "rrr_g", {}, routes=EAGER),
    Case("resnet18", "resnet18", "actdiff", {}, routes=EAGER),
    Case("cnn", "cnn", "ce", {"reduction": "sum"}),
    Case("cnn", "cnn", "gradmask", {"lam": 0.3, "norm": "l2sq"}),
    Case("cnn", "cnn", "gradmask", {"samples": "positives"}),
    Case("cnn", "cnn", "gradmask", {"reduction": "mean"}),
    Case("cnn", "cnn", "gradmask", {"score": "nonhealthy"}),
    Case("cnn", "cnn", "gradmask", {"mask_dilation": 1, "mask_blur": 1.0}),
    Case("cnn", "cnn", "gradmask_midl", {"reduction": "mean", "samples": "masked"}),
    Case("cnn", "cnn", "rrr", {"lam": 2.0, "reduction": "mean"}),
    Case("cnn", "cnn", "cyborg", {"alpha": 0.7, "eps": 0.0}),
    Case("cnn", "cnn_small_maps", "cyborg", {}),
    Case("cnn", "cnn_small_maps", "dd_paired", {}),
    Case("cnn", "cnn", "dd_divergence", {"delta": 0.3}),
    Case("cnn_mlp", "cnn_mlp", "ce", {}),
    Case("cnn_mlp", "cnn_mlp", "gradmask", {}),  # 3 classes: |z_t - logsumexp of the others|
    Case("cnn_mlp", "cnn_mlp", "gradmask_midl", {}),
    Case("cnn_mlp", "cnn_mlp", "rrr", {}),
    # The ResNets check the architectures (residuals, downsampling, both stems, max-pool, BatchNorm
    # everywhere) under double backprop and CAMs; every loss option is checked on SimpleCNN above.
    # Compiling ResNet50's double backprop is the slowest of all cases, so it runs in float64 only.
    Case("resnet18", "resnet18", "gradmask", {}),
    Case("resnet18", "resnet18", "dd_divergence", {}),
    Case("resnet50", "resnet50", "rrr", {}, ("float64",)),
    Case("resnet50", "resnet50", "cyborg_pred", {}),
    # CDEP's contextual decomposition through every layer rule: conv + train-mode BatchNorm + ReLU
    # and the GAP head (SimpleCNN, above), softplus and the MLP head (cnn_mlp), VALID convs and
    # max-pools (xil), dense layers only (mlp). cnn_mlp in float64 only: there saljax's own float32
    # gradients differ from its float64 ones by ~1e-3 (the bias split |W beta| / (|W beta| + |W gamma|)
    # is ill-conditioned where both parts are small), which no float32 comparison could resolve.
    Case("cnn_mlp", "cnn_mlp", "cdep", {"lam": 2.0}, ("float64",), routes=EAGER),
    Case("xil", "xil", "cdep", {}, routes=EAGER),
    Case("mlp", "mlp", "cdep", {}, routes=EAGER),
    # ResNets: residual additions, downsampling shortcuts, BatchNorm in train mode (batch statistics
    # of beta + gamma) and in eval mode (running statistics), GAP; ResNet50 adds the ImageNet stem's
    # padded max-pool and bottlenecks. float64 only: in float32 ResNet18's gradients differ from
    # PyTorch's by ~1.4e-4, the same ill-conditioned bias split as cnn_mlp's.
    Case("resnet18", "resnet18", "cdep", {}, ("float64",), routes=EAGER),
    Case("resnet18", "resnet18", "cdep", {}, ("float64",), routes=EAGER, train=False),
    Case("resnet50", "resnet50", "cdep", {}, ("float64",), routes=EAGER),
]
assert len({c.name for c in CASES}) == len(CASES)
# (case id, case, dtype) for every comparison.
RUNS = [(f"{c.name}-{dtype}", c, dtype) for c in CASES for dtype in c.dtypes]


def _file_id(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", case_id)


# --- fixed inputs ---------------------------------------------------------------------------------------


def _weights(key: str, seed: int) -> dict[str, np.ndarray]:
    """float64 weights (flax paths) of MODELS[key]: random, BatchNorm included, no exact zeros."""
    model = bridge.abstract_model(MODELS[key], jnp.float32)
    shapes = layout.flatten(nnx.to_pure_dict(nnx.state(model)))
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in sorted(shapes.items()):
        shape, leaf_name = tuple(leaf.shape), path.split(layout.SEP)[-1]
        if leaf_name == "kernel" and len(shape) == 4:  # He normal, fan_out, as saljax initialises
            value = rng.normal(size=shape) * np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
        elif leaf_name == "kernel":
            value = rng.normal(size=shape) / np.sqrt(shape[0])
        elif leaf_name == "scale":
            value = 1.0 + 0.2 * rng.normal(size=shape)
        elif leaf_name == "var":
            value = rng.uniform(0.5, 1.5, size=shape)
        else:  # biases, running means
            value = 0.1 * rng.normal(size=shape)
        out[path] = value
    return out


def _batch(image_shape: tuple[int, ...], num_classes: int, seed: int, map_size: tuple[int, int] | None = None):
    b, h, w, _ = image_shape
    rng = np.random.default_rng(seed)
    map_size = map_size or (h, w)
    return {
        "image": rng.normal(size=image_shape),
        "label": (np.arange(b) % num_classes).astype(np.int32),
        # float32 values: saljax reads maps as float32 whatever the dtype, so both sides see the same.
        "saliency_map": rng.uniform(size=(b, *map_size)).astype(np.float32).astype(np.float64),
        "has_map": np.resize(np.asarray([1, 1, 0, 1], np.float64), b),
    }


def _inputs():
    weights = {key: _weights(key, seed) for seed, key in enumerate(MODELS)}
    batches = {key: _batch(m["image"], m["kwargs"]["num_classes"], 100 + i) for i, (key, m) in enumerate(MODELS.items())}
    batches["cnn_small_maps"] = _batch(MODELS["cnn"]["image"], 2, 100, map_size=(4, 4))
    return weights, batches


# --- the saljax side ----------------------------------------------------------------------------------------


def _jax_batch(batch: dict, dtype) -> dict:
    return {"image": jnp.asarray(batch["image"], dtype), "label": jnp.asarray(batch["label"]),
            "saliency_map": jnp.asarray(batch["saliency_map"], dtype), "has_map": jnp.asarray(batch["has_map"], dtype)}


def _draws(case: Case, dtype_name: str, batch: dict) -> dict[str, np.ndarray]:
    """{"uniform/<name>": saljax's draw} for the case's random terms (NHWC for images)."""
    b, h, w, c = batch["image"].shape
    shapes = {"image": (b, h, w, c), "pixels": (b, h * w)}
    with jax.enable_x64(dtype_name == "float64"):
        key = jax.random.key(KEY)
        return {f"uniform/{name}": np.asarray(jax.random.uniform(losses.term_key(key, name), shapes[kind],
                                                                 jnp.dtype(dtype_name)), np.float64)
                for name, kind in DRAWS.get(case.method, [])}


def _saljax_side(model_key: str, dtype_name: str, weights: dict, batches: dict) -> dict[str, dict[str, np.ndarray]]:
    """{case id: {"loss", "logits", "term/<name>", "grad/<path>", "state/<path>"}} for one model and dtype.

    All the model's cases are one jitted program: compiling dominates, and it grows slower than the
    number of cases.
    """
    runs = [(case_id, c) for case_id, c, d in RUNS if c.model == model_key and d == dtype_name]
    if not runs:
        return {}
    with jax.enable_x64(dtype_name == "float64"):
        dtype = jnp.dtype(dtype_name)
        abstract = bridge.abstract_model(MODELS[model_key], dtype)
        graphdef, params, state = nnx.split(abstract, nnx.Param, ...)
        graphdefs = {True: graphdef, False: nnx.graphdef(models.in_mode(abstract, train=False))}
        params = bridge.load_flat(params, weights, dtype)
        state = bridge.load_flat(state, weights, dtype)
        jax_batches = {c.batch: _jax_batch(batches[c.batch], dtype) for _, c in runs}
        loss_fns = [(case_id, losses.for_method(c.method, **c.options), c.batch, graphdefs[c.train]) for case_id, c in runs]

        def run(params, state, batches):
            out = {}
            for case_id, loss, batch, gdef in loss_fns:
                def loss_of(p, loss=loss, batch=batch, gdef=gdef):
                    return loss(classifier.from_nnx(gdef, p, state), batches[batch], key=jax.random.key(KEY))

                (value, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
                out[case_id] = (value, aux.logits, aux.terms, grads, aux.state)
            return out

        results = jax.device_get(jax.jit(run)(params, state, jax_batches))
    out = {}
    for case_id, (value, logits, terms, grads, new_state) in results.items():
        flat = {"loss": np.asarray(value), "logits": np.asarray(logits)}
        flat.update({f"term/{k}": np.asarray(v) for k, v in terms.items()})
        flat.update({f"grad/{k}": v for k, v in bridge.flat_arrays(grads).items()})
        flat.update({f"state/{k}": v for k, v in bridge.flat_arrays(new_state).items()})
        out[case_id] = flat
    return out


def _torch_side(torch_out: dict, case_id: str, old_state: dict) -> dict[str, np.ndarray]:
    """The torch results of a case, in saljax's names; running_var converted to flax's (biased) update."""
    prefix = f"case/{_file_id(case_id)}/"
    if prefix + "error" in torch_out:
        raise RuntimeError(f"the torch baseline raised:\n{torch_out[prefix + 'error']}")
    flat = {k[len(prefix):]: v for k, v in torch_out.items() if k.startswith(prefix)}
    counts = {k[len("count/"):]: int(v) for k, v in flat.items() if k.startswith("count/")}
    out = {k: v for k, v in flat.items() if not k.startswith("count/")}
    for module, n in counts.items():
        key = f"state/{module}/var"
        out[key] = layout.flax_running_var(out[key], old_state[f"{module}/var"], n)
    return out


# Gradients that vanish mathematically: SimpleCNN's conv biases, each followed by train-mode
# BatchNorm (which subtracts the batch mean). Only rounding noise is left, compared with the case's
# largest gradient.
VANISHING = re.compile(r"^grad/convs/\d+/bias$")


def _compare(got: dict, want: dict, dtype_name: str) -> tuple[list[str], dict[str, float]]:
    """Loss, terms and logits relative to themselves; gradients and BatchNorm state with the floor."""
    rtol = RTOL[dtype_name]
    scale = max((float(np.max(np.abs(v))) for k, v in want.items() if k.startswith("grad/")), default=0.0)

    def group(k: str) -> str:
        return "vanishing" if VANISHING.match(k) else "floored" if k.startswith(("grad/", "state/")) else "plain"

    floors = {"plain": 0.0, "floored": FLOOR[dtype_name] * scale, "vanishing": scale}
    problems, errors = [], {}
    for name, floor in floors.items():
        p, e = bridge.compare({k: v for k, v in got.items() if group(k) == name},
                              {k: v for k, v in want.items() if group(k) == name}, rtol=rtol, floor=floor)
        problems += p
        errors.update(e)
    return problems, errors


# --- fixtures and tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def parity(request) -> dict[str, list[str]]:
    """{case id: mismatch lines} for every case (empty list: the case agrees)."""
    try:
        bridge.torch_python()
        missing = None
    except RuntimeError as err:
        missing = str(err)
    if missing:  # fail, never skip: parity is part of the suite
        pytest.fail(missing, pytrace=False)
    weights, batches = _inputs()
    spec = {
        "models": {k: {"name": m["name"], "kwargs": m["kwargs"]} for k, m in MODELS.items()},
        "cases": [{"id": _file_id(f"{case_id}-{route}"), "model": c.model, "batch": c.batch, "dtype": dtype,
                   "method": c.method, "options": c.options, "route": route, "train": c.train}
                  for case_id, c, dtype in RUNS for route in c.routes],
        "threads": 1,  # the saljax side compiles meanwhile
    }
    arrays = {f"model/{k}/{p}": v for k, w in weights.items() for p, v in w.items()}
    arrays.update({f"batch/{k}/{key}": v for k, b in batches.items() for key, v in b.items()})
    arrays.update({f"draws/{_file_id(f'{case_id}-{route}')}/{name}": v for case_id, c, dtype in RUNS for route in c.routes
                   for name, v in _draws(c, dtype, batches[c.batch]).items()})
    torch_run = bridge.start_torch(spec, arrays)
    ours = {}
    for key in MODELS:
        for dtype in DTYPES:
            ours.update(_saljax_side(key, dtype, weights[key], batches))
    torch_out = torch_run.result()

    results: dict[str, list[str]] = {}
    worst: dict[str, tuple[float, str]] = defaultdict(lambda: (0.0, ""))
    for case_id, case, dtype in RUNS:
        for route in case.routes:
            run_id = f"{case_id}-{route}"
            try:
                want = _torch_side(torch_out, run_id, weights[case.model])
            except RuntimeError as err:
                results[run_id] = [str(err)]
                continue
            got = ours[case_id]
            if route == "func":  # no BatchNorm running statistics on this route
                got = {k: v for k, v in got.items() if not k.startswith("state/")}
            problems, errors = _compare(got, want, dtype)
            results[run_id] = problems
            for tensor, err in errors.items():
                if err > worst[dtype][0]:
                    worst[dtype] = (err, f"{run_id}: {tensor}")

    lines = [f"torch parity (torch {torch_out['torch_version']}), largest relative error:"]
    lines += [f"  {dtype}: {worst[dtype][0]:.3g} (tolerance {RTOL[dtype]:g}) at {worst[dtype][1]}" for dtype in DTYPES]
    request.addfinalizer(lambda: _report(request.config, lines))
    return results


def _report(config: pytest.Config, lines: list[str]) -> None:
    """Writes to the terminal past pytest's output capture."""
    reporter = config.pluginmanager.getplugin("terminalreporter")
    capture = config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


@pytest.mark.parametrize("run_id", [f"{r[0]}-{route}" for r in RUNS for route in r[1].routes])
def test_matches_torch(parity: dict[str, list[str]], run_id: str) -> None:
    problems = parity[run_id]
    if problems:
        pytest.fail(f"{run_id}: {len(problems)} tensor(s) differ from the PyTorch baseline:\n  "
                    + "\n  ".join(problems), pytrace=False)


def test_every_method_is_covered() -> None:
    assert {c.method for c in CASES} == set(losses.METHODS) - STATEFUL
    for dtype in DTYPES:
        assert {c.model for c in CASES if dtype in c.dtypes} == set(MODELS)


# --- the layout conversions, on their own (pure numpy) --------------------------------------------------------


def test_layout_round_trip() -> None:
    rng = np.random.default_rng(0)
    flat = {"convs/0/kernel": rng.normal(size=(3, 3, 2, 4)), "convs/0/bias": rng.normal(size=4),
            "norms/0/scale": rng.normal(size=4), "norms/0/bias": rng.normal(size=4),
            "norms/0/mean": rng.normal(size=4), "norms/0/var": rng.uniform(size=4),
            "hidden/kernel": rng.normal(size=(3 * 2 * 4, 5)), "classifier/kernel": rng.normal(size=(5, 2))}
    state = layout.to_torch(flat, mlp_feature_shape=(3, 2, 4))
    assert state["convs.0.weight"].shape == (4, 2, 3, 3)
    assert state["classifier.weight"].shape == (2, 5)
    assert set(state) >= {"norms.0.weight", "norms.0.running_mean", "norms.0.running_var"}
    state["norms.0.num_batches_tracked"] = np.asarray(1)
    back = layout.from_torch(state, norm_modules={"norms.0"}, mlp_feature_shape=(3, 2, 4))
    assert set(back) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k], err_msg=k)


def test_layout_mlp_flatten_order() -> None:
    """The hidden layer gives the same output on an NHWC map flattened (h, w, C) and NCHW flattened (C, h, w)."""
    rng = np.random.default_rng(1)
    h, w, c, n = 3, 2, 4, 5
    kernel = rng.normal(size=(h * w * c, n))
    a = rng.normal(size=(2, h, w, c))
    weight = layout.to_torch({"hidden/kernel": kernel}, mlp_feature_shape=(h, w, c))["hidden.weight"]
    np.testing.assert_allclose(layout.nhwc_to_nchw(a).reshape(2, -1) @ weight.T, a.reshape(2, -1) @ kernel, rtol=1e-12)
    with pytest.raises(ValueError, match="mlp_feature_shape"):
        layout.to_torch({"hidden/kernel": kernel})


def test_layout_conv_is_the_same_convolution() -> None:
    """HWIO -> OIHW: one output pixel computed both ways (stride 1, no padding)."""
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(3, 3, 2, 4))
    x = rng.normal(size=(1, 3, 3, 2))
    weight = layout.to_torch({"c/kernel": kernel})["c.weight"]
    nhwc = np.einsum("bhwi,hwio->bo", x, kernel)
    nchw = np.einsum("bihw,oihw->bo", layout.nhwc_to_nchw(x), weight)
    np.testing.assert_allclose(nchw, nhwc, rtol=1e-12)


def test_running_var_conversion() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=(10, 3))  # N = 10 values per channel
    old = rng.uniform(0.5, 1.5, size=3)
    torch_var = 0.9 * old + 0.1 * values.var(axis=0, ddof=1)
    flax_var = 0.9 * old + 0.1 * values.var(axis=0, ddof=0)
    np.testing.assert_allclose(layout.flax_running_var(torch_var, old, 10), flax_var, rtol=1e-12)
    np.testing.assert_allclose(layout.torch_running_var(flax_var, old, 10), torch_var, rtol=1e-12)


def test_mismatch_names_the_tensor() -> None:
    problems, errors = bridge.compare({"grad/convs/0/kernel": np.ones(3), "loss": np.asarray(1.0)},
                                      {"grad/convs/0/kernel": np.asarray([1.0, 1.0, 1.1]), "loss": np.asarray(1.0)},
                                      rtol=1e-5)
    assert len(problems) == 1 and problems[0].startswith("grad/convs/0/kernel[2]: relative error")
    assert errors["loss"] == 0.0


def test_unset_interpreter_says_how_to_set_it(monkeypatch) -> None:
    monkeypatch.delenv(bridge.ENV_VAR, raising=False)
    with pytest.raises(RuntimeError, match="make test"):
        bridge.torch_python()
