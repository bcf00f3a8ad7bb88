"""Building saljax datasets by name, with config overrides or from a training config's ``dataset`` section."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds

from saljax.data import builders as _builders  # noqa: F401  (importing it registers every builder)
from saljax.data import registry
from saljax.data.builders import _base

DATASET_NAMES = registry.names()


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
      config: a registered config name or a ``BuilderConfig``; None (or "default" for a builder
        without a config of that name): the builder's default.
      manual_dir: the user's folder (``saliency_folder``: a relative ``csv_path`` is made absolute
        against it, so that different folders never share a config name).
      **config_overrides: config fields to change, e.g. ``image_size=16``.

    Raises:
      ValueError: unknown dataset, config, or config field.
    """
    if "/" in name:
        if config is not None:
            raise ValueError(f"name {name!r} already names a config; do not also pass config")
        name, config = name.split("/", 1)
    cls = registry.builder_class(name)
    if config == "default" and "default" not in cls.builder_configs:
        config = None  # "default" always means the builder's default config (saliency_folder's is "csv")
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

    field_names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(config_overrides) - field_names)
    if unknown:
        allowed = sorted(_base.config_fields(base))
        raise ValueError(
            f"unknown config field(s) {unknown} for {name!r}; expected some of {allowed}"
        )
    if issubclass(cls, _base.SaliencyDatasetBuilder):
        config_overrides = cls.resolve_overrides(base, dict(config_overrides), manual_dir)
    if not config_overrides:
        return base
    candidate = dataclasses.replace(base, **config_overrides)
    base_fields, fields = _base.config_fields(base), _base.config_fields(candidate)
    if fields == base_fields:
        return base
    # The base config's description may state a value that was overridden (e.g. the image size).
    changed = ", ".join(f"{k}={v!r}" for k, v in fields.items() if base_fields[k] != v)
    return dataclasses.replace(
        candidate,
        name=cls.derived_config_name(base, candidate)
        if issubclass(cls, _base.SaliencyDatasetBuilder)
        else f"{base.name}_{_base.config_digest(candidate)}",
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
      rebuild: regenerate the data even if a prepared copy exists (e.g. after editing the CSV).
        The new copy is built and checked beside the old one and replaces it only when complete;
        a failed rebuild leaves the old copy untouched.
      **config_overrides: config fields to change (see ``resolve_config``).

    Returns:
      The ``tfds.core.DatasetBuilder`` after ``download_and_prepare``, writing array_record files
      under ``data_dir/<name>/<config name>/<version>``.

    Raises:
      StaleDatasetError: the prepared copy is older than its source (``saliency_folder``: the CSV
        changed) and ``rebuild`` is False.
    """
    resolved = resolve_config(name, config, manual_dir=manual_dir, **config_overrides)
    cls = registry.builder_class(name.split("/", 1)[0])
    root = os.path.expanduser(os.fspath(data_dir))
    builder = cls(data_dir=root, config=resolved, file_format="array_record")
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(os.fspath(manual_dir)) if manual_dir else None,
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
        try_download_gcs=False,
    )
    if builder.is_prepared():
        if rebuild:
            return _rebuild_beside(cls, builder, download_config)
        reason = builder.stale_reason() if isinstance(builder, _base.SaliencyDatasetBuilder) else None
        if reason is not None:
            raise _base.StaleDatasetError(f"{resolved.name}: {reason}")
    builder.download_and_prepare(download_config=download_config)
    return builder


def _check_prepared(builder: tfds.core.DatasetBuilder) -> None:
    """Opens every split and reads its first and last example; raises if a split is unreadable."""
    for split, info in builder.info.splits.items():
        source = builder.as_data_source(split)
        if len(source) != info.num_examples:
            raise ValueError(f"rebuilt split {split!r} holds {len(source)} examples; its info says {info.num_examples}")
        if len(source):
            _ = source[0], source[len(source) - 1]


def _rebuild_beside(
    cls: type[tfds.core.DatasetBuilder],
    old: tfds.core.DatasetBuilder,
    download_config: tfds.download.DownloadConfig,
) -> tfds.core.DatasetBuilder:
    """Builds a fresh copy in a staging folder next to ``old``'s data, checks it, then swaps it in.

    Until the two renames at the end nothing touches the old copy, so a failed or interrupted
    rebuild leaves it usable.
    """
    root = os.fspath(old.data_dir_root)
    staging = tempfile.mkdtemp(prefix=f".{old.name}-rebuild-", dir=root)
    try:
        fresh = cls(data_dir=staging, config=old.builder_config, file_format="array_record")
        fresh.download_and_prepare(download_config=download_config)
        _check_prepared(fresh)
        target, built = os.fspath(old.data_path), os.fspath(fresh.data_path)
        retired = f"{target}.replaced-{os.getpid()}"
        os.replace(target, retired)
        try:
            os.replace(built, target)
        except BaseException:
            os.replace(retired, target)
            raise
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cls(data_dir=root, config=old.builder_config, file_format="array_record")


def _field(section: Any, name: str, default: Any = None) -> Any:
    """``section[name]`` for a mapping, ``section.name`` otherwise (ConfigDict, dataclass, namespace)."""
    if isinstance(section, Mapping):
        return section.get(name, default)
    return getattr(section, name, default)


def from_config(dataset: Any, *, rebuild: bool | None = None) -> tfds.core.DatasetBuilder:
    """Builds (or reuses) the dataset that a training config's ``dataset`` section describes.

    The one way ``saljax train``, ``saljax explain`` and ``saljax experiment`` turn a config into a
    prepared builder. Example::

      builder = from_config(config.dataset)      # an ml_collections.ConfigDict
      builder = from_config({"name": "red_herring", "data_dir": "~/saljax_data"})

    Fields read (any other field, e.g. the loader's ``train_split`` / ``augment`` / ``mean``, is
    ignored):

    - ``name`` (required): a registered dataset, optionally ``"name/config"``.
    - ``config``: a builder config name; empty or None: the builder's default. With
      ``"name/config"`` it must be empty or the same name.
    - ``overrides``: a mapping of builder config fields (empty or None: none).
    - ``data_dir`` (required): root of the prepared datasets; ``~`` is expanded.
    - ``manual_dir``: the user's folder (``saliency_folder``); empty or None: none.
    - ``rebuild``: regenerate even if a prepared copy exists (default False).

    Args:
      dataset: a mapping, an ``ml_collections.ConfigDict`` or any object with those attributes.
      rebuild: overrides the section's ``rebuild`` when not None.

    Returns:
      The prepared ``tfds.core.DatasetBuilder`` (see ``build``).

    Raises:
      ValueError: a missing ``name`` or ``data_dir``, a conflicting config, an unknown dataset,
        config or config field.
    """
    name = _field(dataset, "name")
    if not name or not isinstance(name, str):
        raise ValueError(f"dataset.name must be a registered dataset name, one of {DATASET_NAMES}; got {name!r}")
    config = _field(dataset, "config") or None
    if "/" in name:
        name, named = name.split("/", 1)
        if config not in (None, named):
            raise ValueError(f"dataset.name names the config {named!r} but dataset.config is {config!r}; give one of them")
        config = named
    data_dir = _field(dataset, "data_dir")
    if not data_dir:
        raise ValueError("dataset.data_dir must be the directory of the prepared datasets; got nothing")
    overrides = _field(dataset, "overrides") or {}
    if not hasattr(overrides, "items"):
        raise ValueError(f"dataset.overrides must be a mapping of builder config fields; got {overrides!r}")
    manual_dir = _field(dataset, "manual_dir") or None
    if rebuild is None:
        rebuild = bool(_field(dataset, "rebuild", False))
    return build(
        name,
        os.path.expanduser(os.fspath(data_dir)),
        config,
        manual_dir=os.path.expanduser(os.fspath(manual_dir)) if manual_dir else None,
        rebuild=rebuild,
        **dict(overrides.items()),
    )


__all__ = ["DATASET_NAMES", "build", "from_config", "resolve_config"]
