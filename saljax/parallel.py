"""Data parallelism from one CPU to many hosts: a device mesh, `NamedSharding` and `jax.jit`.

The batch is split along a one-axis mesh named "data"; parameters, optimizer state and BatchNorm
statistics are replicated. The train step is ONE `jax.jit` program with those shardings, and XLA
inserts the gradient all-reduce itself (the compiler-driven form that `pjit` became). It replaces
`pmap`, which is legacy in JAX: pmap needs a leading device axis on every array, per-device code
and explicit `lax.pmean` calls, while a sharded `jit` keeps global shapes and the same code for 1
or 1000 devices.

BatchNorm under `jit` sees the GLOBAL batch: its mean and variance are computed over all devices
(XLA adds the cross-device reduction), so results do not depend on the device count. This is
SyncBatchNorm in PyTorch terms; PyTorch's DistributedDataParallel default normalises each device's
shard with its own statistics.

Multi-host: start every process with `initialize_distributed(...)` (wrapping
`jax.distributed.initialize`); each process loads its own slice of every global batch (grain's
`ShardByJaxProcess`), and `shard_batch` assembles the global array with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Array = jax.Array
DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A one-axis ("data") mesh over the first `num_devices` devices (all by default)."""
    available = jax.device_count()
    n = available if num_devices is None else num_devices
    if not 1 <= n <= available:
        raise ValueError(f"num_devices must lie in [1, {available}] (the devices JAX sees); got {num_devices}")
    # Auto axes: a data-parallel step needs no per-op sharding annotations.
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the "data" axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the devices (and the processes)."""
    n = mesh.size
    if batch_size % n:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of devices {n}")
    if batch_size % jax.process_count():
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {jax.process_count()}")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Array]:
    """This process's slice of a global batch (host arrays) -> global arrays split over "data"."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` on all devices of `mesh`."""
    return jax.device_put(tree, replicated(mesh))


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, **kwargs: Any) -> None:
    """`jax.distributed.initialize` for a multi-process run; on CPU with gloo collectives.

    Call before any other JAX call. On TPU pods and SLURM/Kubernetes GPU clusters, where JAX finds
    the cluster by itself, call `jax.distributed.initialize()` without arguments instead.
    """
    # Asking for the backend here would initialise it too early; the setting only affects CPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs)
