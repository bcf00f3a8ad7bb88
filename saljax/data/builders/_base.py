"""Shared pieces of the saljax dataset builders: feature spec, config helpers, base builder.

Every saljax dataset stores the same example layout so that one pipeline serves all of them:

- ``image``: uint8 (H, W, C)
- ``label``: int64 class index (``ClassLabel``)
- ``saliency_map``: float32 (H, W) in [0, 1]; 1 marks the evidence a human would use
- ``has_map``: bool; False means the map is all zeros and carries no information
- ``group`` (only where it applies): int64 attack type / generator / site
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

# Field names of ``tfds.core.BuilderConfig`` itself; everything else is a saljax parameter.
_TFDS_CONFIG_FIELDS = frozenset(
    {"name", "version", "release_notes", "supported_versions", "description", "tags"}
)


def saliency_features(
    *,
    height: int,
    width: int,
    channels: int,
    class_names: Sequence[str],
    group_names: Sequence[str] | None = None,
    with_group: bool = False,
) -> tfds.features.FeaturesDict:
    """The saljax feature spec.

    Images are stored as ``Tensor`` features (not ``Image``) so that building and reading need no
    TensorFlow. ``group`` is a ``ClassLabel`` when ``group_names`` is given, a plain int64
    ``Scalar`` when only ``with_group`` is set, and absent otherwise.
    """
    spec: dict[str, Any] = {
        "image": tfds.features.Tensor(shape=(height, width, channels), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(class_names)),
        "saliency_map": tfds.features.Tensor(shape=(height, width), dtype=np.float32),
        "has_map": tfds.features.Scalar(dtype=np.bool_),
    }
    if group_names:
        spec["group"] = tfds.features.ClassLabel(names=list(group_names))
    elif with_group:
        spec["group"] = tfds.features.Scalar(dtype=np.int64)
    return tfds.features.FeaturesDict(spec)


def config_fields(config: tfds.core.BuilderConfig) -> dict[str, Any]:
    """The saljax-specific fields of a builder config (those that change the generated data)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _TFDS_CONFIG_FIELDS
    }


def config_digest(config: tfds.core.BuilderConfig) -> str:
    """A short stable hash of the data-defining fields, used to name derived configs."""
    text = repr(sorted((k, repr(v)) for k, v in config_fields(config).items()))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def describe_config(config: tfds.core.BuilderConfig) -> str:
    """One line listing the config's parameters, appended to the dataset card."""
    items = ", ".join(f"{k}={v!r}" for k, v in config_fields(config).items())
    return f"Config {config.name!r}: {items}."


class StaleDatasetError(ValueError):
    """A prepared dataset is older than its source (e.g. the user's CSV changed); rebuild it."""


def check(condition: bool, field: str, expected: str, value: Any) -> None:
    """Raises a ValueError naming the config field when ``condition`` is false."""
    if not condition:
        raise ValueError(f"config field {field!r} must be {expected}; got {value!r}")


def check_fraction(value: float, field: str) -> None:
    check(0.0 <= float(value) <= 1.0, field, "a number in [0, 1]", value)


def check_count(value: int, field: str, minimum: int = 1) -> None:
    check(
        isinstance(value, (int, np.integer)) and int(value) >= minimum,
        field,
        f"an integer >= {minimum}",
        value,
    )


class SaliencyDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
    """Base of the saljax builders.

    - Writes ``array_record`` by default: it is the format that grain reads and the one that
      needs no TensorFlow.
    - Finds its source file without the ``importlib_resources`` backport (see ``code_path``).
    - A failed ``download_and_prepare`` removes the directories it created, so a later call
      never finds a half-built dataset (TFDS already deletes its ``incomplete.*`` folder; this
      also removes the per-dataset folders and ``.config`` metadata written before it).
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        """The builder's source file.

        TFDS's own lookup needs the ``importlib_resources`` backport for builders that live in a
        package, although that backport is only installed on Python < 3.9.
        """
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None

    @classmethod
    def resolve_overrides(
        cls, base: tfds.core.BuilderConfig, overrides: dict[str, Any], manual_dir: str | os.PathLike[str] | None
    ) -> dict[str, Any]:
        """The config overrides ``saljax.data.build`` applies to ``base``; identity by default.

        A builder that reads the user's files overrides this, e.g. to make a path relative to
        ``manual_dir`` absolute so that different folders never share a config name.
        """
        del base, manual_dir
        return overrides

    @classmethod
    def derived_config_name(cls, base: tfds.core.BuilderConfig, config: tfds.core.BuilderConfig) -> str:
        """The name of ``config``, derived from the registered ``base`` by overrides: ``<base>_<hash>``."""
        return f"{base.name}_{config_digest(config)}"

    def stale_reason(self) -> str | None:
        """Why the prepared copy no longer matches its source (then ``build`` refuses to reuse it), or None."""
        return None

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _saliency_info(
        self,
        description: str,
        *,
        height: int,
        width: int,
        channels: int,
        class_names: Sequence[str],
        group_names: Sequence[str] | None = None,
        with_group: bool = False,
        citation: str | None = None,
        metadata: tfds.core.MetadataDict | None = None,
    ) -> tfds.core.DatasetInfo:
        """The `DatasetInfo` every saljax builder returns: the card, the saljax features."""
        return tfds.core.DatasetInfo(
            builder=self,
            description=description + "\n" + describe_config(self.builder_config),
            features=saliency_features(height=height, width=width, channels=channels, class_names=class_names,
                                       group_names=group_names, with_group=with_group),
            supervised_keys=("image", "label"),
            citation=citation,
            metadata=metadata,
        )

    def download_and_prepare(self, **kwargs: Any) -> None:  # noqa: D102 (same as TFDS)
        root = epath.Path(self.data_dir_root)
        candidates = [root, root / "downloads"]
        if kwargs.get("download_dir"):
            candidates.append(epath.Path(kwargs["download_dir"]))
        rel = epath.Path(self.data_path).relative_to(root)
        for i in range(1, len(rel.parts) + 1):
            candidates.append(root.joinpath(*rel.parts[:i]))
        created = [p for p in candidates if not p.exists()]
        try:
            super().download_and_prepare(**kwargs)
        except BaseException:
            # Shortest paths first: removing a parent removes everything the build left inside.
            for path in sorted(created, key=lambda p: len(os.fspath(p))):
                if path.exists():
                    path.rmtree()
            raise
