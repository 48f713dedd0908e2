"""Command line: ``python -m dpft.audit --epsilon 2 --delta 1e-5 --canaries 1000 --steps 10``.

``--method one-run`` (default) is the one-run canary audit; ``--method two-dataset --runs R``
trains R runs on D and R on D' = D + {target} (replace-one for ``--sampling shuffle``) and tests
which produced each. Prints the claimed epsilon, the audit's lower bound and the settings, one
line each (a fourth, the accountant's epsilon of what actually ran, for the accounting controls
``shuffle_sigma`` and ``truncation`` of the one-run audit). Bad arguments give a one-line error
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dpft.audit.distinguish import DistinguishConfig, run_distinguishing_audit
from dpft.audit.mechanism import BROKEN, NORMS, SAMPLINGS, SCORERS, AuditConfig, run_audit


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dpft.audit", description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=("one-run", "two-dataset"), default="one-run")
    p.add_argument("--runs", type=int, default=2000, help="two-dataset: runs per dataset")
    p.add_argument("--epsilon", type=float, default=2.0, help="claimed epsilon")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--canaries", type=int, default=1000, help="m, canaries (each p=1/2)")
    p.add_argument("--steps", type=int, default=10, help="T, DP-SGD steps")
    p.add_argument(
        "--sampling-rate", type=float, default=1.0, help="Poisson q (1 = full batch) or batch/N"
    )
    p.add_argument("--sampling", choices=SAMPLINGS, default="poisson")
    p.add_argument("--max-batch-size", type=int, default=None, help="Poisson cap (truncation)")
    p.add_argument("--norms", choices=NORMS, default="vmap", help="one-run: per-example norms")
    p.add_argument(
        "--num-real", type=int, default=None, help="non-canary examples (|D| for two-dataset)"
    )
    p.add_argument("--broken", choices=BROKEN, default="none")
    p.add_argument("--scorer", choices=SCORERS, default="auto")
    p.add_argument("--beta", type=float, default=0.05, help="1 - confidence")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parses arguments, runs the audit and prints three lines; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.method == "two-dataset":
        return _two_dataset(parser, args)
    try:
        cfg = AuditConfig(
            epsilon=args.epsilon,
            delta=args.delta,
            canaries=args.canaries,
            steps=args.steps,
            sampling_rate=args.sampling_rate,
            num_real=100 if args.num_real is None else args.num_real,
            broken=args.broken,
            scorer=args.scorer,
            beta=args.beta,
            seed=args.seed,
            sampling=args.sampling,
            max_batch_size=args.max_batch_size,
            norms=args.norms,
        )
    except ValueError as e:
        parser.error(str(e))
    res = run_audit(cfg)
    b = res.bound
    print(f"claimed epsilon: {res.claimed_epsilon:.4f} (delta={cfg.delta:g})")
    print(f"audit lower bound: {b.epsilon:.4f} (confidence {1 - cfg.beta:g}, {b.v}/{b.r} correct)")
    print(
        f"settings: broken={cfg.broken} canaries={cfg.canaries} steps={cfg.steps} "
        f"sampling={cfg.sampling} sampling_rate={cfg.sampling_rate:g} "
        f"batch_size={cfg.batch_size} norms={cfg.norms} num_real={cfg.num_real} "
        f"noise_multiplier={res.noise_multiplier:.4f} used={res.noise_multiplier_used:.4f} "
        f"scorer={res.scorer} k={b.k} grid={len(b.grid)} seed={cfg.seed}"
    )
    if res.actual_epsilon is not None:
        print(f"accountant's epsilon of what ran: {res.actual_epsilon:.4f}")
    return 0


def _two_dataset(parser: argparse.ArgumentParser, args) -> int:
    try:
        cfg = DistinguishConfig(
            epsilon=args.epsilon,
            delta=args.delta,
            runs=args.runs,
            steps=args.steps,
            sampling_rate=args.sampling_rate,
            num_real=1 if args.num_real is None else args.num_real,
            broken=args.broken,
            beta=args.beta,
            seed=args.seed,
            sampling=args.sampling,
        )
        if args.norms != "vmap" or args.max_batch_size is not None:
            raise ValueError("--norms and --max-batch-size are one-run options")
    except ValueError as e:
        parser.error(str(e))
    res = run_distinguishing_audit(cfg)
    print(f"claimed epsilon: {res.claimed_epsilon:.4f} (delta={cfg.delta:g})")
    print(
        f"audit lower bound: {res.lower_bound:.4f} (confidence {1 - cfg.beta:g}, "
        f"test fired on {res.true_positive}/{res.evaluation_runs} runs of one dataset and "
        f"{res.false_positive}/{res.evaluation_runs} of the other)"
    )
    print(
        f"settings: method=two-dataset broken={cfg.broken} runs={cfg.runs} steps={cfg.steps} "
        f"sampling={cfg.sampling} sampling_rate={cfg.sampling_rate:g} num_real={cfg.num_real} "
        f"noise_multiplier={res.noise_multiplier:.4f} statistic={res.statistic} seed={cfg.seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
