"""The workdir contract: config.json (the run's identity) and the checkpoint records.

A workdir belongs to one config: `claim_workdir` writes ``config.json`` on the first run and
refuses a later run of another config (`ConfigMismatchError`). In a multi-process run every
process checks, and only process 0 writes; the launch keys of ``config.parallel`` (coordinator,
process id, ...) are not part of the identity, so every process has the same fingerprint.
"""

from __future__ import annotations

import json
import pathlib

from dpft.train import distributed
from dpft.train.checkpoint import Checkpointer, config_fingerprint


class ConfigMismatchError(ValueError):
    """The workdir holds a run of a different config."""


def config_json(config) -> str:
    """The canonical JSON of ``config`` that identifies a run (and its fingerprint)."""
    d = config.to_dict()
    parallel = d.get("parallel", {})
    for key in distributed.LAUNCH_KEYS:  # the launch, not the experiment
        parallel.pop(key, None)
    for path, default in _LEFT_OUT_AT_DEFAULT.items():
        *parents, last = path
        node = d
        for part in parents:
            node = node.get(part, {})
        if last in node and node[last] == default:
            del node[last]
    return json.dumps(d, sort_keys=True, indent=2, default=str)


#: Keys left out of the identity while they hold these values (the behaviour of a config without
#: them), so that a workdir written before a key existed resumes under the same fingerprint.
_LEFT_OUT_AT_DEFAULT = {
    ("plots",): True,
    ("dp", "secure_noise"): False,
    ("dp", "noise"): "independent",
    ("dp", "band"): 1,
    ("dp", "adaptive_quantile"): 0.0,
    ("dp", "adaptive_lr"): 0.2,
    ("dp", "adaptive_count_noise"): -1.0,
    ("parallel", "fsdp"): False,
}


def claim_workdir(workdir: pathlib.Path, text: str) -> bool:
    """Writes config.json, or checks it against an existing run; True if resuming is possible.

    Every process checks (so all raise alike on a mismatch); process 0 alone writes, after all
    have looked, so that they agree on whether the run resumes.
    """
    path = workdir / "config.json"
    exists = path.exists()
    if exists:
        old = path.read_text()
        if old != text:
            raise ConfigMismatchError(
                f"{path} holds a different config (fingerprint {config_fingerprint(old)} vs "
                f"{config_fingerprint(text)}{_differences(old, text)}): use a new --workdir"
            )
    distributed.barrier("dpft-claim-workdir")
    if not exists and distributed.is_primary():
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    distributed.barrier("dpft-claimed-workdir")
    return exists


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(old: str, new: str, shown: int = 5) -> str:
    """``'; KEY: OLD there, NEW now, ...; to resume pass --config.KEY=OLD'`` (up to ``shown``
    keys), or '' when ``old`` is not a JSON object."""
    try:
        a, b = _flat(json.loads(old)), _flat(json.loads(new))
    except (ValueError, AttributeError):
        return ""
    missing = object()
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))
    if not keys:
        return ""
    parts = [
        f"{k}: {json.dumps(a[k]) if k in a else 'absent'} there, "
        f"{json.dumps(b[k]) if k in b else 'absent'} now"
        for k in keys[:shown]
    ]
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    passable = [k for k in keys[:shown] if k in a and k in b]
    hint = " ".join(f"--config.{k}={json.dumps(a[k])}" for k in passable)
    return "; " + ", ".join(parts) + more + (f"; to resume it pass {hint}" if hint else "")


def checkpoint_meta(ckpt: Checkpointer, step: int) -> dict:
    """The JSON record of checkpoint ``step`` alone (no arrays restored)."""
    import orbax.checkpoint as ocp

    out = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])


def eval_data_description(config) -> str:
    """The summary's ``eval_data`` field: where the eval metrics come from.

    Privacy:
        A validation split carved from the private training set is held out of training, but
        metrics on it are computed without noise: they are NOT differentially private (fine for
        tuning, not for release). The public test split's metrics are.
    """
    if config.data.validation_fraction > 0:
        return "validation split of the training data (metrics NOT private)"
    return f"public {config.data.eval_split} split"
