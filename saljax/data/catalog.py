"""Building saljax datasets by name with config overrides."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import tensorflow_datasets as tfds

from saljax.data import _common

# Importing the builder modules registers them with TFDS under these names.
from saljax.data import (  # noqa: F401  # isort: skip
    decoy_digits,
    decoy_mnist,
    red_herring,
    saliency_folder,
    spurious_binary,
    synthetic_distractor,
)

DATASET_NAMES = (
    "decoy_digits", "decoy_mnist", "synthetic_distractor", "red_herring", "spurious_binary", "saliency_folder",
)


def resolve_config(
    name: str,
    config: str | tfds.core.BuilderConfig | None = None,
    *,
    manual_dir: str | os.PathLike[str] | None = None,
    **config_overrides: Any,
) -> tfds.core.BuilderConfig:
    """The builder config that ``build`` uses.

    Overrides are applied to the named (or default) config. A config that differs from a
    registered one gets the name ``<base>_<hash of its fields>``, so differently parameterised
    builds live in different directories of ``data_dir`` and rebuilding the same parameters
    reuses the data.

    Args:
      name: dataset name, optionally with a config (``"decoy_digits/clean"``).
      config: a registered config name or a ``BuilderConfig``; default: the builder's default.
      manual_dir: for ``saliency_folder``: a relative ``csv_path`` is made absolute against it, so
        that different folders never share a config name.
      **config_overrides: config fields to change, e.g. ``image_size=16``.

    Raises:
      ValueError: unknown dataset, config, or config field.
    """
    if "/" in name:
        if config is not None:
            raise ValueError(f"name {name!r} already names a config; do not also pass config")
        name, config = name.split("/", 1)
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown saljax dataset {name!r}; expected one of {DATASET_NAMES}")
    cls = tfds.builder_cls(name)
    if config is None:
        base = cls.builder_configs[cls.DEFAULT_BUILDER_CONFIG_NAME]
    elif isinstance(config, str):
        if config not in cls.builder_configs:
            raise ValueError(
                f"dataset {name!r} has no config {config!r}; "
                f"expected one of {sorted(cls.builder_configs)} or a BuilderConfig"
            )
        base = cls.builder_configs[config]
    else:
        base = config

    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(config_overrides) - fields)
    if unknown:
        allowed = sorted(_common.config_fields(base))
        raise ValueError(
            f"unknown config field(s) {unknown} for {name!r}; expected some of {allowed}"
        )
    if name == "saliency_folder" and manual_dir is not None:
        csv_path = os.fspath(config_overrides.get("csv_path", base.csv_path))
        if not os.path.isabs(csv_path):
            folder = os.path.expanduser(os.fspath(manual_dir))
            config_overrides["csv_path"] = os.path.abspath(os.path.join(folder, csv_path))
    if not config_overrides:
        return base
    candidate = dataclasses.replace(base, **config_overrides)
    base_fields, fields = _common.config_fields(base), _common.config_fields(candidate)
    if fields == base_fields:
        return base
    # The base config's description may state a value that was overridden (e.g. the image size).
    changed = ", ".join(f"{k}={v!r}" for k, v in fields.items() if base_fields[k] != v)
    return dataclasses.replace(
        candidate,
        name=f"{base.name}_{_common.config_digest(candidate)}",
        description=f"The {base.name!r} config with {changed}.",
    )


def build(
    name: str,
    data_dir: str | os.PathLike[str],
    config: str | tfds.core.BuilderConfig | None = None,
    *,
    manual_dir: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
    **config_overrides: Any,
) -> tfds.core.DatasetBuilder:
    """Builds (or reuses) a saljax dataset offline and returns its prepared builder.

    Example::

      builder = build("decoy_digits", "~/saljax_data", image_size=16, max_examples=100)
      source = builder.as_data_source("train")   # random access, numpy examples

    Args:
      name: one of ``DATASET_NAMES``, optionally ``"name/config"``.
      data_dir: root directory of the prepared datasets.
      config: a registered config name or a ``BuilderConfig``.
      manual_dir: the folder of ``saliency_folder`` (holding the CSV unless ``csv_path`` is
        absolute).
      rebuild: delete and regenerate the data even if it exists (e.g. after editing the CSV).
      **config_overrides: config fields to change (see ``resolve_config``).

    Returns:
      The ``tfds.core.DatasetBuilder`` after ``download_and_prepare``, writing array_record files
      under ``data_dir/<name>/<config name>/<version>``.
    """
    resolved = resolve_config(name, config, manual_dir=manual_dir, **config_overrides)
    builder = tfds.builder(
        name.split("/", 1)[0],
        data_dir=os.path.expanduser(os.fspath(data_dir)),
        config=resolved,
        file_format="array_record",
    )
    mode = (
        tfds.download.GenerateMode.FORCE_REDOWNLOAD
        if rebuild
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.path.expanduser(os.fspath(manual_dir)) if manual_dir else None,
            download_mode=mode,
            try_download_gcs=False,
        )
    )
    return builder


__all__ = ["DATASET_NAMES", "build", "resolve_config"]
