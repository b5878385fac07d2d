"""Devices and hosts: the 1-D data-parallel mesh every jitted step of embjax runs on, placement of
replicated trees and batch-sharded arrays, and the XLA options steps are compiled with.

Used by the engine (embjax.extract) and the training loop (embjax.train); studies never touch it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all devices of all processes."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree, mesh: Mesh, donatable: bool = True):
    """Place a pytree fully replicated on the mesh (models, maps, heads, accumulators).

    With `donatable` (accumulators, which the step donates) every leaf goes through a host copy, so that
    leaves sharing one buffer (e.g. zeros reused in an init) get buffers of their own. Read-only trees
    (variables, a pass's aux) skip that copy: a leaf already on the mesh's devices is not copied at all,
    which matters for the thesis-scale map stacks (1.8 GB)."""
    sharding = NamedSharding(mesh, P())
    if donatable:
        return jax.tree.map(lambda x: jax.device_put(np.array(x), sharding), tree)

    def put(x):
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            if jax.process_count() > 1:  # a process-local array reaches the other processes via the host
                x = np.asarray(x)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded on the leading (batch) axis."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"batch_size {global_batch} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n}")


# --------------------------------------------------------------------------------------------------
# The jitted steps.

# XLA:CPU (jaxlib 0.10) hands convolutions and their elementwise neighbours to YNNPACK fusions by
# default. With those off, convolutions run on XLA's Eigen kernels and 1x1 convolutions become dots,
# which benchmarks/extract_throughput.py measured faster on this project's CPUs for every backbone it
# times (ResNet-50 and EfficientNet-Lite0; figures in benchmarks/RESULTS.md). Set
# EMBJAX_XLA_CPU_DEFAULTS=1 to compile with XLA's defaults instead.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib's CPU compiler knows the options (an unknown option is a compile error)."""
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(dict(CPU_COMPILER_OPTIONS))
        return True
    except Exception:  # noqa: BLE001  (any failure means: compile with the defaults)
        return False


def compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    """The XLA options the engine's steps are compiled with on `mesh`'s platform (None: defaults)."""
    if mesh.devices.flat[0].platform != "cpu" or os.environ.get("EMBJAX_XLA_CPU_DEFAULTS", "") not in ("", "0"):
        return None
    return dict(CPU_COMPILER_OPTIONS) if _cpu_options_supported() else None


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in its local order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:  # replicas of a shard on several local devices: once
            seen.add(start)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def is_primary() -> bool:
    """Whether this process writes what is written once (reports, manifests): process 0."""
    return jax.process_index() == 0


def topology() -> dict:
    """The devices and processes of this run, for a report's metadata."""
    return {"devices": [str(d) for d in jax.devices()], "process_count": jax.process_count()}
