"""Worker of tests/test_distributed.py: one process of a 2-process CPU run (not a test file).

``mh_worker.py step OUT I``: three DP steps of `tests.dist_case.run_case`, params to OUT.
``mh_worker.py train DATA_DIR WORKDIR OUT I``: `train_and_evaluate` of `tiny_train_config`
(which calls ``jax.distributed.initialize`` itself); process I's summary to OUT + I.
"""

import json
import sys

from dpft.train import distributed


def step_case(out_path: str) -> None:
    assert distributed.initialize()
    import jax

    from tests.dist_case import run_case

    mesh = distributed.global_mesh()
    params = run_case(mesh, global_arrays=True)
    if distributed.is_primary():
        with open(out_path, "w") as f:
            json.dump({k: v.tolist() for k, v in params.items()}, f)
    print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count())


def train_case(data_dir: str, workdir: str, out_path: str) -> None:
    import pathlib

    from dpft.train import train_and_evaluate
    from tests.dist_case import tiny_train_config

    summary = train_and_evaluate(tiny_train_config(pathlib.Path(data_dir)), workdir)
    import jax

    with open(out_path, "w") as f:
        json.dump({"process": jax.process_index(), "devices": jax.device_count(), **summary}, f)


if __name__ == "__main__":
    # the test appends this process's index: train writes its summary to OUT + index
    if sys.argv[1] == "train":
        train_case(sys.argv[2], sys.argv[3], sys.argv[4] + sys.argv[5])
    else:
        step_case(sys.argv[2])
