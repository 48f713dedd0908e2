"""Peak memory of one DP step vs the logical batch size (huge logical batches).

Each measurement runs in a fresh subprocess: build the model, run ONE DP step over a logical
batch of L examples accumulated in host chunks (`dpft.train.accumulate`), and report the peak
resident set size (``ru_maxrss``) and the wall time of the step. Peak memory should not grow
with L: only one chunk of examples and one microbatch of per-example gradients are alive.

    python -m experiments.huge_batch                 # writes experiments/results/huge_batch.md
    python -m experiments.huge_batch --one resnet20 4096   # a single measurement (internal)

Scaled down for 2 CPU cores: the default grid goes to 2^14 examples for ResNet-20 (frozen BN,
every parameter trainable, 32x32x3, ghost norms); larger sizes are single ``--one resnet20 L``
runs. The linear head on 64-d features runs the full 2^20. The examples are synthetic (a fixed
pool of 4096 inputs indexed modulo the pool), so the dataset's own memory is the same for every
L. This measures memory and speed only; how DP-LAMB and DP-SGD train at large batches is
`experiments.lamb_vs_sgd`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

OUT = pathlib.Path(__file__).parent / "results"
POOL = 4096


def measure(model_name: str, logical: int, chunk: int, microbatch: int, norms: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpft import models, optim
    from dpft.host import tune_host_allocator
    from dpft.privacy import clipping
    from dpft.train import accumulate
    from dpft.train.step import TrainState, cross_entropy_loss, partition

    tune_host_allocator()  # as `python -m dpft` does
    rng = np.random.default_rng(0)
    if model_name == "linear":
        model = models.get_model("linear", 10)
        pool = rng.normal(size=(POOL, 64)).astype(np.float32)
    else:
        model = models.get_model(model_name, 10, norm="frozen_bn")
        pool = rng.normal(size=(POOL, 32, 32, 3)).astype(np.float32)
    arrays = {"image": pool, "label": (np.arange(POOL) % 10).astype(np.int32)}
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(pool[:1]))
    params, frozen = partition(variables, (".*",))
    tx = optim.dp_sgd(
        0.1,
        noise_multiplier=1.0,
        l2_sensitivity=1.0,
        expected_batch_size=float(logical),
        key=jax.random.PRNGKey(1),
    )
    state = TrainState(jnp.zeros([], jnp.int32), params, tx.init(params), frozen)
    step = accumulate.jit_accumulating(
        accumulate.make_accumulating_step(
            cross_entropy_loss(model.apply),
            clipping.FlatClip(1.0),
            tx,
            microbatch_size=microbatch,
            norm_strategy=norm_strategy(norms),
        )
    )
    indices = np.arange(logical) % POOL
    mask = np.ones(logical, bool)
    # compile on a one-chunk batch, then time the logical step
    state, _ = accumulate.run_chunked(
        step, state, arrays, indices[:chunk], mask[:chunk], chunk, jax.random.PRNGKey(2)
    )
    t0 = time.time()
    state, metrics = accumulate.run_chunked(
        step, state, arrays, indices, mask, chunk, jax.random.PRNGKey(3)
    )
    jax.block_until_ready(state)
    seconds = time.time() - t0
    return {
        "model": model_name,
        "logical_batch": logical,
        "chunk": chunk,
        "microbatch": microbatch,
        "norms": norms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_seconds": seconds,
        "examples_per_second": logical / seconds,
        "batch_size_seen": float(metrics["debug/batch_size"]),
    }


def norm_strategy(name: str):
    from dpft.privacy import clipping
    from dpft.privacy.ghost import GhostNorms

    return {"vmap": clipping.VmapNorms(), "ghost": GhostNorms()}[name]


GRID = {
    "linear": {"chunk": 16384, "microbatch": 4096, "sizes": [2**14, 2**17, 2**20]},
    # One microbatch per host chunk: XLA:CPU runs ResNet-20's per-example step 2-9x slower inside
    # the lax.scan that sums the microbatches of a chunk than as separate calls (a jax#12868-like
    # loop-body slowdown), so on CPU the host loop over chunks is the fast microbatch loop.
    "resnet20": {"chunk": 64, "microbatch": 64, "sizes": [2**6, 2**10, 2**14]},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=2, metavar=("MODEL", "L"))
    p.add_argument("--models", default="linear,resnet20")
    p.add_argument("--norms", default="ghost", choices=("ghost", "vmap"))
    p.add_argument("--sizes", default="", help="logical batch sizes, e.g. 1048576 (default: GRID)")
    p.add_argument("--out", default="huge_batch", help="results name under experiments/results")
    args = p.parse_args()
    if args.one:
        name, size = args.one[0], int(args.one[1])
        g = GRID[name]
        chunk = min(g["chunk"], size)  # a chunk must divide the logical batch
        print(json.dumps(measure(name, size, chunk, g["microbatch"], args.norms)))
        return
    rows = []
    for name in args.models.split(","):
        sizes = [int(v) for v in args.sizes.split(",") if v] or GRID[name]["sizes"]
        for size in sizes:
            cmd = [sys.executable, "-m", "experiments.huge_batch", "--one", name, str(size)]
            cmd += ["--norms", args.norms]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Peak memory of one DP step vs logical batch size",
        "",
        "`python -m experiments.huge_batch`; one subprocess per row; synthetic inputs; CPU.",
        "",
        "| model | logical batch | chunk | microbatch | norms | peak RSS (MB) | step (s) | "
        "examples/s |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['logical_batch']} | {r['chunk']} | {r['microbatch']} | "
            f"{r.get('norms', 'vmap')} | {r['peak_rss_mb']:.0f} | {r['step_seconds']:.2f} | "
            f"{r['examples_per_second']:.0f} |"
        )
    (OUT / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    (OUT / f"{args.out}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
