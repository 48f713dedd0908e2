"""Fine-tuning modes as sequences of training phases over one privacy budget.

``config.finetune.mode``:

* ``scratch``: train every parameter of a freshly initialised model (``model.pretrained`` empty).
* ``full``  (FT): train every parameter of a pretrained model.
* ``head``  (HT / LP): train only the output layer ``linear`` of a pretrained model (or of a
  fixed public feature extractor, `dpft.models.FIXED_FEATURES`, which needs no weights). With
  ``finetune.feature_cache`` (default) the frozen backbone's features are computed once and the
  head is trained on them, so a DP step costs a matmul, not a forward pass of the backbone.
* ``partial``: train the parameters matching ``finetune.trainable`` (e.g. last stage + head).
* ``lp_ft`` (Ke et al. 2024, after Kumar et al. 2022): a head (linear-probing) phase, then a
  fine-tuning phase of ``finetune.trainable`` (default: everything). ``finetune.lp_fraction`` is
  the share of the run's steps, all at the one noise multiplier calibrated for the whole run,
  spent in the LP phase; so it is the share of the privacy budget, and the accountant composes
  both phases into the run's (epsilon, delta), never above the target.
* ``bitfit`` (BiTFiT, Ben Zaken et al. 2022): train every bias (every parameter named
  ``bias``, normalisation layers' included) and, with ``finetune.train_head`` (default), the
  head ``linear``; everything else is frozen. Pretrained weights are expected, not required.
* ``""`` (default): one phase training ``finetune.trainable``, with no mode-specific checks.

LoRA (``finetune.lora_rank = r > 0``, `dpft.models.lora`): the model gets zero-initialised
adapters on the layers ``finetune.lora_targets`` selects and every phase that is not a head
phase trains the adapters (plus the head with ``finetune.train_head``, plus the biases in mode
``bitfit``, plus ``finetune.trainable`` in mode ``partial``) with the base frozen. Modes ``''``,
``scratch``, ``partial``, ``bitfit`` and ``lp_ft`` (LP on the base features, then the adapters)
take it; ``full`` and ``head`` refuse it (they would train the base / never the adapters).

Each phase is trained with the same pure step function (jitted once per phase, since the set of
trainable parameters fixes its shapes); the sampler, step counter and privacy ledger run on
across phases.
"""

from __future__ import annotations

import dataclasses
import math

from dpft.models import FIXED_FEATURES
from dpft.models import lora as lora_lib

MODES = ("", "scratch", "full", "head", "partial", "lp_ft", "bitfit")
HEAD = (r"linear/.*",)
ALL = (".*",)
BIASES = (r"(?:.*/)?bias",)  # every parameter named bias


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps ``[start, end)`` of a run training the parameters matching ``trainable``."""

    name: str
    trainable: tuple[str, ...]
    start: int
    end: int
    use_features: bool = False  # train the head on cached backbone features
    learning_rate: float | None = None  # None: config.train.learning_rate

    @property
    def steps(self) -> int:
        return self.end - self.start


def plan_phases(config, total_steps: int) -> list[Phase]:
    """The phases of a run of ``total_steps`` steps, per ``config.finetune`` (see module doc)."""
    ft = config.finetune
    mode = ft.get("mode", "")
    pretrained = bool(config.model.pretrained)
    cache = bool(ft.get("feature_cache", True))
    spec = tuple(ft.trainable)
    if mode not in MODES:
        raise ValueError(f"config.finetune.mode must be one of {'|'.join(MODES[1:])}, got {mode!r}")
    lora = lora_lib.from_config(ft)
    fixed = mode == "head" and config.model.name in FIXED_FEATURES
    if mode in ("full", "head", "partial", "lp_ft") and not (pretrained or fixed):
        raise ValueError(
            f"config.finetune.mode={mode!r} tunes a pretrained model: set config.model.pretrained"
        )
    if mode == "scratch" and pretrained:
        raise ValueError(
            "config.finetune.mode='scratch' trains from a fresh init: "
            f"config.model.pretrained must be empty, got {config.model.pretrained!r}"
        )
    head = HEAD if ft.get("train_head", True) else ()
    if mode == "bitfit":
        spec = BIASES + head
    if lora is not None:
        if mode in ("full", "head"):
            raise ValueError(
                f"config.finetune.lora_rank={lora.rank} adds adapters that mode {mode!r} does not "
                "train alone: use finetune.mode ''|partial|bitfit|lp_ft, or lora_rank=0"
            )
        extra = spec if mode in ("partial", "bitfit") else ()
        spec = tuple(dict.fromkeys(lora_lib.ADAPTERS + head + extra))
    if mode in ("", "scratch", "partial", "bitfit"):
        return [Phase(mode or "train", spec, 0, total_steps)]
    if mode == "full":
        return [Phase("full", ALL, 0, total_steps)]
    if mode == "head":
        return [Phase("head", HEAD, 0, total_steps, use_features=cache)]
    frac = float(ft.get("lp_fraction", 0.5))
    if not 0.0 <= frac <= 1.0 or math.isnan(frac):
        raise ValueError(f"config.finetune.lp_fraction must be in [0, 1], got {frac}")
    lp_steps = round(frac * total_steps)
    lp_lr = float(ft.get("lp_learning_rate", 0.0)) or None
    phases = []
    if lp_steps > 0:
        phases.append(Phase("lp", HEAD, 0, lp_steps, use_features=cache, learning_rate=lp_lr))
    if lp_steps < total_steps:
        phases.append(Phase("ft", spec, lp_steps, total_steps))
    return phases


def phase_index(phases: list[Phase], step: int) -> int:
    """Index of the phase that ran step ``step - 1`` (the one a checkpoint at ``step`` is of)."""
    for i, p in enumerate(phases):
        if p.start < step <= p.end:
            return i
    return 0


def describe_phase(config, phase: Phase, trainable: dict, full: dict) -> str:
    """One line saying what ``phase`` trains: which parameters (the top-level modules of the
    flat ``trainable`` dict and their count), of which model, and what stays fixed (pretrained
    weights, a fixed public feature extractor, or nothing); ``full`` is the model's flat
    variable dict."""
    import numpy as np

    def size(v) -> int:
        return int(np.prod(np.shape(v)))

    def module(key: str) -> str:
        parts = key.split("/")
        return parts[1] if parts[0] == "params" and len(parts) > 1 else parts[0]

    modules = sorted({module(k) for k in trainable})
    shown = ", ".join(modules[:6]) + (f" and {len(modules) - 6} more" if len(modules) > 6 else "")
    n_train = sum(size(v) for v in trainable.values())
    fixed = [v for k, v in full.items() if k.startswith("params/") and k not in trainable]
    n_fixed = sum(size(v) for v in fixed)
    m = config.model
    if m.pretrained:
        source = f"pretrained {m.pretrained} weights ({m.pretrained_path or 'the data directory'})"
    elif m.name in FIXED_FEATURES:
        source = "a fixed public feature extractor (no trained weights)"
    else:
        source = "a fresh initialisation"
    where = " on cached backbone features" if phase.use_features else ""
    return (
        f"phase {phase.name}: DP-trains {n_train:,} parameters ({shown}) of {m.name}{where}; "
        f"{n_fixed:,} parameters fixed; backbone: {source}"
    )
