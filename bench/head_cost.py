"""What head tuning costs: a DP step of the head vs the backbone's forward pass.

Frozen parameters are closed over by the per-example loss and never differentiated, so a DP
step that tunes only the head of a frozen ResNet-20 should cost about one forward pass of the
backbone per example; on cached features it costs a matmul. Timed in one process, interleaved
round-robin after compilation (median of repeats):

* ``forward``: the backbone + head forward pass on a batch of 64 images;
* ``dp_head_on_images``: the DP step (flat clipping, vmap norms) training only ``linear/*``;
* ``dp_head_on_features``: the same step on the 64-d cached features (a `LinearHead`);
* ``dp_full``: the DP step training every parameter (per-example backward through the net).

    python -m bench.head_cost [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpft import models, optim
from dpft.host import tune_host_allocator
from dpft.privacy import clipping
from dpft.train.step import TrainState, cross_entropy_loss, make_train_step, partition

OUT = pathlib.Path(__file__).parent


def _dp_step(model, variables, trainable, batch):
    params, frozen = partition(variables, trainable)
    tx = optim.dp_sgd(
        0.1,
        noise_multiplier=1.0,
        l2_sensitivity=1.0,
        expected_batch_size=64.0,
        key=jax.random.PRNGKey(1),
    )
    state = TrainState(jnp.zeros([], jnp.int32), params, tx.init(params), frozen)
    step = jax.jit(make_train_step(cross_entropy_loss(model.apply), clipping.FlatClip(1.0), tx))
    rng = jax.random.PRNGKey(2)
    return lambda: jax.block_until_ready(step(state, batch, rng)[0].params)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    tune_host_allocator()  # as `python -m dpft` does
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 32, 32, 3)).astype(np.float32))
    y = jnp.asarray(np.arange(64) % 10, jnp.int32)
    mask = jnp.ones(64, jnp.float32)
    model = models.get_model("resnet20", 10, norm="frozen_bn")
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    fwd = jax.jit(lambda v, a: model.apply(v, a))
    feats = jax.jit(lambda v, a: model.apply(v, a, method=model.features))(variables, x)
    head = models.get_model("linear", 10)
    head_vars = {"params": {"linear": variables["params"]["linear"]}}
    fns = {
        "forward": lambda: jax.block_until_ready(fwd(variables, x)),
        "dp_head_on_images": _dp_step(
            model, variables, (r"linear/.*",), {"image": x, "label": y, "mask": mask}
        ),
        "dp_head_on_features": _dp_step(
            head, head_vars, (r"linear/.*",), {"image": feats, "label": y, "mask": mask}
        ),
        "dp_full": _dp_step(model, variables, (".*",), {"image": x, "label": y, "mask": mask}),
    }
    for fn in fns.values():  # compile
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    result = {
        "median_ms": med,
        "ratio_to_forward": {k: v / med["forward"] for k, v in med.items()},
        "repeats": args.repeats,
        "batch": 64,
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }
    lines = ["| step (ResNet-20, batch 64) | median ms | / forward |", "|---|---:|---:|"]
    for k in fns:
        lines.append(f"| {k} | {med[k]:.1f} | {result['ratio_to_forward'][k]:.2f} |")
    table = "\n".join(lines)
    print(table)
    (OUT / "head_cost.json").write_text(json.dumps(result, indent=2))
    (OUT / "head_cost.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
