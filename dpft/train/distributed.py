"""Multi-host runs: `jax.distributed` initialisation and global arrays from per-process data.

On a TPU pod slice every host runs the same command; `initialize()` connects them (on Cloud TPU
``jax.distributed.initialize()`` needs no arguments). Elsewhere set ``DPFT_COORDINATOR``
(host:port of process 0), ``DPFT_NUM_PROCESSES`` and ``DPFT_PROCESS_ID``; on CPU the processes
talk through gloo collectives, which is how the tests run two local processes.

After initialisation ``jax.devices()`` lists the devices of every process, so a mesh over them
is global. `global_batch` builds the sharded batch array from the host-side padded batch: each
process gathers only the rows of its own devices (data sharded per process), and the DP step
(`dpft.train.step.make_train_step` with ``mesh``) adds the per-device clipped sums with one psum
and draws the noise once, with one key, on the replicated sum. Only process 0 should write
files (`is_primary`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def initialize() -> bool:
    """Connects the processes of a multi-host run; False (and nothing done) for one process."""
    coordinator = os.environ.get("DPFT_COORDINATOR")
    on_tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    if not coordinator and not on_tpu_pod:
        return False
    # CPU processes exchange collectives through gloo (no effect on TPU/GPU devices). Asking for
    # the backend here would initialise it before jax.distributed, which must come first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["DPFT_NUM_PROCESSES"]),
            process_id=int(os.environ["DPFT_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    return True


def is_primary() -> bool:
    """True on the process that writes checkpoints, metrics and summaries."""
    return jax.process_index() == 0


def global_mesh(axis: str = "data") -> Mesh:
    """A 1-D mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (axis,))


def global_batch(mesh: Mesh, batch: Mapping[str, np.ndarray], axis: str = "data") -> dict:
    """The padded batch as global arrays sharded over ``axis``, built from host-local numpy.

    Every process holds the same (deterministic) index batch; each materialises only the rows
    of its own devices.
    """
    sharding = NamedSharding(mesh, P(axis))
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        for k, v in batch.items()
    }


def replicated(mesh: Mesh, tree):
    """``tree`` (identical on every process) as fully replicated global arrays."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree)


def to_host(tree):
    """Replicated global arrays back to numpy (every process has a full copy)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)
