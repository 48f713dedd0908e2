"""Multi-host runs: `jax.distributed` initialisation, global arrays from per-process data.

Every process runs the same command and the same config. `initialize` connects them:

* ``config.parallel.coordinator_address`` (host:port of process 0) with
  ``config.parallel.num_processes`` and ``config.parallel.process_id`` (the launcher sets the
  last per process, e.g. ``--config.parallel.process_id=$RANK``); or the environment variables
  ``DPFT_COORDINATOR``, ``DPFT_NUM_PROCESSES`` and ``DPFT_PROCESS_ID``;
* on a Cloud TPU pod slice nothing: ``jax.distributed.initialize()`` finds the other hosts
  itself (``config.parallel.multihost='auto'`` does so when ``TPU_WORKER_HOSTNAMES`` lists more
  than one host; ``'on'`` always calls it, e.g. under SLURM).

On CPU the processes exchange collectives through gloo, which is how the tests run two local
processes. After initialisation ``jax.devices()`` lists the devices of every process and the
trainer's mesh spans all of them. Every process computes the same Poisson batch (same seed, same
sampler), gathers only the rows of its own devices (`gather_global`), and the DP step adds the
per-device clipped sums with one psum and draws the noise ONCE, with one key, on the replicated
sum (`dpft.train.step.make_train_step`). Only process 0 writes files (`is_primary`), except
orbax checkpoints, which every process saves together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

#: config.parallel keys that describe the launch, not the experiment (kept out of config.json,
#: so every process has the same config fingerprint and a run may resume on another topology).
LAUNCH_KEYS = ("multihost", "coordinator_address", "num_processes", "process_id")
_MODES = ("auto", "on", "off")


def _launch(parallel) -> tuple[str, str, int, int]:
    """(mode, coordinator, num_processes, process_id) from the config, else the environment."""
    get = parallel.get if parallel is not None else (lambda k, d=None: d)
    mode = get("multihost", "auto")
    if mode not in _MODES:
        raise ValueError(f"config.parallel.multihost must be auto|on|off, got {mode!r}")
    coordinator = get("coordinator_address", "") or os.environ.get("DPFT_COORDINATOR", "")
    num = int(get("num_processes", 0) or os.environ.get("DPFT_NUM_PROCESSES", 0))
    pid = int(get("process_id", -1))
    if pid < 0:
        pid = int(os.environ.get("DPFT_PROCESS_ID", -1))
    if coordinator and mode != "off":
        if num < 1:
            raise ValueError(
                f"config.parallel.num_processes must be >= 1 with a coordinator_address, got {num}"
            )
        if not 0 <= pid < num:
            raise ValueError(
                f"config.parallel.process_id must be in [0, {num}) with a coordinator_address, "
                f"got {pid}"
            )
    return mode, coordinator, num, pid


def initialize(parallel=None) -> bool:
    """Connects the processes of a multi-host run (see the module doc); False if single-process.

    ``parallel`` is ``config.parallel`` (None: environment only). Idempotent: an already
    initialised `jax.distributed` is kept. Must run before anything touches a JAX backend.
    """
    mode, coordinator, num, pid = _launch(parallel)
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    on_tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    if mode == "off" or (mode == "auto" and not coordinator and not on_tpu_pod):
        return False
    # CPU processes exchange collectives through gloo (no effect on TPU/GPU devices). Asking for
    # the backend here would initialise it before jax.distributed, which must come first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num, process_id=pid
        )
    else:
        jax.distributed.initialize()
    return jax.process_count() > 1


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_primary() -> bool:
    """True on the process that writes metrics, summaries and plots."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits for every process (no-op for one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_seed(seed: int) -> int:
    """Process 0's 64-bit ``seed`` on every process (secure mode draws it from OS entropy)."""
    if not is_multiprocess():
        return seed
    from jax.experimental import multihost_utils

    words = np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    hi, lo = (int(w) for w in multihost_utils.broadcast_one_to_all(words))
    return (hi << 32) | lo


def global_mesh(axis: str = "data") -> Mesh:
    """A 1-D mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (axis,))


def gather_global(
    mesh: Mesh,
    arrays: Mapping[str, np.ndarray],
    indices: np.ndarray,
    mask: np.ndarray,
    axis: str = "data",
) -> dict:
    """The padded batch ``arrays[k][indices]`` plus ``mask``, as global arrays over ``axis``.

    Every process passes the same ``indices``/``mask`` (the sampler is deterministic) and
    gathers only the rows that land on its own devices: data is sharded per process.
    """
    sharding = NamedSharding(mesh, P(axis))
    rows = len(indices)

    def build(v: np.ndarray, take):
        shape = (rows, *np.shape(v)[1:])
        return jax.make_array_from_callback(shape, sharding, lambda idx: take(idx[0]))

    out = {k: build(v, lambda r, v=v: np.take(v, indices[r], axis=0)) for k, v in arrays.items()}
    out["mask"] = build(mask, lambda r: np.asarray(mask[r], np.float32))
    return out


def local_rows(mesh: Mesh, rows: int, axis: str = "data") -> tuple[int, int]:
    """``(lo, hi)``: the rows of a ``rows``-row batch sharded over ``axis`` that land on this
    process's devices (a streamed input reads only those, `global_from_rows`)."""
    index = NamedSharding(mesh, P(axis)).addressable_devices_indices_map((rows,))
    spans = sorted({(range(rows)[i[0]].start, range(rows)[i[0]].stop) for i in index.values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(
            f"the devices of process {jax.process_index()} hold rows {spans} of the batch, not "
            "one contiguous range: order config.parallel's mesh by process"
        )
    return lo, hi


def global_from_rows(
    mesh: Mesh, local: Mapping[str, np.ndarray], rows: tuple[int, int], total: int, axis="data"
) -> dict:
    """Global arrays of ``total`` rows sharded over ``axis`` from this process's rows
    ``rows = (lo, hi)`` (`local_rows`): ``local[k][i]`` is row ``lo + i`` of ``k``."""
    sharding = NamedSharding(mesh, P(axis))
    lo = rows[0]

    def build(v):
        def part(idx):
            r = range(total)[idx[0]]
            return np.asarray(v[r.start - lo : r.stop - lo])

        return jax.make_array_from_callback((total, *np.shape(v)[1:]), sharding, part)

    return {k: build(v) for k, v in local.items()}


def global_batch(mesh: Mesh, batch: Mapping[str, np.ndarray], axis: str = "data") -> dict:
    """An already gathered host batch as global arrays sharded over ``axis``."""
    sharding = NamedSharding(mesh, P(axis))
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        for k, v in batch.items()
    }


def replicated(mesh: Mesh, tree):
    """``tree`` (identical on every process) as fully replicated global arrays."""
    return put(tree, jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree))


def put(tree, shardings):
    """``tree`` (identical on every process) as global arrays with ``shardings`` (a tree like
    ``tree``); each process materialises only its own shards."""

    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(one, to_host(tree), shardings)


def to_host(tree):
    """Arrays (global ones included, replicated or sharded) as numpy, in full on every process.

    A sharded global array is all-gathered: every process must call this together.
    """

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)
