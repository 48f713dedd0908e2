"""Rounds per second of the vectorized federated driver vs a Python loop over the same clients.

Both run the SAME local update (`dpft.federated.driver.make_local_update`: K steps of
`dpft.train.step.make_train_step`, example-level DP-SGD with the client's own keys) on the same
round inputs, then the same server aggregation (weighted mean, server SGD with momentum):

* ``vectorized``: `driver.make_round`, one jit with ``jax.vmap`` over the client slots;
* ``group=G``: the same round with ``client_group=G`` (groups of G clients vmapped, the groups
  one after another inside the same jit with ``lax.map``);
* ``loop``: one jitted local update called from Python for each client, then one jitted
  aggregation of the stacked updates (how a Flower/Opacus simulation typically runs clients).

Timed in one process, after compilation, interleaved round-robin (median of repeats), for 10
and 100 clients per round, on the linear head over 64-d features (head tuning on cached
features) and on the small CNN (`sample_convnet`, 28x28 images). Synthetic data: speed only.

    python -m bench.federated [--repeats 5] [--models head,cnn] [--groups 1,10]
        [--out bench/federated_results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpft import models
from dpft.federated import driver
from dpft.federated import server as srv
from dpft.host import tune_host_allocator
from dpft.train.step import cross_entropy_loss, partition

OUT = pathlib.Path(__file__).parent / "federated_results.json"
MODELS = {
    # name: (registry model, example shape, examples per client)
    "head": ("linear", (64,), 64),
    "cnn": ("sample_convnet", (28, 28, 1), 32),
}


def _setup(model_name: str, clients: int, local_steps: int):
    """Model, params, config, plan, round inputs for ``clients`` clients of synthetic data."""
    registry, shape, per_client = MODELS[model_name]
    rng = np.random.default_rng(0)
    n = clients * per_client
    data = {
        "image": rng.normal(size=(n, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }
    model = models.get_model(registry, 10)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(data["image"][:1]))
    params, frozen = partition(variables, (".*",))
    parts = [np.arange(i * per_client, (i + 1) * per_client) for i in range(clients)]
    config = driver.FedConfig(
        rounds=1,
        client_rate=1.0,
        local_steps=local_steps,
        local_rate=1.0,
        local_lr=0.1,
        server_optimizer="momentum",
        dp="example",
        noise_multiplier=1.0,
        example_clip=1.0,
    )
    plan = driver.make_plan(config, [len(p) for p in parts])
    inputs = driver.round_inputs(config, plan, data, parts, 0)
    return model, params, frozen, config, plan, inputs


def _runners(model, params, frozen, config, plan, inputs, groups=()):
    """{name: round}: each round returns the next server state when called."""
    loss = cross_entropy_loss(model.apply)
    tx = srv.make_server_optimizer("momentum", 1.0)
    state = srv.ServerState(jnp.zeros([], jnp.int32), params, tx.init(params))
    round_fn = driver.make_round(loss, config, plan, tx)
    local = jax.jit(driver.make_local_update(loss, config, plan))

    @jax.jit
    def aggregate(state, updates, cmask, weights):
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *updates)
        mean, _ = srv.weighted_mean(stacked, cmask, weights)
        return srv.server_apply(tx, state, mean)

    dev = jax.device_put(inputs)
    per_client = dev._replace(seed=None)  # the round seed is not per client
    slices = [jax.tree_util.tree_map(lambda a, s=s: a[s], per_client) for s in range(plan.slots)]
    keys = [driver.client_key(config.seed, 0, int(c)) for c in inputs.client_ids]

    def whole(fn):
        def run():
            new, _ = fn(state, frozen, dev)
            return jax.block_until_ready(new.params)

        return run

    fns = {"vectorized": whole(round_fn)}
    for g in groups:
        grouped = dataclasses.replace(config, client_group=g)
        fns[f"group={g}"] = whole(driver.make_round(loss, grouped, plan, tx))

    def loop():
        ups = []
        for s, key in zip(slices, keys, strict=True):
            up, _ = local(state.params, frozen, s.batch, s.mask, s.inv_expected, key)
            ups.append(up)
        new = aggregate(state, ups, dev.client_mask, dev.weights)
        return jax.block_until_ready(new.params)

    fns["loop"] = loop
    return fns


def bench_one(model_name: str, clients: int, local_steps: int, repeats: int, groups=()) -> dict:
    model, params, frozen, config, plan, inputs = _setup(model_name, clients, local_steps)
    fns = _runners(model, params, frozen, config, plan, inputs, groups)
    compile_s = {}
    for name, fn in fns.items():  # compile (and warm) all first
        t0 = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved round-robin
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "model": model_name,
        "clients_per_round": clients,
        "examples_per_client": MODELS[model_name][2],
        "local_steps": local_steps,
        "vectorized_rounds_per_s": 1.0 / med["vectorized"],
        "loop_rounds_per_s": 1.0 / med["loop"],
        "speedup": med["loop"] / med["vectorized"],
        "grouped_rounds_per_s": {n[6:]: 1.0 / t for n, t in med.items() if n.startswith("group=")},
        "first_call_seconds": compile_s,
        "round_seconds": times,
    }


def table(rows: list[dict]) -> str:
    groups = sorted({g for r in rows for g in r.get("grouped_rounds_per_s", {})}, key=int)
    lines = [
        "| model | clients/round | examples/client | K | vectorized rounds/s | "
        + "".join(f"group={g} rounds/s | " for g in groups)
        + "loop rounds/s | vectorized / loop | best grouped / loop |",
        "|---|---:|---:|---:|---:|" + "---:|" * (len(groups) + 3),
    ]
    for r in rows:
        gr = r.get("grouped_rounds_per_s", {})
        cells = "".join(f"{gr[g]:.2f} | " if g in gr else "- | " for g in groups)
        best = max(gr.values(), default=float("nan")) / r["loop_rounds_per_s"]
        lines.append(
            f"| {r['model']} | {r['clients_per_round']} | {r['examples_per_client']} | "
            f"{r['local_steps']} | {r['vectorized_rounds_per_s']:.2f} | {cells}"
            f"{r['loop_rounds_per_s']:.2f} | {r['speedup']:.2f}x | {best:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", default="head,cnn")
    p.add_argument("--clients", default="10,100")
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--groups", default="1,10", help="client_group values to time ('' for none)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    tune_host_allocator()  # as `python -m dpft` does
    rows = []
    for name in args.models.split(","):
        for clients in (int(c) for c in args.clients.split(",")):
            groups = [g for g in (int(x) for x in args.groups.split(",") if x) if g < clients]
            rows.append(bench_one(name, clients, args.local_steps, args.repeats, groups))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "num_devices": jax.device_count(),
        "repeats": args.repeats,
        "dp": "example level: local DP-SGD, flat clip 1, noise multiplier 1",
        "rows": rows,
    }
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(rows))
    return result


if __name__ == "__main__":
    main()
