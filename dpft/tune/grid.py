"""The command line of `dpft.tune`: its arguments, the config, the grid and the pool of candidates.

The grid may vary any config value except those that change the data, the (epsilon, delta)
target or the DP mechanism (``FIXED_KEYS``, ``FIXED_PREFIXES``): every candidate must be the same
mechanism for the tuning's accounting to hold.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import pathlib

from dpft.privacy import tuning

FIXED_PREFIXES = ("data.", "parallel.", "federated.")
FIXED_KEYS = (
    "seed",
    "dp.epsilon",
    "dp.delta",
    "dp.noise_multiplier",
    "dp.accountant",
    "dp.secure_noise",
    "train.batch_size",
    "train.max_batch_size",
    "train.epochs",
    "train.steps",
    "finetune.lp_fraction",
    "linear.method",
    "linear.steps",
    "linear.budget_split",
    "linear.hessian_share",
    "linear.cov_fraction",
)
LOWER_IS_BETTER = ("loss", "ece", "mce")


def load_config(spec: str):
    """``PATH[:ARG]`` -> the config file's ``get_config(ARG)`` (as ``--config`` loads it)."""
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise ValueError(f"--config: no config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("dpft_tune_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    return config


def get_value(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise ValueError(f"unknown config key {key!r}")
        node = node[part]
    return node


def set_value(config, key: str, value) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


def parse_value(config, key: str, text: str):
    """``text`` as a value of config key ``key``, typed like its current value."""
    current = get_value(config, key)
    if hasattr(current, "keys"):
        raise ValueError(f"config key {key!r} is a section, not a value")
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError
            return low in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        value = ast.literal_eval(text)
        if isinstance(current, tuple | list) and not isinstance(value, tuple | list):
            raise ValueError
        return tuple(value) if isinstance(current, tuple) else value
    except (ValueError, SyntaxError):
        kind = type(current).__name__
        raise ValueError(f"config key {key!r} expects a {kind}, got {text!r}") from None


def parse_grid(config, text: str) -> list[tuple[str, list]]:
    """``'a.b=1,2;c.d=x'`` -> ``[('a.b', [1, 2]), ('c.d', ['x'])]``, typed and checked."""
    grid = []
    for part in (p.strip() for p in str(text).split(";")):
        if not part:
            continue
        key, eq, values = part.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise ValueError(f"--grid: expected KEY=V1,V2,... separated by ';', got {part!r}")
        get_value(config, key)  # unknown key: one line naming it
        if key in FIXED_KEYS or key.startswith(FIXED_PREFIXES):
            raise ValueError(
                f"--grid may not vary {key!r}: it changes the data, the (epsilon, delta) target "
                "or the DP mechanism, which every candidate must share"
            )
        if key in (k for k, _ in grid):
            raise ValueError(f"--grid names {key!r} twice")
        grid.append((key, [parse_value(config, key, v.strip()) for v in values.split(",")]))
    if not grid:
        raise ValueError("--grid is empty: give at least one KEY=V1,V2,...")
    return grid


def parse_metric(metric: str) -> tuple[str, bool]:
    """``validation_X`` -> (the runs' summary key ``test_X``, whether higher is better)."""
    name = str(metric)
    if not name.startswith("validation_") or name == "validation_":
        raise ValueError(
            f"--metric must be a validation metric (validation_accuracy, validation_loss, "
            f"validation_ece, validation_mce), got {metric!r}"
        )
    rest = name[len("validation_") :]
    return f"test_{rest}", rest not in LOWER_IS_BETTER


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpft.tune", description="private hyperparameter tuning, accounted"
    )
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    p.add_argument("--workdir", required=True)
    p.add_argument("--grid", required=True, help="'KEY=V1,V2;KEY2=W1,W2'")
    p.add_argument("--random", type=int, default=0, help="pool of N random grid points")
    p.add_argument("--repetitions", default="poisson:2", help="distribution of K")
    p.add_argument("--metric", default="validation_accuracy")
    return p


def parse_args(argv: list[str]):
    """(namespace, config overrides [(key, text)]) of the command line."""
    rest, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                value = next(it, None)
                if value is None:
                    raise ValueError(f"--config.{key} needs a value")
            overrides.append((key, value))
        else:
            rest.append(arg)
    parser = _parser()
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # argparse has printed its usage line
        raise ValueError("bad command line (see the usage above)") from e
    return args, overrides


def candidate_pool(grid: list[tuple[str, list]], random_points: int) -> list[dict]:
    keys = [k for k, _ in grid]
    values = itertools.product(*(v for _, v in grid))
    points = [dict(zip(keys, vals, strict=True)) for vals in values]
    if random_points < 0:
        raise ValueError(f"--random must be >= 0, got {random_points}")
    if random_points:  # N points of the grid, drawn without replacement (public randomness)
        left = list(points)
        count = min(random_points, len(left))
        points = [left.pop(tuning.draw_index(len(left))) for _ in range(count)]
    return points
