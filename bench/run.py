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
  architectures in PyTorch (`bench.peers_torch`: timm's own ViT when timm imports, rebuilds
  otherwise; each PyTorch row and the workload's ``torch_model`` name the model). A peer that
  does not import is skipped with a one-line note.

A timed sample is a burst of back-to-back calls of one step lasting at least ``--min-sample``
seconds (0.1 by default; one call for slower steps), reported per call, so that a
sub-millisecond step is timed as a training loop runs it rather than by the latency of one
call after an idle pause. Every DP step clips at 1.0 and adds noise with multiplier 1.0.
Reports median and spread (min-max) of repeats, ratios of every dpft DP row to dpft's
non-private step and to each peer, achieved GFLOP/s of the JAX steps (XLA's cost analysis of
the compiled step) against a measured matmul roof, and the issue's goals as a checklist.
Writes bench/results.json (raw times, versions, CPU) and bench/results.md (``--out`` another
stem), with only this run's workloads in them.

A workload may be restricted (`bench.steps.LIMITS`): ``vit_ti16`` (ViT-Ti/16 at 224 px, batch
8) times only the flat clipper with ghost and vmap norms, dpft's non-private step, PyTorch's
and Opacus ghost clipping, since each ViT step on a few CPU cores takes seconds.

This module times the steps, records the machine and runs the CLI; the workloads and their
steps are built in `bench.steps`, and the report is made in `bench.report`.

    python -m bench.run [--repeats 5] [--only mnist_cnn,linear_head] [--peers | --no-peers]
                        [--clippers flat,per_layer,auto,global] [--min-sample 0.1]
                        [--out results]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp

from bench.report import headline, markdown, summarize
from bench.steps import (
    CLIPPERS,
    LIMITS,
    Limits,
    Step,
    jax_steps,
    norm_strategies,
    torch_steps,
    workloads,
)
from dpft.host import tune_host_allocator

OUT = pathlib.Path(__file__).parent
MODEL_NOTE = "PyTorch/Opacus model: "  # as bench.peers_torch.MODEL_NOTE (importing it needs torch)


# --------------------------------------------------------------------------------------------
# Timing
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
    for mod in ("jaxlib", "flax", "optax", "numpy", "torch", "timm", "opacus", "jax_privacy"):
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
    ap.add_argument(
        "--out",
        default="results",
        help="file stem of the results under bench/ (default: results -> results.json, .md); "
        "they are replaced, so a run of some workloads (--only) may want its own",
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
        limits = LIMITS.get(wname, Limits())
        if limits.describe():
            wnotes.append(limits.describe())
        wclippers, wnorms = limits.apply(clippers, norms)
        jp = use["jax_privacy"] and limits.jax_privacy
        steps = jax_steps(mname, kwargs, x, classes, wclippers, wnorms, jp, wnotes, info)
        if use["torch"]:
            steps.update(torch_steps(mname, kwargs, x, classes, wnotes, info, limits.opacus_modes))
            # bench.peers_torch names the model it built in a note beginning with MODEL_NOTE
            named = [n for n in wnotes if n.startswith(MODEL_NOTE)]
            info["torch_model"] = named[-1].removeprefix(MODEL_NOTE) if named else None
            if info.get("torch_params") != info.get("dpft_params"):
                msg = (
                    f"{wname}: PyTorch model has {info.get('torch_params')} trainable "
                    f"parameters, dpft's {info.get('dpft_params')}"
                )
                print(msg, flush=True)
                wnotes.append(msg)
        print(f"{wname}: timing {len(steps)} steps", flush=True)
        times = time_steps(steps, args.repeats, args.warmup, args.settle, args.min_sample)
        rows = summarize(steps, times, roof)
        for r in rows.values():  # which PyTorch model (timm's, or a twin) the peer rows ran
            if r["framework"] in ("torch", "opacus"):
                r["model"] = info.get("torch_model")
        results["workloads"][wname] = {
            "model": mname,
            "model_kwargs": kwargs,
            "batch": len(x),
            "input_shape": list(x.shape[1:]),
            "dpft_params": info.get("dpft_params"),
            "torch_params": info.get("torch_params"),
            "torch_model": info.get("torch_model"),
            "headline": headline(rows),
            "rows": rows,
            "notes": wnotes,
        }
        print(wname, {k: round(r["median_ms"], 2) for k, r in rows.items()}, flush=True)
        # after every workload, so a long run that is cut short keeps its rows
        write(results, args.out)
        # Free this workload's compiled programs: XLA:CPU maps each one's code into memory, and
        # dozens of ResNet variants in one process exhausted vm.max_map_count (65530) here
        # ("LLVM compilation error: Cannot allocate memory") in the GroupNorm workload.
        del steps, times
        jax.clear_caches()
        gc.collect()
    print(write(results, args.out))


def write(results: dict, stem: str = "results") -> str:
    """Writes bench/<stem>.json and bench/<stem>.md (all of them, replacing the files: only the
    workloads of this run are in them); returns the markdown."""
    results["versions"] = versions()
    results["loadavg_end"] = _loadavg()
    (OUT / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (OUT / f"{stem}.md").write_text(md)
    return md


if __name__ == "__main__":
    main()
