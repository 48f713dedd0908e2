"""One-run empirical privacy audit of dpft's DP-SGD (Steinke, Nasr & Jagielski, NeurIPS 2023).

    from dpft.audit import AuditConfig, run_audit
    result = run_audit(AuditConfig(epsilon=1.0, canaries=2000, steps=10, broken="none"))
    result.claimed_epsilon, result.lower_bound

See ``docs/audit.md``. `bounds` holds the statistics (p-value and epsilon lower bound),
`mechanism` the audited training run and its deliberately broken variants, `distinguish` the
classic two-dataset audit over many runs (which also catches leaks of a count, such as
normalising by the realised batch size).
"""

from dpft.audit.bounds import (
    GuessBound,
    best_lower_bound,
    default_guess_grid,
    epsilon_lower_bound,
    guess_counts,
    p_value,
)
from dpft.audit.distinguish import (
    DistinguishConfig,
    DistinguishResult,
    clopper_pearson,
    run_distinguishing_audit,
    threshold_bound,
)
from dpft.audit.mechanism import BROKEN, SCORERS, AuditConfig, AuditResult, run_audit

__all__ = [
    "BROKEN",
    "SCORERS",
    "AuditConfig",
    "AuditResult",
    "DistinguishConfig",
    "DistinguishResult",
    "GuessBound",
    "best_lower_bound",
    "clopper_pearson",
    "default_guess_grid",
    "epsilon_lower_bound",
    "guess_counts",
    "p_value",
    "run_audit",
    "run_distinguishing_audit",
    "threshold_bound",
]
