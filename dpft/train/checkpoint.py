"""Checkpoints with orbax: train state, privatizer key, sampler state and privacy ledger together.

A checkpoint is one orbax step directory holding the state's array leaves and a JSON record
(step, ledger, sampler state, config fingerprint). orbax writes into a temporary directory and
renames it when complete, so a crash mid-write never leaves a checkpoint that would be read.
The tree structure is rebuilt from the config on restore, so the leaves are stored flat.

Multi-process runs: every process calls `save` and `restore` with the same step; leaves that
are global arrays (spanning the devices of several processes) go to orbax as they are, so each
process writes only its own shards (one copy of a replicated array) and process 0 the metadata
and the JSON record; they are restored with the sharding of the ``like`` leaves. The workdir
must be on a file system every process sees (e.g. gs:// on a TPU pod).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def config_fingerprint(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


class Checkpointer:
    """Keeps the last ``keep`` checkpoints under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        leaves = jax.tree_util.tree_leaves(state)
        arrays = {f"{i:05d}": x if _is_global(x) else np.asarray(x) for i, x in enumerate(leaves)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restores into the structure (and dtypes) of ``like``."""
        leaves, treedef = jax.tree_util.tree_flatten(like)
        abstract = {
            f"{i:05d}": jax.ShapeDtypeStruct(
                np.shape(x),
                x.dtype if _is_global(x) else np.asarray(x).dtype,
                sharding=x.sharding if _is_global(x) else None,
            )
            for i, x in enumerate(leaves)
        }
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        arrays = out["state"]
        if len(arrays) != len(leaves):
            raise ValueError(
                f"checkpoint {self.directory}/{step} has {len(arrays)} arrays, expected "
                f"{len(leaves)}: it was written by a different config"
            )
        restored = [arrays[f"{i:05d}"] for i in range(len(leaves))]
        return jax.tree_util.tree_unflatten(treedef, restored), dict(out["meta"])

    def load_arrays(self, step: int) -> tuple[list[np.ndarray], dict]:
        """The stored leaves (in tree order) and the JSON record, without a target structure.

        The leaves come back on this process's first device whatever the topology that saved
        them (e.g. a multi-process run).
        """
        stored = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device)
            for k, v in getattr(stored, "tree", stored).items()
        }
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        arrays = out["state"]
        return [np.asarray(arrays[k]) for k in sorted(arrays)], dict(out["meta"])

    def close(self) -> None:
        self.manager.close()


def _is_global(x) -> bool:
    """A jax.Array with shards on other processes' devices."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text())
