"""The one registry of saljax datasets: name -> TFDS builder class.

A builder registers itself with the ``register`` decorator where it is defined; importing
``saljax.data`` imports every builder module (listed once, in ``saljax.data.builders``), so the
registry is complete whenever ``saljax.data`` is importable. TFDS registers the same classes under
the same names, so ``tfds.builder("decoy_digits", data_dir=...)`` works too.
"""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds

_BUILDERS: dict[str, type[tfds.core.DatasetBuilder]] = {}


def register[B: type[tfds.core.DatasetBuilder]](cls: B) -> B:
    """Class decorator: adds a builder to the registry under its TFDS name (snake_case class name).

    Raises:
      ValueError: another class is already registered under that name.
    """
    name = cls.name
    if _BUILDERS.get(name, cls) is not cls:
        raise ValueError(f"dataset name {name!r} is already registered by {_BUILDERS[name].__module__}")
    _BUILDERS[name] = cls
    return cls


def names() -> tuple[str, ...]:
    """Names of the registered datasets, in registration order."""
    return tuple(_BUILDERS)


def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
    """The builder class registered as ``name`` (without a ``/config`` suffix).

    Raises:
      ValueError: no dataset of that name.
    """
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown saljax dataset {name!r}; expected one of {names()}") from None


def group_names(name: str) -> tuple[str, ...] | None:
    """The fixed names of a dataset's ``group`` values (e.g. attack types), or None if it has none.

    Datasets whose group names depend on the config (``saliency_folder``) return None; read
    ``builder.info.features["group"].names`` of a built dataset instead.
    """
    value = getattr(sys.modules[builder_class(name).__module__], "GROUP_NAMES", None)
    return tuple(value) if value is not None else None


__all__ = ["builder_class", "group_names", "names", "register"]
