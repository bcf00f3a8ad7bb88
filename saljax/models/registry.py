"""Models by name: :func:`create`, :func:`register`, :func:`model_names`."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from collections.abc import Callable
from typing import Any

from flax import nnx

from saljax.models.base import ImageClassifier

__all__ = ["MODEL_NAMES", "create", "model_names", "register"]


def _built_in() -> dict[str, type[ImageClassifier]]:
    """Every ImageClassifier defined in a module of ``saljax/models/`` that sets ``registry_name``:
    adding a model to saljax is its module (and its test), with no list to edit."""
    found: dict[str, type[ImageClassifier]] = {}
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "registry":
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for obj in vars(module).values():
            name = obj.__dict__.get("registry_name") if inspect.isclass(obj) else None
            if name and issubclass(obj, ImageClassifier) and obj.__module__ == module.__name__:
                if name in found and found[name] is not obj:
                    raise ValueError(f"model name {name!r} is set by {found[name].__name__} and {obj.__name__}")
                found[name] = obj
    return found


_REGISTRY: dict[str, type[ImageClassifier]] = _built_in()

#: Names of the built-in models (:func:`model_names` also lists registered ones).
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def model_names() -> tuple[str, ...]:
    """Every name :func:`create` accepts, built-in and registered."""
    return tuple(_REGISTRY)


def register(name: str, cls: type[ImageClassifier], *, overwrite: bool = False) -> None:
    """Makes ``cls`` available as ``create(name, ...)``.

    ``cls`` must subclass :class:`saljax.models.ImageClassifier` and take keyword arguments
    ``num_classes``, ``in_channels`` and ``rngs``.

    Raises:
      ValueError: ``name`` is taken (unless ``overwrite``) or ``cls`` is not an ImageClassifier.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not (inspect.isclass(cls) and issubclass(cls, ImageClassifier)):
        raise ValueError(f"cls must be a subclass of saljax.models.ImageClassifier, got {cls!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"model name {name!r} is already registered (to {_REGISTRY[name].__name__}); pass overwrite=True")
    _REGISTRY[name] = cls


def create(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    rngs: nnx.Rngs,
    input_size: int | tuple[int, int] | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """Builds a model by name.

    Args:
      name: one of :func:`model_names` (built-in: ``'simple_cnn'``, ``'resnet18'``,
        ``'resnet50'``, ``'mlp'``, ``'xil_cnn'``).
      num_classes: number of classes.
      in_channels: input channels.
      rngs: parameter initialisation keys.
      input_size: ``(H, W)`` of the inputs (e.g. from the dataset), passed on to models whose
        constructor takes ``input_size`` (fixed-size models: ``mlp``, ``xil_cnn``, ``simple_cnn``
        with ``head_type='mlp'``) and ignored by the others; None keeps the model's default.
      **kwargs: further constructor arguments of the model (e.g. ``width``, ``stem``,
        ``head_type``, ``activation``, ``conv_impl``, ``dtype``).

    Raises:
      ValueError: for an unknown ``name`` or invalid constructor arguments.
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"name must be one of {list(_REGISTRY)}, got {name!r}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for model {name!r}; it accepts {sorted(accepted)}")
    if input_size is not None and "input_size" in accepted:
        kwargs["input_size"] = input_size
    factory: Callable[..., ImageClassifier] = cls  # subclasses take these keywords (see register)
    return factory(num_classes=num_classes, in_channels=in_channels, rngs=rngs, **kwargs)
