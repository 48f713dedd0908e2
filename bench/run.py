"""``make bench``: dpft's DP step against its own non-private step, measured side by side.

For each workload the non-private jitted step and the DP step of every clipping mode are timed
in ONE process, interleaved round-robin after compilation, so machine noise hits all of them
alike. Reports median and spread (min-max) of repeats, the DP / non-private ratio, and achieved
GFLOP/s (XLA's cost analysis of the compiled step) against a measured matmul roof.
Writes bench/results.json and bench/results.md. Peers (Opacus, jax_privacy) are issue 5's work.

    python -m bench.run [--repeats 5] [--only mnist_cnn,linear_head]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft import optim
from dpft.models import get_model
from dpft.privacy import clipping

OUT = pathlib.Path(__file__).parent
CLIPPERS = {
    "flat": clipping.FlatClip(1.0),
    "per_layer": clipping.PerLayerClip(1.0),
    "auto": clipping.AutoClip(),
    "global": clipping.GlobalClip(1.0),
}


def workloads():
    rng = np.random.default_rng(0)

    def images(b, shape):
        return rng.normal(size=(b, *shape)).astype(np.float32)

    return {
        "mnist_cnn": ("sample_convnet", {}, images(256, (28, 28, 1)), 10),
        "resnet20_frozen_bn": ("resnet20", {"norm": "frozen_bn"}, images(64, (32, 32, 3)), 10),
        "resnet20_group_norm": ("resnet20", {"norm": "group_norm"}, images(64, (32, 32, 3)), 10),
        "linear_head": ("linear", {}, images(4096, (64,)), 10),
    }


def build(name, kwargs, x, classes):
    model = get_model(name, classes, **kwargs)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(np.random.default_rng(1).normal(0, 0.05, s.shape), s.dtype), variables
    )
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    y = jnp.asarray(np.arange(len(x)) % classes)

    def loss_one(p, example, key):
        logits = model.apply({"params": p, **rest}, example["x"][None])[0]
        return -jax.nn.log_softmax(logits)[example["y"]], ()

    def mean_loss(p, batch):
        logits = model.apply({"params": p, **rest}, batch["x"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1))

    batch = {"x": jnp.asarray(x), "y": y}
    mask = jnp.ones(len(x))
    sgd = optax.sgd(0.1)

    def plain(p, s, b):
        u, s = sgd.update(jax.grad(mean_loss)(p, b), s, p)
        return optax.apply_updates(p, u), s

    steps = {"non_private": (jax.jit(plain), (params, sgd.init(params), batch))}
    for cname, clipper in CLIPPERS.items():
        tx = optim.dp_sgd(
            0.1,
            noise_multiplier=1.0,
            l2_sensitivity=clipper.sensitivity(params),
            expected_batch_size=float(len(x)),
            key=0,
        )
        grad_fn = clipping.clipped_grad(loss_one, clipper)

        def dp(p, s, b, grad_fn=grad_fn, tx=tx):
            g = grad_fn(p, b, mask, jax.random.PRNGKey(0)).grad_sum
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        steps[f"dp_{cname}"] = (jax.jit(dp), (params, tx.init(params), batch))
    return steps


def matmul_roof(n=2048, repeats=5):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops(jitted, args):
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best effort
        return 0.0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="")
    args = ap.parse_args(argv)
    roof = matmul_roof()
    results = {
        "device": jax.devices()[0].device_kind,
        "cpu": platform.processor(),
        "jax": jax.__version__,
        "matmul_roof_gflops": roof,
        "workloads": {},
    }
    for wname, spec in workloads().items():
        if args.only and wname not in args.only.split(","):
            continue
        steps = build(*spec)
        for fn, a in steps.values():  # compile and warm up
            jax.block_until_ready(fn(*a))
        times = {k: [] for k in steps}
        for _ in range(args.repeats):  # interleaved round robin
            for k, (fn, a) in steps.items():
                times[k].append(_timed(lambda fn=fn, a=a: jax.block_until_ready(fn(*a))))
        base = np.median(times["non_private"])
        rows = {}
        for k, ts in times.items():
            med = float(np.median(ts))
            fl = flops(*steps[k])
            rows[k] = {
                "median_ms": med * 1e3,
                "min_ms": min(ts) * 1e3,
                "max_ms": max(ts) * 1e3,
                "ratio_to_non_private": med / base,
                "gflops": fl / med / 1e9 if fl else None,
            }
        results["workloads"][wname] = rows
        print(wname, {k: round(v["median_ms"], 1) for k, v in rows.items()}, flush=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# dpft bench ({results['device']}, jax {results['jax']}, matmul roof {roof:.0f} GFLOP/s)",
        "",
        "| workload | step | median ms | min-max ms | ratio vs non-private | GFLOP/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for wname, rows in results["workloads"].items():
        for k, r in rows.items():
            g = f"{r['gflops']:.1f}" if r["gflops"] else "-"
            lines.append(
                f"| {wname} | {k} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-"
                f"{r['max_ms']:.1f} | {r['ratio_to_non_private']:.2f} | {g} |"
            )
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
