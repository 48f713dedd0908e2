"""The report of ``bench.run``: per-row statistics and ratios (`summarize`), the headline DP row
of a workload, the issue's goals as a checklist, and bench/results.md (`markdown`).
"""

from __future__ import annotations

import numpy as np

from bench.steps import CLIP_NORM, NOISE_MULTIPLIER, Step

PEER_ROWS = ("jax_privacy", "torch_non_private", "opacus_hooks", "opacus_ghost")

# The issue's goals, on the headline dpft DP step of each workload (see `headline`).
GOAL_MS = {
    "mnist_cnn": 40.0,
    "resnet20_frozen_bn": 170.0,
    "resnet20_group_norm": 170.0,
    "linear_head": 1.0,
}
GOAL_DP_OVER_NON_PRIVATE = 1.3


def summarize(steps: dict[str, Step], times: dict[str, list[float]], roof: float) -> dict:
    """Per-row statistics and ratios (all ratios of medians)."""
    med = {k: float(np.median(ts)) for k, ts in times.items()}
    plain = [k for k, s in steps.items() if s.framework == "dpft" and not s.private]
    fastest_plain = min(plain, key=med.__getitem__) if plain else None
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
        if s.private and s.framework == "dpft" and fastest_plain:
            r["ratios"]["fastest_non_private"] = m / med[fastest_plain]
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
        # Against dpft's fastest non-private step (of any convolution), not only the headline
        # row's own: the DP step costs what it costs over the best plain step a user could run.
        h = w["headline"]
        ratio = h and w["rows"][h]["ratios"].get("fastest_non_private")
        text = f"{wname} DP / fastest non-private <= {GOAL_DP_OVER_NON_PRIVATE}"
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
    peer_versions = ", ".join(
        f"{k} {v[k]}" for k in ("torch", "timm", "opacus", "jax_privacy") if k in v
    )
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
        "(Opacus with PyTorch, jax_privacy with dpft's; a dpft row with the non-private step of "
        "its convolution), *DP / fastest* a dpft DP step with dpft's fastest non-private step "
        "(the ratio goal uses it); the other ratio columns compare a dpft DP row with each peer "
        "(< 1: dpft is faster). GFLOP/s and % roof: JAX steps only.",
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
            f"parameters (PyTorch: {w.get('torch_model') or 'its twin'}, "
            f"{_fmt(w.get('torch_params'), ',')}); headline DP row: "
            f"`{w['headline']}`.",
            "",
            "| step | median ms | min-max ms | GFLOP/s | % roof | DP / non-private "
            "| DP / fastest | DP / Opacus hooks | DP / Opacus ghost | DP / jax_privacy "
            "| DP / PyTorch |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k, r in w["rows"].items():
            rt = r["ratios"]
            roof = r["roof_fraction"]
            lines.append(
                f"| {k} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} "
                f"| {_fmt(r['gflops'], '.1f')} | {_fmt(roof and 100 * roof, '.1f')} "
                f"| {_fmt(rt.get('non_private'))} | {_fmt(rt.get('fastest_non_private'))} "
                f"| {_fmt(rt.get('opacus_hooks'))} "
                f"| {_fmt(rt.get('opacus_ghost'))} | {_fmt(rt.get('jax_privacy'))} "
                f"| {_fmt(rt.get('torch_non_private'))} |"
            )
        for note in w["notes"]:
            lines.append(f"\nNote: {note}")
    for note in results["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"
