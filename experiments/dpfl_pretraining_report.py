"""Tables, verdicts and the plot of `experiments.dpfl_pretraining` (from its JSON rows).

``write(state, json_path)`` writes ``dpfl_pretraining.table.md`` (the generated tables and
verdicts), ``dpfl_pretraining.png``, and in ``dpfl_pretraining.md`` regenerates the blocks
between ``<!-- coverage -->`` / ``<!-- results -->`` markers, keeping the prose around them.
``python -m experiments.dpfl_pretraining_report`` redraws all of them from the JSON.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import statistics

OUT = pathlib.Path(__file__).parent / "results"
PRETRAINED = ("HT-R20", "HT-MNV2", "FT-R20", "FT-MNV2")
SCRATCH = ("ST-CNN", "ST-R20")
ORDER = ("HT-R20", "HT-MNV2", "FT-R20", "FT-MNV2", "ST-CNN", "ST-R20")
COLORS = {
    "HT-R20": "tab:blue",
    "HT-MNV2": "tab:purple",
    "FT-R20": "tab:cyan",
    "FT-MNV2": "tab:red",
    "ST-CNN": "tab:green",
    "ST-R20": "tab:olive",
}


def current(state: dict) -> list[dict]:
    """The test rows at each cell's tuned learning rate (rows at a superseded choice dropped)."""
    lr = {tuple(json.loads(k)): t["local_lr"] for k, t in state["tuned"].items()}
    return [
        r
        for r in state["rows"]
        if r["split"] == "test"
        and lr.get((r["arm"], r["level"], r["epsilon_target"], r["rounds"])) == r["local_lr"]
    ]


def summarize(rows: list[dict]) -> dict:
    """(arm, level, eps, rounds) -> dict(mean, std, n, diverged, epsilon, lr) of test rows."""
    groups: dict = {}
    for r in rows:
        if r["split"] == "test":
            k = (r["arm"], r["level"], r["epsilon_target"], r["rounds"])
            groups.setdefault(k, []).append(r)
    out = {}
    for k, rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        eps = [r["epsilon"] for r in rs if r["epsilon"] is not None]
        out[k] = {
            "mean": statistics.mean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "n": len(acc),
            "diverged": sum(bool(r["diverged"]) for r in rs),
            "epsilon": max(eps) if eps else None,
            "lr": rs[0]["local_lr"],
        }
    return out


def welch(a: dict, b: dict) -> tuple[float, bool]:
    """(mean difference a - b, significant at 5% two-sided by Welch's t over the seeds)."""
    from scipy import stats

    d = a["mean"] - b["mean"]
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    se = math.sqrt(va + vb)
    if a["n"] < 2 or b["n"] < 2:
        return d, False
    if se == 0:
        return d, d != 0
    df = (va + vb) ** 2 / ((va**2) / (a["n"] - 1) + (vb**2) / (b["n"] - 1)) if va + vb else 1
    return d, abs(d) / se > stats.t.ppf(0.975, max(df, 1.0))


def _cell(m) -> str:
    if m is None:
        return "-"
    flag = f" ({m['diverged']} div.)" if m["diverged"] else ""
    flag += f" (n={m['n']})" if m["n"] < 3 else ""
    return f"{m['mean']:.3f} +- {m['std']:.3f}{flag}"


def tables(state: dict, stats: dict) -> list[str]:
    rounds_all = sorted({k[3] for k in stats})
    cols = [("example", 1.0), ("example", 8.0), ("client", 1.0), ("client", 8.0), ("none", None)]
    cols = [c for c in cols if any(k[1:3] == c for k in stats)]
    head = ["non-private" if c[1] is None else f"{c[0]} eps={c[1]:g}" for c in cols]
    lines = []
    for R in rounds_all:
        lines += [
            f"**{R} rounds** (test accuracy, mean +- sample std over 3 seeds; "
            "'div.': diverged seeds)",
            "",
            "| arm | " + " | ".join(head) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for arm in ORDER:
            cells = [_cell(stats.get((arm, lv, e, R))) for lv, e in cols]
            if any(c != "-" for c in cells):
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "**Tuned local learning rates** (validation accuracy at seed 0; * = best at a grid edge "
        "after widening)",
        "",
        "| arm | level | eps | rounds | grid | chosen | val acc |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for key, t in sorted(state["tuned"].items(), key=lambda kv: _order(json.loads(kv[0]))):
        arm, level, eps, R = json.loads(key)
        grid = ", ".join(f"{g:g}" for g in t["grid"])
        star = "*" if t["at_edge"] else ""
        e = "-" if eps is None else f"{eps:g}"
        lines.append(
            f"| {arm} | {level} | {e} | {R} | {grid} | {t['local_lr']:g}{star} | "
            f"{t['val_accuracy']:.3f} |"
        )
    return lines


def _order(k):
    arm, level, eps, R = k
    return (ORDER.index(arm), R, level, eps or 0)


def _best(stats, arms, level, eps, R):
    got = [(stats[(a, level, eps, R)], a) for a in arms if (a, level, eps, R) in stats]
    return max(got, key=lambda x: x[0]["mean"]) if got else (None, None)


def verdicts(stats: dict) -> list[tuple[str, str, str]]:
    """(finding, verdict, reason with the numbers) for the seed findings."""
    out = []
    rounds_all = sorted({k[3] for k in stats})
    # 1. pre-training beats scratch, and 2. the gap vs epsilon
    wins, losses, ties, gaps = [], [], [], {}
    for R in rounds_all:
        for eps in (1.0, 8.0, None):
            level = "example" if eps is not None else "none"
            p, pa = _best(stats, PRETRAINED, level, eps, R)
            s, sa = _best(stats, SCRATCH, level, eps, R)
            if p is None or s is None:
                continue
            d, sig = welch(p, s)
            gaps[(R, eps)] = (p, s)
            where = f"eps={eps:g}" if eps else "non-private"
            txt = f"R={R} {where}: {pa} {p['mean']:.3f} vs {sa} {s['mean']:.3f}"
            (wins if sig and d > 0 else losses if sig else ties).append(txt)
    dp_cells = [w for w in wins + losses + ties if "non-private" not in w]
    dp_wins = [w for w in wins if "non-private" not in w]
    dp_losses = [w for w in losses if "non-private" not in w]
    v = (
        "confirmed"
        if dp_cells and len(dp_wins) == len(dp_cells)
        else ("refuted" if dp_losses else "inconclusive")
    )
    dp_ties = [t for t in ties if "non-private" not in t]
    nonpriv = [w for w in wins + losses + ties if "non-private" in w]
    out.append(
        (
            "Pre-training beats scratch at every epsilon (best pre-trained vs best scratch arm, "
            "example level, every rounds value)",
            v,
            f"significantly better in {len(dp_wins)}/{len(dp_cells)} DP cells"
            + (f"; worse in {'; '.join(dp_losses)}" if dp_losses else "")
            + (f"; not significant in {'; '.join(dp_ties)}" if dp_ties else "")
            + ". Better: "
            + "; ".join(dp_wins)
            + ". Non-private controls: "
            + "; ".join(nonpriv),
        )
    )
    # 2. gap grows as epsilon shrinks: gap(eps=1) - gap(eps=8), and gap(eps=8) - gap(non-private)
    parts, grow, shrink = [], 0, 0
    for R in rounds_all:
        g = {e: gaps.get((R, e)) for e in (1.0, 8.0, None)}
        if g[1.0] is None or g[8.0] is None:
            continue
        gap = {e: (x[0]["mean"] - x[1]["mean"]) for e, x in g.items() if x is not None}
        se = {
            e: math.sqrt(x[0]["std"] ** 2 / x[0]["n"] + x[1]["std"] ** 2 / x[1]["n"])
            for e, x in g.items()
            if x is not None
        }
        dd = gap[1.0] - gap[8.0]
        sdd = math.sqrt(se[1.0] ** 2 + se[8.0] ** 2)
        grow += dd > 2 * sdd
        shrink += dd < -2 * sdd
        parts.append(
            f"R={R}: gap eps=1 {gap[1.0]:+.3f}, eps=8 {gap[8.0]:+.3f}"
            + (f", non-private {gap[None]:+.3f}" if None in gap else "")
        )
    n = len(parts)
    v = "confirmed" if n and grow == n else "refuted" if n and shrink == n else "inconclusive"
    out.append(
        (
            "The gap (best pre-trained - best scratch) grows as epsilon shrinks",
            v,
            f"gap(eps=1) > gap(eps=8) by > 2 SE in {grow}/{n} rounds values, smaller in "
            f"{shrink}/{n}: " + "; ".join(parts),
        )
    )
    # 3. ImageNet MobileNetV2 vs CIFAR-10 ResNet-20, same tuning depth (HT vs HT, FT vs FT)
    better, worse, same = [], [], []
    for (arm, level, eps, R), m in stats.items():
        if not arm.endswith("MNV2"):
            continue
        o = stats.get((arm.replace("MNV2", "R20"), level, eps, R))
        if o is None:
            continue
        d, sig = welch(m, o)
        (better if sig and d > 0 else worse if sig else same).append(
            f"{arm[:2]} {level} {eps or ''} R={R}: {d:+.3f}"
        )
    tot = len(better) + len(worse) + len(same)
    v = "inconclusive"
    if tot and not worse and 2 * len(better) >= tot:
        v = "confirmed"
    elif tot and not better and 2 * len(worse) >= tot:
        v = "refuted"
    out.append(
        (
            "ImageNet MobileNetV2 transfers better than CIFAR-10 ResNet-20",
            v,
            f"MNV2 significantly better in {len(better)}/{tot} matched cells, worse in "
            f"{len(worse)}, n.s. in {len(same)}"
            + (f" (worse: {'; '.join(worse)})" if worse else "")
            + (f" (n.s.: {'; '.join(same)})" if same else ""),
        )
    )
    # 4. more rounds at fixed epsilon: max rounds vs 3 rounds, per DP arm / level / eps
    up, down, flat = [], [], []
    for (arm, level, eps, R), m in stats.items():
        if eps is None or R != 3:
            continue
        rs = sorted(k[3] for k in stats if k[:3] == (arm, level, eps))
        if rs[-1] == 3:
            continue
        d, sig = welch(stats[(arm, level, eps, rs[-1])], m)
        (up if sig and d > 0 else down if sig else flat).append(
            f"{arm} {level} eps={eps:g} R=3->{rs[-1]}: {d:+.3f}"
        )
    for e in (8.0, 1.0):
        u, d_, f = ([x for x in group if f"eps={e:g} " in x] for group in (up, down, flat))
        tot = len(u) + len(d_) + len(f)
        v = "inconclusive"
        if tot and not d_ and 2 * len(u) > tot:
            v = "confirmed"
        elif tot and not u:
            v = "refuted"
        out.append(
            (
                f"More rounds help DP training at fixed epsilon = {e:g} (most rounds vs 3)",
                v,
                f"helps (significantly) in {len(u)}/{tot} arm/level cells, hurts in {len(d_)}, "
                f"n.s. in {len(f)}: " + "; ".join(u + d_ + f),
            )
        )
    # 5. client-level vs example-level DP, per arm, same eps and rounds; the verdict is taken
    # over the arms that train more than a linear head (FT-*, ST-*), the heads are listed beside
    cmp = {True: ([], [], []), False: ([], [], [])}  # large model? -> (harder, easier, same)
    arms_client = sorted({k[0] for k in stats if k[1] == "client"}, key=ORDER.index)
    for (arm, level, eps, R), m in stats.items():
        if level != "client" or (arm, "example", eps, R) not in stats:
            continue
        d, sig = welch(stats[(arm, "example", eps, R)], m)
        harder, easier, same = cmp[arm.startswith(("FT", "ST"))]
        (harder if sig and d > 0 else easier if sig else same).append(
            f"{arm} eps={eps:g} R={R}: {d:+.3f}"
        )

    def counts(large: bool) -> str:
        harder, easier, same = cmp[large]
        tot = len(harder) + len(easier) + len(same)
        return (
            f"example-level better by a significant margin in {len(harder)}/{tot} cells, "
            f"client-level better in {len(easier)}, n.s. in {len(same)}: "
            + "; ".join(harder + easier + same)
        )

    harder, easier, same = cmp[True]
    tot = len(harder) + len(easier) + len(same)
    v = "inconclusive"
    if tot and not easier and 2 * len(harder) >= tot:
        v = "confirmed"
    elif tot and not harder and 2 * len(easier) >= tot:
        v = "refuted"
    large = [a for a in arms_client if a.startswith(("FT", "ST"))]
    reason = (
        f"large models ({', '.join(large)}): {counts(True)}"
        if large
        else "no client-level run of a model larger than a linear head"
    ) + f". Heads (650 / 12,810 parameters, beside): {counts(False)}"
    out.append(("Client-level DP is harder than example-level for large models", v, reason))
    return out


def plot(stats: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds_all = sorted({k[3] for k in stats})
    arms = [a for a in ORDER if any(k[0] == a for k in stats)]
    fig, axes = plt.subplots(
        1, len(rounds_all), figsize=(4.2 * len(rounds_all) + 2.2, 4.0), sharey=True, squeeze=False
    )
    xs = {1.0: 0, 8.0: 1, None: 2.2}
    for ax, R in zip(axes[0], rounds_all, strict=True):
        for i, arm in enumerate(arms):
            off = (i - len(arms) / 2) * 0.035
            for level, style in (("example", "-o"), ("client", ":^")):
                pts = [(e, stats.get((arm, level, e, R))) for e in (1.0, 8.0)]
                pts = [(xs[e] + off, m) for e, m in pts if m]
                if pts:
                    ax.errorbar(
                        [p[0] for p in pts],
                        [p[1]["mean"] for p in pts],
                        yerr=[p[1]["std"] for p in pts],
                        fmt=style,
                        color=COLORS[arm],
                        capsize=3,
                        label=f"{arm} {level}",
                    )
            m = stats.get((arm, "none", None, R))
            if m:
                ax.errorbar(
                    [xs[None] + off],
                    [m["mean"]],
                    yerr=[m["std"]],
                    fmt="*",
                    ms=10,
                    color=COLORS[arm],
                    capsize=3,
                    label=f"{arm} non-private",
                )
        ax.axhline(0.1, color="grey", lw=0.8, ls="--")
        ax.set_xticks([0, 1, 2.2], ["eps=1", "eps=8", "non-private"])
        ax.set_title(f"{R} rounds x 1 local step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (3 seeds, +- std)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Fashion-MNIST, 3k examples over 100 clients, delta=1e-5 (dashed: chance)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


MARKED = "\n".join(("<!-- coverage -->", "<!-- /coverage -->", "", "<!-- results -->", ""))
MARKED += "<!-- /results -->\n"


def coverage(stats: dict) -> list[str]:
    """Which cells (3 test seeds each) ran per arm, against the full plan."""
    plan = [("none", None), ("example", 1.0), ("example", 8.0), ("client", 1.0), ("client", 8.0)]
    name = {("none", None): "non-private"} | {
        (lv, e): f"{lv[:3]}. eps={e:g}" for lv, e in plan if e is not None
    }
    out = ["| arm | ran (rounds: settings) | cut |", "|---|---|---|"]
    for arm in ORDER:
        ran, cut = [], []
        for R in (3, 10, 30):
            got = [c for c in plan if stats.get((arm, *c, R), {}).get("n", 0) >= 3]
            miss = [name[c] for c in plan if c not in got]
            if got:
                ran.append(f"{R}: {', '.join(name[c] for c in got)}")
            if miss:
                cut.append(f"{R}: {'all' if not got else ', '.join(miss)}")
        out.append(f"| {arm} | {'; '.join(ran) or '-'} | {'; '.join(cut) or '-'} |")
    return out


def write(state: dict, json_path: pathlib.Path) -> str:
    test = current(state)
    stats = summarize(test)
    lines = tables(state, stats)
    val = [r for r in state["rows"] if r["split"] == "val"]
    lines += [
        "",
        f"Runs: {len(test)} test + {len(val)} tuning; diverged (NLL > 5 or accuracy <= 0.105): "
        f"{sum(r['diverged'] for r in test)} test, {sum(r['diverged'] for r in val)} tuning; "
        "max spent epsilon / target: "
        + ", ".join(
            f"{e:g}: {max(r['epsilon'] for r in test if r['epsilon_target'] == e):.4f}"
            for e in sorted({r["epsilon_target"] for r in test if r["epsilon_target"]})
        )
        + f"; run time summed over the study's processes {state.get('wall_seconds', 0) / 60:.0f}"
        + (
            f" min, {state['elapsed_seconds'] / 60:.0f} min of wall-clock time (up to 3 "
            "processes in parallel)."
            if "elapsed_seconds" in state
            else " min."
        ),
        "",
        "**Verdicts** (Welch t over the 3 seeds, 5% two-sided)",
        "",
        "| finding | verdict | reason |",
        "|---|---|---|",
    ]
    lines += [f"| {f} | {v} | {r} |" for f, v, r in verdicts(stats)]
    text = "\n".join(lines) + "\n"
    json_path.with_suffix(".table.md").write_text(text)
    md_path = json_path.with_suffix(".md")  # prose kept; the marked blocks regenerated
    md = md_path.read_text() if md_path.exists() else MARKED
    for name, body in (("coverage", "\n".join(coverage(stats)) + "\n"), ("results", text)):
        md = re.sub(
            rf"<!-- {name} -->\n.*?<!-- /{name} -->",
            lambda _m, n=name, b=body: f"<!-- {n} -->\n{b}<!-- /{n} -->",
            md,
            flags=re.S,
        )
    md_path.write_text(md)
    plot(stats, json_path.with_suffix(".png"))
    print(text)
    return text


if __name__ == "__main__":
    p = OUT / "dpfl_pretraining.json"
    write(json.loads(p.read_text()), p)
