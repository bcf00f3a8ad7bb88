"""A training config turned into a loss, a model and a fresh state, after checking it.

`check_config` validates everything a run reads before any file is written or data built, each
problem a one-line ValueError naming the field; `fill_from_dataset` sets the model fields that
follow from the data; `init_from_config` builds the model and its state.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from saljax import data, losses, models
from saljax.train.optimizer import make_optimizer
from saljax.train.state import ModelDef, TrainState, init_train_state

__all__ = ["check_config", "fill_from_dataset", "init_from_config", "make_loss", "model_arguments"]


def _positive_int(config: ml_collections.ConfigDict, field: str, minimum: int = 1) -> None:
    node: Any = config
    for part in field.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}; got {node!r}")


def _model_names() -> tuple[str, ...]:
    names = getattr(models, "model_names", None)  # registered models too, where models offers it
    return tuple(names()) if callable(names) else tuple(models.MODEL_NAMES)


def _create_takes_input_size() -> bool:
    """Whether `models.create` itself takes `input_size` (and passes it to the models that use it)."""
    return "input_size" in inspect.signature(models.create).parameters


def model_arguments(name: str) -> frozenset[str] | None:
    """The keyword arguments model `name` takes (None when that cannot be told)."""
    holder = getattr(models, "registry", models)  # name -> class, as models.create looks it up
    registry = getattr(holder, "_REGISTRY", None)
    cls = registry.get(name) if isinstance(registry, dict) else None
    if cls is None:
        return None
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return frozenset(parameters) - {"self"}


def make_loss(config: ml_collections.ConfigDict) -> losses.Loss:
    """The loss of `config.method` with the options `config.loss`; ValueError naming a bad option."""
    if config.method not in losses.METHODS:
        raise ValueError(f"method must be one of {' | '.join(sorted(losses.METHODS))}; got {config.method!r}")
    options = dict(config.loss)
    try:
        return losses.for_method(config.method, **options)
    except TypeError as error:  # an unexpected keyword: a misspelt option
        raise ValueError(f"loss options {sorted(options)} do not fit method {config.method!r}: {error}") from None


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError for anything in `config` a run could not use; builds nothing."""
    for field in ("batch_size", "num_steps", "eval_every", "log_every", "eval_batch_size", "checkpoint.every",
                  "checkpoint.keep_latest"):
        _positive_int(config, field)
    _positive_int(config, "checkpoint.keep_best", 0)
    make_loss(config)
    make_optimizer(config.optimizer, num_steps=config.num_steps)
    m = config.model
    if m.name not in _model_names():
        raise ValueError(f"model.name must be one of {' | '.join(_model_names())}; got {m.name!r}")
    reserved = sorted(set(m.kwargs) & {"num_classes", "in_channels", "rngs", "dtype"})
    if reserved:
        raise ValueError(f"model.kwargs {reserved} are set by saljax (num_classes and in_channels from the dataset,"
                         " dtype from model.dtype); remove them")
    accepted = model_arguments(m.name)
    unknown = sorted(set(m.kwargs) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(f"model.kwargs {unknown} are not arguments of model {m.name!r}; it takes {sorted(accepted or ())}")
    try:
        floating = jnp.issubdtype(jnp.dtype(m.dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(f"model.dtype must name a floating dtype (float32, bfloat16, ...); got {m.dtype!r}")
    ds = config.dataset
    if ds.name not in data.DATASET_NAMES:
        raise ValueError(f"dataset.name must be one of {' | '.join(data.DATASET_NAMES)}; got {ds.name!r}")
    data.resolve_config(ds.name, ds.config or None, manual_dir=ds.manual_dir or None, **ds.overrides)
    if not ds.eval_splits:
        raise ValueError("dataset.eval_splits must name at least one split")
    ck = config.checkpoint
    if ck.best_mode not in ("max", "min"):
        raise ValueError(f"checkpoint.best_mode must be max | min; got {ck.best_mode!r}")
    if ck.best_metric:
        split, _, metric = ck.best_metric.partition("/")
        if split not in ds.eval_splits or not metric:
            raise ValueError(f"checkpoint.best_metric must be <split>/<metric> with a split of dataset.eval_splits"
                             f" {tuple(ds.eval_splits)}, or ''; got {ck.best_metric!r}")


def fill_from_dataset(config: ml_collections.ConfigDict, features: Any, splits: Any = None) -> None:
    """Sets `model.num_classes`, `model.in_channels` and `model.input_size` from the dataset.

    `features` is the builder's `info.features` (an image of shape (H, W, C) and a class label);
    with `splits` (the builder's `info.splits`), the config's splits must exist. A model that
    takes `input_size` (an 'mlp' head) gets (H, W) unless `model.kwargs.input_size` is set, which
    must then match. Raises ValueError when the model cannot take these images.
    """
    if splits is not None:
        ds = config.dataset
        missing = [s for s in (ds.train_split, *ds.eval_splits) if s not in splits]
        if missing:
            raise ValueError(f"dataset {ds.name!r} has no split(s) {missing}; it has {sorted(splits)}")
    height, width, channels = features["image"].shape
    with config.unlocked():
        config.model.num_classes = features["label"].num_classes
        config.model.in_channels = channels
        config.model.input_size = (height, width)
    given = config.model.kwargs.get("input_size")
    if given is not None:
        size = (given, given) if isinstance(given, int) else tuple(given)
        if (height, width) != size:
            raise ValueError(f"model.kwargs.input_size {given!r} does not match the dataset's images of {height}x{width}"
                             " pixels; remove it to use the image size")


def init_from_config(config: ml_collections.ConfigDict) -> tuple[ModelDef, TrainState]:
    """The model definition and a fresh state (step 0) that `config` describes.

    `config.model.num_classes` and `config.model.in_channels` must be set (training fills them in
    from the dataset before writing config.json, see `fill_from_dataset`).
    """
    m = config.model
    if m.num_classes is None or m.in_channels is None:
        raise ValueError("config.model.num_classes and config.model.in_channels must be set")
    kwargs = dict(m.kwargs)
    size = m.get("input_size")
    # A `models.create` that takes input_size passes it on only to the models that use it.
    takes_size = _create_takes_input_size() or "input_size" in (model_arguments(m.name) or ())
    if size is not None and "input_size" not in kwargs and takes_size:
        kwargs["input_size"] = tuple(size)
    model = models.create(m.name, num_classes=m.num_classes, in_channels=m.in_channels,
                          rngs=nnx.Rngs(config.seed), dtype=jnp.dtype(m.dtype), **kwargs)
    optimizer = make_optimizer(config.optimizer, num_steps=config.get("num_steps"))
    loss = make_loss(config)
    if not loss.needs_state:
        return init_train_state(model, optimizer)
    # Terms that keep state between steps (ActDiff's discriminator) start from the shapes of a batch;
    # building it here makes a restored run's target match what training saved.
    size = m.get("input_size")
    if size is None:
        raise ValueError(f"config.model.input_size must be set for the stateful loss of method {config.method!r}")
    images = jax.ShapeDtypeStruct((config.batch_size, *tuple(size), m.in_channels), jnp.float32)
    return init_train_state(model, optimizer, loss=loss, images=images, key=jax.random.key(config.seed))
