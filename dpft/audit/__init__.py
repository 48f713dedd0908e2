"""One-run empirical privacy audit of dpft's DP-SGD (Steinke, Nasr & Jagielski, NeurIPS 2023).

    from dpft.audit import AuditConfig, run_audit
    result = run_audit(AuditConfig(epsilon=1.0, canaries=2000, steps=10, broken="none"))
    result.claimed_epsilon, result.lower_bound

See ``docs/audit.md``. `bounds` holds the statistics (p-value and epsilon lower bound),
`mechanism` the audited training run, `models` its white-box model and canary data, `broken`
the deliberately broken variants (no noise, no clipping, the realised batch size, ghost norms
without the bias, shuffled batches accounted with sigma instead of sigma / 2, truncation left
out of the accounting), `distinguish` the
classic two-dataset audit over many runs (which also catches leaks of a count, such as
normalising by the realised batch size, and runs replace-one neighbours for shuffled batches).
"""

from dpft.audit.bounds import (
    GuessBound,
    best_lower_bound,
    default_guess_grid,
    epsilon_lower_bound,
    guess_counts,
    p_value,
)
from dpft.audit.broken import DropFromNorms, unhalved_shuffle_epsilon, unhalved_shuffle_event
from dpft.audit.distinguish import (
    DistinguishConfig,
    DistinguishResult,
    clopper_pearson,
    run_distinguishing_audit,
    threshold_bound,
)
from dpft.audit.mechanism import (
    BROKEN,
    NORMS,
    SAMPLINGS,
    SCORERS,
    AuditConfig,
    AuditResult,
    run_audit,
)

__all__ = [
    "BROKEN",
    "NORMS",
    "SAMPLINGS",
    "SCORERS",
    "AuditConfig",
    "AuditResult",
    "DistinguishConfig",
    "DistinguishResult",
    "DropFromNorms",
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
    "unhalved_shuffle_epsilon",
    "unhalved_shuffle_event",
]
