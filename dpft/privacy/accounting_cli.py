"""``python -m dpft.privacy.accounting``: epsilon of DP-SGD, or the noise for a target.

Command line::

    python -m dpft.privacy.accounting epsilon --sampling-rate Q --noise-multiplier S \\
        --steps T --delta D [--accountant pld|rdp]
    python -m dpft.privacy.accounting sigma --sampling-rate Q --epsilon E --steps T --delta D
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from dpft.privacy.accounting import (
    ACCOUNTANTS,
    GaussianSteps,
    calibrate_noise_multiplier,
    compute_epsilon,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpft.privacy.accounting",
        description="Epsilon of Poisson-subsampled Gaussian DP-SGD, or the noise for a target.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("epsilon", "print epsilon"), ("sigma", "print noise multiplier")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--sampling-rate", type=float, required=True, help="Poisson rate q")
        s.add_argument("--steps", type=int, required=True)
        s.add_argument("--delta", type=float, required=True)
        s.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
        if name == "epsilon":
            s.add_argument("--noise-multiplier", type=float, required=True)
        else:
            s.add_argument("--epsilon", type=float, required=True)
    return p


def _validate(args) -> None:
    if not 0 < args.sampling_rate <= 1:
        raise ValueError(f"--sampling-rate must be in (0, 1], got {args.sampling_rate}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must be in (0, 1), got {args.delta}")
    if args.command == "epsilon" and not args.noise_multiplier >= 0:
        raise ValueError(f"--noise-multiplier must be >= 0, got {args.noise_multiplier}")
    if args.command == "sigma" and not args.epsilon > 0:
        raise ValueError(f"--epsilon must be > 0, got {args.epsilon}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _validate(args)
        if args.command == "epsilon":
            entry = GaussianSteps(args.noise_multiplier, args.sampling_rate, args.steps)
            eps = compute_epsilon(entry, args.delta, args.accountant)
            if math.isinf(eps):
                print("inf  (noise multiplier 0: no privacy)")
            else:
                print(f"{eps:.6g}")
        else:
            sigma = calibrate_noise_multiplier(
                args.epsilon, args.delta, args.sampling_rate, args.steps, args.accountant
            )
            print(f"{sigma:.6g}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
