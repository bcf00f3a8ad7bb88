"""A training run's work directory: its layout, its config.json, and the errors of a run.

    config.json            the training config (ml_collections, as JSON)
    checkpoints/<step>/    Orbax checkpoints (`saljax.checkpoint`)
    metrics.jsonl          one JSON object per logged step (`saljax.writers`)
    tensorboard/           TensorBoard event files

This module reads and writes only plain files; `saljax.checkpoint` handles the checkpoints and
`saljax.train.load_model` the model of a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import ml_collections

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "METRICS_FILE",
    "CheckpointError",
    "NonFiniteError",
    "atomic_write",
    "check_writable",
    "config_changes",
    "load_config",
    "save_config",
]

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"

# Filled in from the dataset when training starts, so they never count as a config change.
_FILLED_IN = ("num_classes", "in_channels", "input_size")


class CheckpointError(RuntimeError):
    """A work directory, its config.json or a checkpoint in it cannot be used."""


class NonFiniteError(FloatingPointError):
    """A loss or a parameter became NaN or inf."""


def check_writable(directory: str | os.PathLike[str]) -> str:
    """The absolute path of `directory` after checking that a run can write there.

    The directory may not exist yet (it is created later); its nearest existing ancestor must then
    be a writable directory. Writes and removes a probe file, so read-only file systems are caught
    too. Raises CheckpointError (one line) otherwise.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"workdir {path} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointError(f"workdir {path} cannot be created: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".saljax-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise CheckpointError(f"workdir {path} is not writable ({existing}: {error.strerror or error})") from None
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _remove_orphans(directory: str, name: str) -> None:
    """Removes the temporary files `atomic_write` left for `name` in processes that were killed."""
    if os.name != "posix":  # os.kill(pid, 0) asks about a process only on POSIX
        return
    prefix = f".{name}."
    for entry in os.listdir(directory):
        pid = entry[len(prefix):].split(".", 1)[0]
        if entry.startswith(prefix) and entry.endswith(".tmp") and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, entry))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Opens a temporary file beside `path` for writing; it replaces `path` only when the block completes.

    Every file saljax rewrites in place goes through here (config.json, results pages and their JSON,
    explanation reports, figures): an exception inside the block, or a process killed during it,
    leaves the previous `path` as it was. The temporary file (`.<name>.<pid>.<random>.tmp`, same
    directory, so the final rename is atomic) is removed on an exception, and by the next write of
    `path` when its process was killed. The new file keeps the permissions of the one it replaces
    (0644 for a new one). Example::

        with atomic_write("out/report.md", encoding="utf-8") as f:
            f.write(text)
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    _remove_orphans(directory, name)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_config(directory: str | os.PathLike[str], config: Any) -> None:
    """Writes the training config as JSON (`config.json`), atomically (`atomic_write`)."""
    text = config.to_json(indent=2, sort_keys=True) if hasattr(config, "to_json") else json.dumps(config, indent=2)
    with atomic_write(os.path.join(os.fspath(directory), CONFIG_FILE)) as f:
        f.write(text)


def config_changes(old: Any, new: Any) -> list[str]:
    """The top-level fields in which two training configs (ConfigDicts or dicts) differ, sorted.

    `model.num_classes`, `model.in_channels` and `model.input_size` are ignored: training fills
    them in from the dataset, so a config before training and the same config after it compare
    equal.
    """

    def plain(config: Any) -> dict[str, Any]:
        c = json.loads(config.to_json() if hasattr(config, "to_json") else json.dumps(config, default=str))
        for key in _FILLED_IN:
            c.get("model", {}).pop(key, None)
        return c

    a, b = plain(old), plain(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def load_config(directory: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """The `ml_collections.ConfigDict` a run in `directory` was trained with.

    Raises CheckpointError naming the file when config.json is missing, unreadable or not a JSON
    object.
    """
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: {os.fspath(directory)} is not a saljax work directory")
    try:
        with open(path) as f:
            loaded = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt or unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object, got {type(loaded).__name__}")
    return ml_collections.ConfigDict(loaded)
