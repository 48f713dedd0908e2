"""``python -m dpft --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]``.

`train_and_evaluate` is the one place that picks a config's driver from its sections; every
driver writes the same workdir contract (config.json, metrics.jsonl, TensorBoard events,
checkpoints, summary.json, plots) and returns the summary:

* ``config.federated`` present: the federated driver (`dpft.federated.experiment`), which wraps
  the centralized train step to simulate clients;
* else ``config.linear`` present: a feature-based method on cached backbone features
  (`dpft.linear.experiment`: single full-batch step, DP-GD, DP least squares, DP-Newton, DP-FC);
* otherwise the centralized DP trainer (`dpft.train.trainer`).

Library callers that run any config import `train_and_evaluate` from here (importing the module
defines its ``--config`` and ``--workdir`` absl flags; only `run` parses them).
"""

from __future__ import annotations

import ast
import logging
import pathlib
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "where metrics, checkpoints and summary go")


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
    """Runs the experiment ``config`` in ``workdir`` (resuming if it holds one) -> summary."""
    if "federated" in config:
        from dpft.federated.experiment import train_and_evaluate as driver
    elif "linear" in config:
        from dpft.linear.experiment import train_and_evaluate as driver
    else:
        from dpft.train.trainer import train_and_evaluate as driver
    return driver(config, workdir)


def main(argv):
    del argv
    from absl import logging as absl_logging

    from dpft.host import tune_host_allocator

    tune_host_allocator()  # reuse XLA:CPU's per-step host buffers (DPFT_TUNE_MALLOC=0: off)

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("dpft").setLevel(logging.INFO)  # e.g. "resuming W from step N" (absl's
    # handler is already on the root logger, so basicConfig alone leaves dpft's INFO unseen)
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(
        f"test_accuracy={summary['test_accuracy']:.4f} epsilon={summary['epsilon']:.4f} "
        f"delta={summary['delta']:g} steps={summary['steps']} "
        f"wall_seconds={summary['wall_seconds']:.0f}  ({_WORKDIR.value}/summary.json)"
    )


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    try:
        app.run(main)
    except (ValueError, OSError, KeyError, AttributeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _one_line(e: BaseException) -> str:
    """The whole message on one line (a config-file error names the file on a later line)."""
    text = str(e)
    if isinstance(e, KeyError | AttributeError) and e.args:
        text = str(e.args[0])
    if isinstance(e, KeyError | AttributeError) and text[:1] in "'\"":
        try:  # ml_collections raises the repr of a KeyError's message
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
        if re.fullmatch(r"'[\w.]+'", text.splitlines()[0] if text else ""):
            text = f"unknown config key {text}"
    msg = " ".join(text.split()) or type(e).__name__
    return msg if len(msg) <= 600 else msg[:597] + "..."


if __name__ == "__main__":
    run()
