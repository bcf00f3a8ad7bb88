"""Training configs: ml_collections files with a `get_config(arg)` and command-line overrides.

A config file is a Python module whose `get_config(arg: str | None)` returns a `ConfigDict`;
`path.py:arg` passes `arg` (e.g. the method). Overrides `key.sub=value` change fields after loading;
a value is parsed as a Python literal (numbers, booleans, tuples, None, strings in quotes) and
falls back to a plain string, and must keep the field's type (ml_collections checks it).

`defaults()` lists every field the training loop reads, with its default.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import types
from collections.abc import Sequence

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """Every field `saljax.train.train_and_evaluate` reads, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict({
        "name": "decoy_digits",  # a saljax.data builder
        "config": "default",  # its builder config
        "overrides": ml_collections.ConfigDict(),  # builder config fields (image_size, sizes, ...)
        "data_dir": os.environ.get("SALJAX_DATA_DIR", "~/saljax_data"),
        "manual_dir": "",  # saliency_folder: the user's folder
        "rebuild": False,  # rebuild the prepared copy from its source (e.g. after editing the CSV)
        "train_split": "train",
        "eval_splits": ("validation", "test"),  # evaluated at each evaluation; see checkpoint.best_metric
        "augment": False,
        "mean": ml_collections.FieldReference(None, field_type=float),
        "std": ml_collections.FieldReference(None, field_type=float),
    })
    c.model = ml_collections.ConfigDict({
        "name": "simple_cnn",  # saljax.models.create
        "kwargs": ml_collections.ConfigDict(),  # e.g. width, stem, channels
        "dtype": "float32",  # computation dtype; parameters stay float32
        # Filled in from the dataset when training starts:
        "num_classes": ml_collections.FieldReference(None, field_type=int),
        "in_channels": ml_collections.FieldReference(None, field_type=int),
        # (H, W) of the images, passed as `input_size` to models that take it (an 'mlp' head)
        "input_size": ml_collections.FieldReference(None, field_type=tuple),
    })
    c.method = "gradmask"  # saljax.losses.for_method
    c.loss = ml_collections.ConfigDict()  # its options: lam, alpha, reduction, ...
    # saljax.train.make_optimizer; see its module docstring for each field.
    c.optimizer = ml_collections.ConfigDict({
        "name": "adam",  # adam | adamw | sgd | lamb | lars
        "learning_rate": 1e-3,  # base (peak) learning rate
        "momentum": 0.9,  # sgd (0: none) and lars
        "nesterov": False,  # sgd (with momentum) and lars
        # adam, sgd: L2 added to the gradient (PyTorch's weight_decay); adamw, lamb, lars: decoupled
        "weight_decay": 0.0,
        "schedule": "constant",  # constant | step | cosine | warmup_cosine
        "decay_every": 0,  # step: steps between learning-rate decays
        "decay_factor": 0.1,  # step: factor of each decay
        "warmup_steps": 0,  # warmup_cosine: linear warmup from 0
        "decay_steps": 0,  # cosine, warmup_cosine: schedule length, warmup included (0: num_steps)
        "end_factor": 0.0,  # cosine, warmup_cosine: final learning rate / learning_rate
        "clip_norm": 0.0,  # clip gradients to this global norm (0: off)
    })
    c.batch_size = 32
    c.num_steps = 500
    c.log_every = 50
    c.eval_every = 250  # also evaluates at the last step
    c.eval_batch_size = 256
    c.checkpoint = ml_collections.ConfigDict({
        # a checkpoint every this many steps and at the last; at an evaluation in between, when its
        # best_metric ranks among the keep_best best so far (at each one without a best_metric)
        "every": 250,
        "keep_best": 1,  # checkpoints kept by best_metric
        "keep_latest": 2,  # newest checkpoints kept (a fallback if the newest is corrupt)
        # <split>/<metric> of an evaluation that ranks checkpoints ("" for none); the best one's
        # evaluation is reported as best/<split>/<metric>; ties go to the earliest step
        "best_metric": "validation/accuracy",
        "best_mode": "max",  # max (accuracy, roc_auc) | min (ce, loss terms)
        "async_save": True,
    })
    c.num_devices = ml_collections.FieldReference(None, field_type=int)  # None: all local devices
    c.progress = True
    return c


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, merges it over `defaults()` and applies `key=value` overrides.

    Raises FileNotFoundError or a one-line ValueError naming the file for a missing file, a syntax
    error, an exception while running it, or a `get_config` that returns no ConfigDict.
    """
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} must define get_config(arg=None)")  # noqa: TRY004 - bad input: exit code 2
    try:
        loaded = module.get_config(arg or None)
    except Exception as error:  # any failure of user code is bad input, named by file
        raise ValueError(f"config file {path}: get_config({arg or None!r}) failed: {type(error).__name__}: {error}") from error
    if not isinstance(loaded, (ml_collections.ConfigDict, dict)):
        raise ValueError(f"config file {path}: get_config() must return a ConfigDict; got {type(loaded).__name__}")  # noqa: TRY004
    config = defaults()
    _merge(config, ml_collections.ConfigDict(loaded) if isinstance(loaded, dict) else loaded, path)
    apply_overrides(config, overrides)
    return config


def load_module(path: str) -> types.ModuleType:
    """Executes a config file and returns it as a module (ValueError naming the file if it fails)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist (expected a Python file with get_config())")
    module_spec = importlib.util.spec_from_file_location(f"saljax_config_{abs(hash(path))}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"config file {path} cannot be loaded as a Python module (expected a .py file)")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ValueError(f"config file {path}: syntax error at line {error.lineno}: {error.msg}") from error
    except Exception as error:  # any failure of user code is bad input, named by file
        raise ValueError(f"config file {path} failed to run: {type(error).__name__}: {error}") from error
    return module


def _merge(base: ml_collections.ConfigDict, update: ml_collections.ConfigDict, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ValueError(f"{source}: unknown config field {name!r}; known fields: {sorted(base.keys())}")
        if isinstance(base[key], ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
            if key in ("kwargs", "overrides") or name == "loss":
                base[key] = value  # free-form: passed on as keyword arguments
            else:
                _merge(base[key], value, source, f"{name}.")
        else:
            base[key] = value


def parse_value(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `a.b.c=value` overrides in place; new keys are allowed only in free-form fields."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must have the form key=value (e.g. optimizer.learning_rate=1e-4)")
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise ValueError(f"override {item!r}: unknown config field {'.'.join(parents[:i + 1])!r}")
            node = node[part]
        free_form = parents and parents[-1] in ("kwargs", "overrides", "loss")
        if leaf not in node and not free_form:
            raise ValueError(f"override {item!r}: unknown config field {key!r}; fields here: {sorted(node.keys())}")
        value = parse_value(text)
        if leaf in node and isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if leaf in node and isinstance(node[leaf], tuple) and isinstance(value, (list, str)):
            value = tuple(value) if isinstance(value, list) else (value,)
        try:
            node[leaf] = value
        except TypeError as error:
            raise ValueError(f"override {item!r}: {error}") from None
