"""``make bench``: dpft's DP step against its own non-private step and against its peers.

For each workload every step is timed in ONE process, interleaved round-robin after compilation
and warm-up, so machine noise hits all of them alike:

- dpft's non-private jitted step (``non_private``) and dpft's DP steps, one row per clipping
  rule x norm strategy (``vmap`` = `VmapNorms`; ``ghost`` = `dpft.privacy.ghost.GhostNorms`
  when that module imports) x convolution backend (a model's ``conv`` attribute, 'xla',
  'auto' or 'im2col', when the model has one; 'auto' is skipped with a note where it traces to
  the same program as 'xla'): ``dp_<clip>_<norm>[_<conv>]``;
- peers, when importable (``--peers``, the default): jax_privacy 2.x's ``clipped_grad`` +
  Gaussian privatizer + SGD on dpft's own flax model and parameters (jitted); PyTorch's
  non-private step, and Opacus' DP step with per-example gradients from hooks
  (``grad_sample_mode='hooks'``) and with ghost clipping (``'ghost'``), on the same
  architectures rebuilt in PyTorch (`bench.peers_torch`). A peer that does not import is
  skipped with a one-line note.

A timed sample is a burst of back-to-back calls of one step lasting at least ``--min-sample``
seconds (0.1 by default; one call for slower steps), reported per call, so that a
sub-millisecond step is timed as a training loop runs it rather than by the latency of one
call after an idle pause. Every DP step clips at 1.0 and adds noise with multiplier 1.0.
Reports median and spread (min-max) of repeats, ratios of every dpft DP row to dpft's
non-private step and to each peer, achieved GFLOP/s of the JAX steps (XLA's cost analysis of
the compiled step) against a measured matmul roof, and the issue's goals as a checklist.
Writes bench/results.json (raw times, versions, CPU) and bench/results.md.

    python -m bench.run [--repeats 5] [--only mnist_cnn,linear_head] [--peers | --no-peers]
                        [--clippers flat,per_layer,auto,global] [--min-sample 0.1]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft import optim
from dpft.host import tune_host_allocator
from dpft.models import count_params, get_model, model_kwargs
from dpft.privacy import clipping

OUT = pathlib.Path(__file__).parent
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LEARNING_RATE = 0.1
CLIPPERS = {
    "flat": clipping.FlatClip(CLIP_NORM),
    "per_layer": clipping.PerLayerClip(CLIP_NORM),
    "auto": clipping.AutoClip(),
    "global": clipping.GlobalClip(CLIP_NORM),
}
CONVS = ("xla", "auto", "im2col")  # values of a model's ``conv`` attribute, when it has one
PEER_ROWS = ("jax_privacy", "torch_non_private", "opacus_hooks", "opacus_ghost")

# The issue's goals, on the headline dpft DP step of each workload (see `headline`).
GOAL_MS = {
    "mnist_cnn": 40.0,
    "resnet20_frozen_bn": 170.0,
    "resnet20_group_norm": 170.0,
    "linear_head": 1.0,
}
GOAL_DP_OVER_NON_PRIVATE = 1.3


@dataclasses.dataclass
class Step:
    """One timed step: ``run()`` does one full training step and blocks until it is done."""

    run: Callable[[], object]
    framework: str  # 'dpft', 'jax_privacy', 'torch' or 'opacus'
    private: bool
    clipper: str | None = None
    norm: str | None = None
    conv: str | None = None
    flops: float = 0.0  # XLA's count for the compiled JAX step; 0 if unknown


# --------------------------------------------------------------------------------------------
# Workloads and the JAX steps
# --------------------------------------------------------------------------------------------


def workloads():
    """name -> (model name, model kwargs, input batch in dpft's layout, classes)."""
    rng = np.random.default_rng(0)

    def images(b, shape):
        return rng.normal(size=(b, *shape)).astype(np.float32)

    return {
        "mnist_cnn": ("sample_convnet", {}, images(256, (28, 28, 1)), 10),
        "resnet20_frozen_bn": ("resnet20", {"norm": "frozen_bn"}, images(64, (32, 32, 3)), 10),
        "resnet20_group_norm": ("resnet20", {"norm": "group_norm"}, images(64, (32, 32, 3)), 10),
        "linear_head": ("linear", {}, images(4096, (64,)), 10),
    }


def labels(n: int, classes: int) -> np.ndarray:
    return np.arange(n) % classes


def norm_strategies(notes: list[str]) -> dict[str, object]:
    """name -> dpft norm strategy: ``vmap`` always, ``ghost`` when dpft.privacy.ghost imports."""
    out: dict[str, object] = {"vmap": clipping.VmapNorms()}
    try:
        from dpft.privacy.ghost import GhostNorms
    except ImportError as e:
        notes.append(f"dpft ghost norms: skipped ({e})")
    else:
        out["ghost"] = GhostNorms()
    return out


def conv_options(model_name: str) -> tuple[str | None, ...]:
    """The ``conv`` backends to time if the model has a ``conv`` attribute, else ``(None,)``."""
    return CONVS if "conv" in model_kwargs(model_name) else (None,)


def _compile(fn, args, name: str, notes: list[str]):
    """``(run, flops)`` of ``jax.jit(fn)`` compiled once for ``args``; None if it fails."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # a configuration that does not compile is reported, not fatal
        notes.append(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best effort
        flops = 0.0
    return (lambda: jax.block_until_ready(compiled(*args))), flops


def _init_params(model, x):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype), variables
    )
    if "batch_stats" in variables:  # frozen BN statistics: a sane (positive) variance
        variables["batch_stats"] = jax.tree_util.tree_map(
            lambda v: jnp.abs(v) + 1.0, variables["batch_stats"]
        )
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    return params, rest


def _same_program(a, b, params, rest, x) -> bool:
    """Whether models ``a`` and ``b`` trace to the same forward program (jaxpr)."""
    variables = {"params": params, **rest}
    return str(jax.make_jaxpr(a.apply)(variables, x[:1])) == str(
        jax.make_jaxpr(b.apply)(variables, x[:1])
    )


def jax_steps(
    name: str,
    kwargs: dict,
    x: np.ndarray,
    classes: int,
    clippers: dict,
    norms: dict,
    peers: bool,
    notes: list[str],
    info: dict,
) -> dict[str, Step]:
    """dpft's non-private and DP steps (and jax_privacy's, if ``peers``) for one workload."""
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(labels(len(x), classes))}
    mask = jnp.ones(len(x))
    steps: dict[str, Step] = {}
    for conv in conv_options(name):
        suffix = f"_{conv}" if conv else ""
        try:
            model = get_model(name, classes, **kwargs, **({"conv": conv} if conv else {}))
        except ValueError as e:
            notes.append(f"conv={conv}: skipped ({e})")
            continue
        params, rest = _init_params(model, x)
        info["dpft_params"] = count_params(params)
        if conv == "auto" and _same_program(model, model.clone(conv="xla"), params, rest, x):
            notes.append("conv=auto: the same program as conv=xla for this model, not timed twice")
            continue

        def loss_one(p, example, key, model=model, rest=rest):
            logits = model.apply({"params": p, **rest}, example["x"][None])[0]
            return -jax.nn.log_softmax(logits)[example["y"]], ()

        def mean_loss(p, b, model=model, rest=rest):
            logits = model.apply({"params": p, **rest}, b["x"])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], 1))

        sgd = optax.sgd(LEARNING_RATE)

        def plain(p, s, b, mean_loss=mean_loss, sgd=sgd):
            u, s = sgd.update(jax.grad(mean_loss)(p, b), s, p)
            return optax.apply_updates(p, u), s

        built = _compile(plain, (params, sgd.init(params), batch), f"non_private{suffix}", notes)
        if built:
            steps[f"non_private{suffix}"] = Step(built[0], "dpft", False, conv=conv, flops=built[1])
        for cname, clipper in clippers.items():
            tx = optim.dp_sgd(
                LEARNING_RATE,
                noise_multiplier=NOISE_MULTIPLIER,
                l2_sensitivity=clipper.sensitivity(params),
                expected_batch_size=float(len(x)),
                key=0,
            )
            for nname, strategy in norms.items():
                grad_fn = clipping.clipped_grad(loss_one, clipper, norm_strategy=strategy)

                def dp(p, s, b, grad_fn=grad_fn, tx=tx):
                    g = grad_fn(p, b, mask, jax.random.PRNGKey(0)).grad_sum
                    u, s = tx.update(g, s, p)
                    return optax.apply_updates(p, u), s

                row = f"dp_{cname}_{nname}{suffix}"
                built = _compile(dp, (params, tx.init(params), batch), row, notes)
                if built:
                    steps[row] = Step(built[0], "dpft", True, cname, nname, conv, built[1])
        if peers and conv in (None, CONVS[0]):
            step = jax_privacy_step(model, params, rest, batch, notes)
            if step:
                steps["jax_privacy"] = step
    return steps


def jax_privacy_step(model, params, rest, batch, notes: list[str]) -> Step | None:
    """jax_privacy 2.x: ``clipped_grad`` (flat clip, vmap per example) + privatizer + SGD."""
    try:
        import jax_privacy
        from jax_privacy import noise_addition
    except ImportError as e:
        notes.append(f"jax_privacy: skipped (not importable: {e})")
        return None
    n = batch["x"].shape[0]

    def loss(p, x, y):  # x, y: one example with a leading axis of 1 (keep_batch_dim=True)
        logp = jax.nn.log_softmax(model.apply({"params": p, **rest}, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

    grad_fn = jax_privacy.clipped_grad(loss, l2_clip_norm=CLIP_NORM, batch_argnums=(1, 2))
    tx = optax.chain(
        noise_addition.gaussian_privatizer(
            stddev=NOISE_MULTIPLIER * CLIP_NORM, prng_key=jax.random.key(0)
        ),
        optax.scale(1.0 / n),
        optax.sgd(LEARNING_RATE),
    )

    def dp(p, s, b):
        u, s = tx.update(grad_fn(p, b["x"], b["y"]), s, p)
        return optax.apply_updates(p, u), s

    built = _compile(dp, (params, tx.init(params), batch), "jax_privacy", notes)
    if not built:
        return None
    return Step(built[0], "jax_privacy", True, "flat", "vmap", flops=built[1])


def torch_steps(
    name: str, kwargs: dict, x: np.ndarray, classes: int, notes: list[str], info: dict
) -> dict[str, Step]:
    """PyTorch's non-private step and Opacus' DP steps, if torch imports."""
    try:
        from bench import peers_torch
    except ImportError as e:
        notes.append(f"PyTorch/Opacus: skipped (not importable: {e})")
        return {}
    fns, tinfo = peers_torch.build_steps(name, kwargs, x, labels(len(x), classes), classes)
    info["torch_params"] = tinfo["torch_params"]
    for row, why in tinfo["skipped"].items():
        notes.append(f"{row}: skipped ({why[:200]})")
    out = {}
    for row, fn in fns.items():
        private = row.startswith("opacus")
        out[row] = Step(
            fn,
            "opacus" if private else "torch",
            private,
            "flat" if private else None,
            row.removeprefix("opacus_") if private else None,
        )
    return out


# --------------------------------------------------------------------------------------------
# Timing and reporting
# --------------------------------------------------------------------------------------------


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


def time_steps(
    steps: dict[str, Step],
    repeats: int,
    warmup: int = 2,
    settle: float = 0.0,
    min_sample: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per call of every step: ``warmup`` untimed rounds, then ``repeats`` timed rounds,
    each round timing every step in turn (round robin). Before each timed sample the process
    sleeps ``settle`` seconds, so that the worker threads of the previous step (XLA's pool,
    PyTorch's OpenMP team) are idle and do not compete with the next one for the cores.

    A sample is a burst of back-to-back calls of one step lasting at least ``min_sample``
    seconds (the count is fixed per step from its slowest warm-up call), divided by the count:
    a step of a millisecond is then timed as a training loop runs it, not by one call that also
    pays for waking the thread pool after the settle. Steps longer than ``min_sample`` are
    timed one call per sample."""
    slowest = {k: 0.0 for k in steps}
    for _ in range(warmup):
        for k, s in steps.items():
            slowest[k] = max(slowest[k], _timed(s.run))
    calls = {k: max(1, math.ceil(min_sample / max(t, 1e-6))) for k, t in slowest.items()}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, s in steps.items():
            if settle:
                time.sleep(settle)
            n = calls[k]
            times[k].append(_timed(lambda s=s, n=n: [s.run() for _ in range(n)]) / n)
    return times


def summarize(steps: dict[str, Step], times: dict[str, list[float]], roof: float) -> dict:
    """Per-row statistics and ratios (all ratios of medians)."""
    med = {k: float(np.median(ts)) for k, ts in times.items()}
    rows = {}
    for k, s in steps.items():
        ts = times[k]
        m = med[k]
        gflops = s.flops / m / 1e9 if s.flops else None
        r = {
            "framework": s.framework,
            "private": s.private,
            "clipper": s.clipper,
            "norm": s.norm,
            "conv": s.conv,
            "times_ms": [t * 1e3 for t in ts],
            "median_ms": m * 1e3,
            "min_ms": min(ts) * 1e3,
            "max_ms": max(ts) * 1e3,
            "flops": s.flops or None,
            "gflops": gflops,
            "roof_fraction": gflops / roof if gflops else None,
            "ratios": {},
        }
        # Each DP step against its own framework's non-private step.
        if s.framework == "dpft":
            own = f"non_private_{s.conv}" if s.conv else "non_private"
        elif s.framework == "opacus":
            own = "torch_non_private"
        elif s.framework == "jax_privacy":
            own = "non_private_xla" if "non_private_xla" in med else "non_private"
        else:
            own = None
        if s.private and own in med:
            r["ratios"]["non_private"] = m / med[own]
        if s.framework == "dpft" and s.private:
            for peer in PEER_ROWS:
                if peer in med:
                    r["ratios"][peer] = m / med[peer]
        rows[k] = r
    return rows


def headline(rows: dict) -> str | None:
    """The dpft DP row the goals are judged on: the fastest flat-clip row (the clipping that
    Opacus and jax_privacy do), or the fastest dpft DP row if there is no flat one."""
    dp = {k: r for k, r in rows.items() if r["framework"] == "dpft" and r["private"]}
    flat = {k: r for k, r in dp.items() if r["clipper"] == "flat"} or dp
    return min(flat, key=lambda k: flat[k]["median_ms"]) if flat else None


def goals(results: dict) -> list[tuple[bool | None, str]]:
    """``(met, text)`` for each goal of the issue; ``met`` is None when it was not measured."""
    out = []
    ws = results["workloads"]
    for wname, limit in GOAL_MS.items():
        w = ws.get(wname)
        h = w and w["headline"]
        if not h:
            out.append((None, f"{wname} DP step <= {limit:g} ms: not measured"))
            continue
        ms = w["rows"][h]["median_ms"]
        out.append((ms <= limit, f"{wname} DP step <= {limit:g} ms: {ms:.2f} ms ({h})"))
    for wname, w in ws.items():
        h = w["headline"]
        ratio = h and w["rows"][h]["ratios"].get("non_private")
        text = f"{wname} DP / non-private <= {GOAL_DP_OVER_NON_PRIVATE}"
        if ratio is None:
            out.append((None, f"{text}: not measured"))
        else:
            out.append((ratio <= GOAL_DP_OVER_NON_PRIVATE, f"{text}: {ratio:.2f} ({h})"))
    for wname, w in ws.items():
        h = w["headline"]
        ratio = h and w["rows"][h]["ratios"].get("jax_privacy")
        text = f"{wname} never slower than jax_privacy (DP / jax_privacy <= 1)"
        if ratio is None:
            out.append((None, f"{text}: not measured (jax_privacy not run)"))
        else:
            out.append((ratio <= 1.0, f"{text}: {ratio:.2f} ({h})"))
    return out


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    v = results["versions"]
    peer_versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "opacus", "jax_privacy") if k in v)
    lines = [
        f"# dpft bench ({results['device']}, {results['cpu']['model']}, "
        f"{results['cpu']['cores']} cores)",
        "",
        f"jax {v['jax']}, flax {v.get('flax', '?')}, optax {v.get('optax', '?')}"
        + (f"; peers: {peer_versions}" if peer_versions else "; peers: none")
        + f". Matmul roof {results['matmul_roof_gflops']:.0f} GFLOP/s. "
        f"{results['repeats']} interleaved repeats per step after {results['warmup']} warm-up "
        f"rounds, {results['settle_s']} s idle before each timed sample, a sample being "
        f"back-to-back calls of one step lasting >= {results.get('min_sample_s', 0)} s "
        "(time per call = sample / calls), host allocator "
        f"{'tuned (dpft.host, all rows)' if results.get('malloc_tuned') else 'glibc defaults'}, "
        "OMP_WAIT_POLICY="
        f"{results['omp_wait_policy']}; clip norm {CLIP_NORM}, noise multiplier "
        f"{NOISE_MULTIPLIER}. Load average at start / end: {results['loadavg_start']} / "
        f"{results['loadavg_end']} (shared cores make these numbers noisy).",
        "",
        "Rows `dp_<clip>_<norm>[_<conv>]` are dpft's DP steps; `non_private` is dpft's plain "
        "step. *DP / non-private* compares a DP step with its own framework's non-private step "
        "(Opacus with PyTorch, jax_privacy with dpft's); the other ratio columns compare a dpft "
        "DP row with each peer (< 1: dpft is faster). GFLOP/s and % roof: JAX steps only.",
        "",
        "## Goals",
        "",
    ]
    for met, text in goals(results):
        box = {True: "[x]", False: "[ ]", None: "[ ] (not measured)"}[met]
        lines.append(f"- {box} {text}")
    for wname, w in results["workloads"].items():
        lines += [
            "",
            f"## {wname}",
            "",
            f"Batch {w['batch']}, input {tuple(w['input_shape'])}, {w['dpft_params']:,} "
            f"parameters (PyTorch twin: {_fmt(w.get('torch_params'), ',')}); headline DP row: "
            f"`{w['headline']}`.",
            "",
            "| step | median ms | min-max ms | GFLOP/s | % roof | DP / non-private "
            "| DP / Opacus hooks | DP / Opacus ghost | DP / jax_privacy | DP / PyTorch |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k, r in w["rows"].items():
            rt = r["ratios"]
            roof = r["roof_fraction"]
            lines.append(
                f"| {k} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} "
                f"| {_fmt(r['gflops'], '.1f')} | {_fmt(roof and 100 * roof, '.1f')} "
                f"| {_fmt(rt.get('non_private'))} | {_fmt(rt.get('opacus_hooks'))} "
                f"| {_fmt(rt.get('opacus_ghost'))} | {_fmt(rt.get('jax_privacy'))} "
                f"| {_fmt(rt.get('torch_non_private'))} |"
            )
        for note in w["notes"]:
            lines.append(f"\nNote: {note}")
    for note in results["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def cpu_info() -> dict:
    model = platform.processor() or ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "model": model or platform.machine(),
        "cores": usable,
        "machine": platform.machine(),
        "system": platform.platform(),
    }


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def versions() -> dict:
    """Versions of Python, the JAX stack, and of every peer that this run imported."""
    out = {"python": sys.version.split()[0], "jax": jax.__version__}
    for mod in ("jaxlib", "flax", "optax", "numpy", "torch", "opacus", "jax_privacy"):
        if sys.modules.get(mod) is not None or mod in ("jaxlib", "flax", "optax", "numpy"):
            try:
                out[mod] = importlib.import_module(mod).__version__
            except (ImportError, AttributeError):
                pass
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
    return out


def peers_available() -> dict[str, bool]:
    def importable(name):
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            return False

    return {m: importable(m) for m in ("torch", "opacus", "jax_privacy")}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--settle", type=float, default=0.01, help="idle seconds before each timed sample"
    )
    ap.add_argument(
        "--min-sample",
        type=float,
        default=0.1,
        help="seconds of back-to-back calls per timed sample (shorter steps are repeated)",
    )
    ap.add_argument("--only", default="", help="comma-separated workloads (default: all)")
    ap.add_argument(
        "--clippers", default=",".join(CLIPPERS), help="comma-separated dpft clipping rules"
    )
    ap.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time PyTorch, Opacus and jax_privacy too when they import (default: on)",
    )
    ap.add_argument(
        "--tune-malloc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dpft.host.tune_host_allocator() for the whole process, peers included (default: on)",
    )
    args = ap.parse_args(argv)
    malloc_tuned = bool(args.tune_malloc) and tune_host_allocator()
    only = [w for w in args.only.split(",") if w]
    unknown = sorted(set(only) - set(workloads()))
    if unknown:
        ap.error(f"unknown workloads {unknown}: choose from {list(workloads())}")
    clippers = {c: CLIPPERS[c] for c in args.clippers.split(",") if c}
    if set(args.clippers.split(",")) - set(CLIPPERS) - {""}:
        ap.error(f"--clippers: choose from {list(CLIPPERS)}")

    # Idle OpenMP threads must sleep, not spin: PyTorch and XLA share the cores of ONE process
    # here, and spinning threads of one framework slow the other one down (by 10x and more for
    # PyTorch on 2 shared cores). Must be set before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    notes: list[str] = []
    use = dict.fromkeys(("torch", "opacus", "jax_privacy"), False)
    if args.peers:
        use = peers_available()
        missing = [m for m, ok in use.items() if not ok]
        if missing:
            msg = f"peers not importable, skipped: {', '.join(missing)} (run `make bench-peers`)"
            print(msg, flush=True)
            notes.append(msg)
    norms = norm_strategies(notes)
    loadavg_start = _loadavg()
    roof = matmul_roof()
    results = {
        "device": jax.devices()[0].device_kind,
        "cpu": cpu_info(),
        "versions": {},
        "matmul_roof_gflops": roof,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "settle_s": args.settle,
        "malloc_tuned": malloc_tuned,
        "min_sample_s": args.min_sample,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "peers": {m: ok for m, ok in use.items()},
        "loadavg_start": loadavg_start,
        "notes": notes,
        "workloads": {},
    }
    for wname, (mname, kwargs, x, classes) in workloads().items():
        if only and wname not in only:
            continue
        wnotes: list[str] = []
        info: dict = {}
        steps = jax_steps(
            mname, kwargs, x, classes, clippers, norms, use["jax_privacy"], wnotes, info
        )
        if use["torch"]:
            steps.update(torch_steps(mname, kwargs, x, classes, wnotes, info))
        print(f"{wname}: timing {len(steps)} steps", flush=True)
        times = time_steps(steps, args.repeats, args.warmup, args.settle, args.min_sample)
        rows = summarize(steps, times, roof)
        results["workloads"][wname] = {
            "model": mname,
            "model_kwargs": kwargs,
            "batch": len(x),
            "input_shape": list(x.shape[1:]),
            "dpft_params": info.get("dpft_params"),
            "torch_params": info.get("torch_params"),
            "headline": headline(rows),
            "rows": rows,
            "notes": wnotes,
        }
        print(wname, {k: round(r["median_ms"], 2) for k, r in rows.items()}, flush=True)
        write(results)  # after every workload, so a long run that is cut short keeps its rows
        # Free this workload's compiled programs: XLA:CPU maps each one's code into memory, and
        # dozens of ResNet variants in one process exhausted vm.max_map_count (65530) here
        # ("LLVM compilation error: Cannot allocate memory") in the GroupNorm workload.
        del steps, times
        jax.clear_caches()
        gc.collect()
    print(write(results))


def write(results: dict) -> str:
    """Writes bench/results.json and bench/results.md; returns the markdown."""
    results["versions"] = versions()
    results["loadavg_end"] = _loadavg()
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (OUT / "results.md").write_text(md)
    return md


if __name__ == "__main__":
    main()
