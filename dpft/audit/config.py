"""What one audit run is: `AuditConfig` (the claimed guarantee, canaries, sampling, norms and the
broken variant), `WhiteBoxSetup` (the fields it shares with the two-dataset audit's
`DistinguishConfig`, validated once) and the names of the choices (``BROKEN``, ``SCORERS``,
``SAMPLINGS``, ``NORMS``).
"""

from __future__ import annotations

import dataclasses
import math

from dpft.privacy.sampling import poisson_batch_cap

__all__ = ["BROKEN", "NORMS", "SAMPLINGS", "SCORERS", "AuditConfig", "WhiteBoxSetup"]

BROKEN = (
    "none",
    "noise",
    "clip",
    "realized_batch",
    "ghost_drop_bias",
    "shuffle_sigma",
    "truncation",
)
SCORERS = ("auto", "sum", "count_weighted")
SAMPLINGS = ("poisson", "shuffle")
NORMS = ("vmap", "ghost")


def check_choice(name: str, value, choices: tuple) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class WhiteBoxSetup:
    """What the one-run audit (`AuditConfig`) and the two-dataset audit
    (`dpft.audit.distinguish.DistinguishConfig`) share: the claimed guarantee, the white-box
    model (``num_real`` real examples with gradients in ``real_dim`` coordinates, ``free_dim``
    coordinates no real example touches, canaries of norm ``canary_scale * clip_norm``), the
    DP-SGD run and the broken variant. `check_shared` validates these fields.
    """

    epsilon: float = 1.0
    delta: float = 1e-5
    steps: int = 1
    sampling_rate: float = 1.0
    num_real: int = 1
    real_dim: int = 16
    free_dim: int = 256
    clip_norm: float = 1.0
    canary_scale: float = 100.0
    learning_rate: float = 1.0
    broken: str = "none"
    seed: int = 0
    beta: float = 0.05
    sampling: str = "poisson"

    def check_shared(self):
        """Raises ValueError for a shared field out of its range."""
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be a finite number > 0, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if not (isinstance(self.steps, int) and self.steps > 0):
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        if not (isinstance(self.num_real, int) and self.num_real >= 0):
            raise ValueError(f"num_real must be an int >= 0, got {self.num_real!r}")
        check_choice("broken", self.broken, BROKEN)
        check_choice("sampling", self.sampling, SAMPLINGS)
        if self.broken == "shuffle_sigma" and self.sampling != "shuffle":
            raise ValueError("broken='shuffle_sigma' needs sampling='shuffle'")
        if not 0 < self.beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {self.beta!r}")

    @property
    def shuffle(self) -> bool:
        return self.sampling == "shuffle"


@dataclasses.dataclass(frozen=True)
class AuditConfig(WhiteBoxSetup):
    """Settings of one audit run.

    Attributes:
      epsilon, delta: the claimed guarantee; the noise multiplier is calibrated to it with
        dpft's accountant (PLD; RDP for shuffled batches) unless ``noise_multiplier`` is given.
      canaries: m, the number of canaries.
      steps: T, DP-SGD steps.
      sampling_rate: q. Poisson rate (1.0 means full batch: every example, every step), or for
        ``sampling='shuffle'`` the batch fraction: batches of ``round(q N)`` of the N examples.
      sampling: 'poisson' (add/remove-one; canaries in with probability 1/2) or 'shuffle'
        (`ShuffleSampler`, replace-one; every slot holds +canary or -canary).
      max_batch_size: the static Poisson cap; None picks `poisson_batch_cap` (truncation
        probability <= 1e-12 per step). A smaller cap truncates; it is accounted exactly (PLD's
        truncated-Poisson event) unless ``broken='truncation'``.
      norms: 'vmap' (linear model, `VmapNorms`) or 'ghost' (a flax Dense layer, `GhostNorms`).
      num_real: real (non-canary) examples.
      broken: 'none' (the correct mechanism) or a broken variant: 'noise', 'clip',
        'realized_batch', 'ghost_drop_bias' (needs norms='ghost'), 'shuffle_sigma' (needs
        sampling='shuffle'), 'truncation' (needs Poisson q < 1 and max_batch_size).
      scorer: 'sum' (total movement), 'count_weighted' (per-step movement weighted by the
        estimated number of canaries in the batch; see `_scores`), or 'auto' (count_weighted
        for realized_batch, sum otherwise). Fixed before the run, so no union bound is needed.
      beta: 1 - confidence of the reported lower bound (split over the guess grid).
    """

    epsilon: float = 2.0
    steps: int = 10
    num_real: int = 100
    canaries: int = 1000
    scorer: str = "auto"
    noise_multiplier: float | None = None
    max_batch_size: int | None = None
    norms: str = "vmap"

    def __post_init__(self):
        self.check_shared()
        if not (isinstance(self.canaries, int) and self.canaries >= 2):
            raise ValueError(f"canaries must be an int >= 2, got {self.canaries!r}")
        check_choice("scorer", self.scorer, SCORERS)
        check_choice("norms", self.norms, NORMS)
        if self.clip_norm <= 0 or self.canary_scale <= 0 or self.learning_rate <= 0:
            raise ValueError("clip_norm, canary_scale and learning_rate must be > 0")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        poisson = self.sampling == "poisson" and self.sampling_rate < 1
        if self.max_batch_size is not None:
            if not poisson:
                raise ValueError("max_batch_size needs Poisson sampling with sampling_rate < 1")
            cap = self.max_batch_size
            if not (isinstance(cap, int) and 1 <= cap <= self.max_examples):
                raise ValueError(
                    f"max_batch_size must be an int in [1, {self.max_examples}], got {cap!r}"
                )
        if self.broken == "ghost_drop_bias" and self.norms != "ghost":
            raise ValueError("broken='ghost_drop_bias' needs norms='ghost'")
        if self.broken == "truncation" and self.max_batch_size is None:
            raise ValueError("broken='truncation' needs Poisson sampling and a max_batch_size")

    @property
    def full_batch(self) -> bool:
        return self.sampling == "poisson" and self.sampling_rate == 1.0

    @property
    def max_examples(self) -> int:
        """Dataset size if every canary were included (fixes static shapes and the cap).

        For shuffled batches it is the dataset size N itself (every canary slot is present).
        """
        return self.num_real + self.canaries

    @property
    def batch_size(self) -> int:
        """The static batch: round(q N) for shuffle, the Poisson cap, or every row."""
        if self.shuffle:
            return max(1, int(round(self.sampling_rate * self.max_examples)))
        if self.full_batch:
            return self.max_examples
        if self.max_batch_size is not None:
            return self.max_batch_size
        return poisson_batch_cap(self.max_examples, self.sampling_rate)

    @property
    def expected_batch_size(self) -> float:
        """The public normaliser: the shuffle batch size, else q * (num_real + m/2).

        Neither depends on the secret bits.
        """
        if self.shuffle:
            return float(self.batch_size)
        return self.sampling_rate * (self.num_real + self.canaries / 2)

    @property
    def accounted_rate(self) -> float:
        """The sampling rate the accountant sees (batch / N for shuffle)."""
        if self.shuffle:
            return self.batch_size / self.max_examples
        return self.sampling_rate

    def accounting_kwargs(self, claimed: bool = True) -> dict:
        """`GaussianSteps` keyword arguments describing this run's sampling.

        ``claimed=False`` describes what actually runs; ``claimed=True`` what the claim is
        computed for, which differs for ``broken='truncation'`` (the cap is left out).
        """
        if self.shuffle:
            n = self.max_examples
            return {"sampling": "shuffle", "dataset_size": n, "max_batch_size": self.batch_size}
        if self.full_batch:
            return {"sampling": "full"}
        if claimed and self.broken == "truncation":
            return {"sampling": "poisson"}  # the bug: truncation ignored
        # With fewer examples than max_examples the true overflow probability is only smaller.
        n = self.max_examples
        return {"sampling": "poisson", "dataset_size": n, "max_batch_size": self.batch_size}
