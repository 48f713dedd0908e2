"""``python -m dpft --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]``."""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "where metrics, checkpoints and summary go")


def main(argv):
    del argv
    from absl import logging as absl_logging

    from dpft.train import train_and_evaluate

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
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
    except (ValueError, FileNotFoundError, KeyError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
