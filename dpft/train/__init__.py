"""The centralized DP trainer: `train_and_evaluate(config, workdir)` of `dpft.train.trainer`.

This package sits below the federated driver (`dpft.federated`) and the feature methods
(`dpft.linear`), which reuse its pieces, and imports neither. Which driver runs a config is
decided in one place, `dpft.__main__.train_and_evaluate`: a config with a ``federated`` or a
``linear`` section is refused here rather than run as a centralized one.
"""

from __future__ import annotations

import pathlib

#: Config sections that belong to another driver (see `dpft.__main__.train_and_evaluate`).
OTHER_DRIVERS = {
    "federated": "dpft.federated.experiment",
    "linear": "dpft.linear.experiment",
}


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
    """Runs the centralized experiment ``config`` in ``workdir`` (resuming if it holds one).

    Returns the run's summary. Raises ValueError for a config with a section of another
    driver (`OTHER_DRIVERS`), before anything is read or written.
    """
    for section, module in OTHER_DRIVERS.items():
        if section in config:
            raise ValueError(
                f"config.{section} is for `{module}.train_and_evaluate`, not the centralized "
                "trainer: run it with `python -m dpft` or `dpft.__main__.train_and_evaluate`"
            )
    from dpft.train.trainer import train_and_evaluate as run

    return run(config, workdir)


__all__ = ["OTHER_DRIVERS", "train_and_evaluate"]
