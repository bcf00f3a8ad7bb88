"""Tiny models shared by the tests: a linear model with known input gradients and a smooth conv net."""

import os

# The tests' programs are tiny and run once, so compiling dominates: skip LLVM's optimisations (about a
# third of the suite's time on 2 cores; XLA's own graph passes still run). Set before the backend starts;
# an XLA_FLAGS that already chooses a level is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Eight fake CPU devices for the data-parallel tests; must be set before any backend starts.
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from saljax import classifier  # noqa: E402
from saljax.models import conv  # noqa: E402

# In the test processes the models' default `conv_impl="auto"` runs XLA's convolution, as it does on GPU
# and TPU. On CPU "auto" runs strided convolutions in the matmul form, which trains faster but compiles
# about a third slower, and the tests compile far more than they run. The matmul form itself is checked
# against XLA's to second order in tests/models; a test of the CPU default takes the `cpu_conv_default`
# marker, and child processes (the folder's `saljax train`, the two-process training) keep the real default.
conv._IMPLS["auto"] = conv.resolve("xla")  # private: the table behind `conv.resolve`

# Tiny versions of the benchmark datasets and models (config overrides): seconds, not minutes, on 2 cores.
# Two stride-2 convs: a 16x16 image still gives a 4x4 feature map (CAMs of more than one pixel), and each
# train step compiles about a quarter faster than with four.
TINY = {
    "decoy_digits": ["dataset.overrides.image_size=16", "dataset.overrides.max_examples=120",
                     "model.kwargs.channels=(8,8)"],
    "synthetic_distractor": ["dataset.overrides.image_size=16", "dataset.overrides.num_train=48",
                             "dataset.overrides.num_validation=16", "dataset.overrides.num_test=16",
                             "model.name='simple_cnn'", "model.kwargs={'channels': (8, 8)}"],
    "spurious_binary": ["dataset.overrides.image_size=16", "dataset.overrides.num_train=48",
                        "dataset.overrides.num_validation=16", "dataset.overrides.num_test_closed=16",
                        "dataset.overrides.num_test_open=16", "model.name='simple_cnn'",
                        "model.kwargs={'channels': (8, 8)}"],
    "decoy_mnist": ["dataset.overrides.num_train=40", "dataset.overrides.num_validation=20",
                    "dataset.overrides.num_test=20"],
    # The suite's protocol end to end on a small CNN: compiling ResNet-18's double backprop once per
    # method would dominate the test run (ResNet-18 itself is tested in tests/models).
    "red_herring": ["dataset.overrides.num_train=24", "dataset.overrides.num_validation=8",
                    "dataset.overrides.num_test=8", "model.name='simple_cnn'", "model.kwargs={'channels': (8, 8)}"],
    "red_herring_cpu": ["dataset.overrides.num_train=24", "dataset.overrides.num_validation=8",
                        "dataset.overrides.num_test=8", "model.name='simple_cnn'",
                        "model.kwargs={'channels': (8, 8)}"],
}


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(request, tmp_path_factory):
    """One persistent XLA compilation cache, shared by the xdist workers and kept from run to run in
    pytest's cache folder (`pytest --cache-clear` or `make clean` empties it): the suites' CLI cases, the many tiny
    training runs and the parity tests compile the same programs again and again (different closures,
    same HLO), and compile time dominates the test suite; a second run compiles only what changed."""
    if jax.config.jax_compilation_cache_dir:  # the environment's own cache: keep it
        yield
        return
    if getattr(request.config, "cache", None) is not None:
        path = request.config.cache.mkdir("jax-compilation-cache")
    else:  # `-p no:cacheprovider`: this run's temporary folder, shared by its workers
        root = tmp_path_factory.getbasetemp()
        path = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "jax-compilation-cache"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from jax._src import compilation_cache  # private: forget a cache state that an earlier compile fixed

    compilation_cache.reset_cache()
    yield


def conv_features(params, x):
    """tanh(conv3x3(x)), SAME padding: (B, H, W, C) -> (B, H, W, 3); smooth, so FD checks hold."""
    y = jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y + params["c"])


def gap_dense_head(params, feature_map):
    """Global average pooling + Dense: (B, h, w, C') -> (B, K)."""
    return jnp.mean(feature_map, axis=(1, 2)) @ params["kernel"] + params["bias"]


def make_conv_params(key, in_channels=1, channels=3, num_classes=2, dtype=jnp.float32):
    k = jax.random.split(key, 4)
    return {
        "w": (0.6 * jax.random.normal(k[0], (3, 3, in_channels, channels))).astype(dtype),
        "c": (0.1 * jax.random.normal(k[1], (channels,))).astype(dtype),
        "kernel": (jax.random.normal(k[2], (channels, num_classes))).astype(dtype),
        "bias": (0.3 * jax.random.normal(k[3], (num_classes,))).astype(dtype),
    }


def conv_classifier(params):
    return classifier.from_functions(lambda x: conv_features(params, x), lambda a: gap_dense_head(params, a))


def bound_conv_classifier(params):
    """`conv_classifier` that also exposes its parameters (RBR, stateful terms), as `classifier.from_nnx` does."""
    return classifier.Classifier(lambda x: (conv_features(params, x), None), lambda a: gap_dense_head(params, a),
                                 params=params, rebind=bound_conv_classifier)


# One ordinary forward pass of an nnx model, compiled (eagerly, each operation would compile on its own);
# in train mode it moves the model's BatchNorm statistics, as the reference for "once per step".
forward = nnx.jit(lambda model, images: model(images))


def linear_classifier(matrix, offset):
    """logits = flatten(x) @ matrix + offset; features are the images themselves."""
    return classifier.from_functions(lambda x: x, lambda a: a.reshape(a.shape[0], -1) @ matrix + offset)


def make_batch(key, b=4, h=6, w=6, c=1, num_classes=2, dtype=jnp.float32, has_map=(1, 1, 0, 1)):
    k = jax.random.split(key, 3)
    return {
        "image": jax.random.normal(k[0], (b, h, w, c), dtype),
        "label": jnp.arange(b, dtype=jnp.int32) % num_classes,
        "saliency_map": jax.random.uniform(k[1], (b, h, w), dtype),
        "has_map": jnp.asarray(np.resize(np.asarray(has_map, bool), b)),
    }


@pytest.fixture(autouse=True)
def _cpu_conv_default(request):
    """A test marked `cpu_conv_default` builds its models with the real `conv_impl="auto"` (see above)."""
    if request.node.get_closest_marker("cpu_conv_default") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as m:
        m.setitem(conv._IMPLS, "auto", conv.auto_conv_general_dilated)
        yield


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def slow_where(cases, is_slow):
    """Parametrize values, each marked `slow` where `is_slow(case)`; a tuple case is its arguments."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=[pytest.mark.slow] * bool(is_slow(c)))
            for c in cases]


def assert_conv_matches_lax_to_second_order(conv, x, w, strides, padding) -> str:
    """`conv` (a stand-in for lax.conv_general_dilated; NHWC, HWIO) against lax: values (1e-12) and
    both gradients of an input-gradient penalty (double backprop, 1e-10). Returns `conv`'s jaxpr as text."""
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    ref = jax.lax.conv_general_dilated

    def penalty(conv, x, w):
        # A GradMask-like loss: the squared input gradient of a nonlinear readout.
        out = lambda x: jnp.sum(jnp.tanh(conv(x, w, strides, padding, dimension_numbers=dims)))  # noqa: E731
        return jnp.sum(jax.grad(out)(x) ** 2)

    np.testing.assert_allclose(conv(x, w, strides, padding, dimension_numbers=dims),
                               ref(x, w, strides, padding, dimension_numbers=dims), rtol=1e-12, atol=1e-12)
    for argnum in (1, 2):
        second = jax.jit(jax.grad(penalty, argnum), static_argnums=0)
        np.testing.assert_allclose(second(conv, x, w), second(ref, x, w), rtol=1e-10, atol=1e-10)
    return str(jax.make_jaxpr(lambda x, w: conv(x, w, strides, padding, dimension_numbers=dims))(x, w))
