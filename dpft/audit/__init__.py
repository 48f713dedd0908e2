"""One-run empirical privacy audit of dpft's DP-SGD (Steinke, Nasr & Jagielski, NeurIPS 2023).

    from dpft.audit import AuditConfig, run_audit
    result = run_audit(AuditConfig(epsilon=1.0, canaries=2000, steps=10, broken="none"))
    result.claimed_epsilon, result.lower_bound

See ``docs/audit.md``. `bounds` holds the statistics (p-value and epsilon lower bound),
`mechanism` the audited training run and its deliberately broken variants.
"""

from dpft.audit.bounds import (
    GuessBound,
    best_lower_bound,
    default_guess_grid,
    epsilon_lower_bound,
    guess_counts,
    p_value,
)
from dpft.audit.mechanism import BROKEN, SCORERS, AuditConfig, AuditResult, run_audit

__all__ = [
    "BROKEN",
    "SCORERS",
    "AuditConfig",
    "AuditResult",
    "GuessBound",
    "best_lower_bound",
    "default_guess_grid",
    "epsilon_lower_bound",
    "guess_counts",
    "p_value",
    "run_audit",
]
