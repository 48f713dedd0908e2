"""Where dpft finds public data: config.data.data_dir, then $DPFT_DATA_DIR, then ../shared/data."""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "DPFT_DATA_DIR"
_DEFAULTS = ("../shared/data", "../../shared/data")


class DataError(ValueError):
    """A missing or corrupt data file; the message is one line naming the file and the fix."""


def data_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The data directory: ``override`` if given, else ``$DPFT_DATA_DIR``, else ../shared/data.

    Raises `DataError` (one line naming the directory and the variable to set) if none exists.
    """
    if override:
        p = pathlib.Path(override).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist (config.data.data_dir)")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = pathlib.Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist (set {ENV_VAR} to the data dir)")
        return p
    for cand in _DEFAULTS:
        p = pathlib.Path(cand)
        if p.is_dir():
            return p
    raise DataError(
        f"no data directory: set {ENV_VAR} or config.data.data_dir (tried {', '.join(_DEFAULTS)})"
    )


def data_file(relative: str, override: str | os.PathLike | None = None) -> pathlib.Path:
    """A file inside the data directory; `DataError` naming it and the variable if missing."""
    p = data_dir(override) / relative
    if not p.is_file():
        raise DataError(f"missing data file {p} (set {ENV_VAR} or config.data.data_dir)")
    return p
