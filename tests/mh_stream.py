"""Worker of tests/test_stream.py: one process of a 2-process CPU stream (not a test file).

``mh_stream.py DATA_DIR OUT I``: `stream_case` over every device of both processes; process 0
writes the gathered batches to OUT (npz).
"""

import sys

import numpy as np

from dpft.train import distributed


def stream_case(mesh, data_dir: str, steps: int = 3) -> dict[str, np.ndarray]:
    """The global batches of ``steps`` streamed steps, each process reading its own rows
    (`distributed.local_rows`), gathered on the host: ``{'image', 'label', 'mask'}`` stacked."""
    from dpft.data import ArraySource, ImageTransform, StreamLoader, StreamSplit, load
    from dpft.privacy.sampling import PoissonSampler

    ds = load("mnist", "train", data_dir=data_dir)
    split = StreamSplit(ArraySource(ds.images, ds.labels), ImageTransform("mnist", 16, True), 10)
    sampler = PoissonSampler(len(ds.labels), 0.1, 5, 64)  # rows: a multiple of 4 devices
    rows = distributed.local_rows(mesh, 64)
    out = {"image": [], "label": [], "mask": []}
    with StreamLoader(split, sampler, 0, steps, rows=rows) as loader:
        for _, batch, mask in loader:
            arrays = distributed.global_from_rows(mesh, {**batch, "mask": mask}, rows, 64)
            for k, v in distributed.to_host(arrays).items():
                out[k].append(v)
    return {k: np.stack(v) for k, v in out.items()}


if __name__ == "__main__":
    assert distributed.initialize()
    import jax

    got = stream_case(distributed.global_mesh(), sys.argv[1])
    if distributed.is_primary():
        np.savez(sys.argv[2], **got)
    print(
        "process",
        jax.process_index(),
        "rows",
        distributed.local_rows(distributed.global_mesh(), 64),
    )
