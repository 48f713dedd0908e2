"""Worker of tests/test_distributed.py: one process of a 2-process CPU run (not a test file)."""

import json
import sys

from dpft.train import distributed


def main(out_path: str) -> None:
    assert distributed.initialize()
    import jax

    from tests.dist_case import run_case

    mesh = distributed.global_mesh()
    params = run_case(mesh, global_arrays=True)
    if distributed.is_primary():
        with open(out_path, "w") as f:
            json.dump({k: v.tolist() for k, v in params.items()}, f)
    print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count())


if __name__ == "__main__":
    main(sys.argv[1])
