"""Where dpft finds public data, and fetching what is missing on first use.

The data directory holds files in one layout (``mnist/…``, ``fashion-mnist/…``,
``pretrained/resnet-cifar10/…``, ``pretrained/imagenet/…``). It is, in this order:

1. ``config.data.data_dir`` (the ``override`` argument): used as given; nothing is downloaded
   into it, a missing file is an error.
2. ``$DPFT_DATA_DIR``: must exist; files that `dpft.download` knows and that are missing there
   are downloaded into it.
3. ``../shared/data`` or ``../../shared/data`` (relative to the working directory), then the
   download cache ``~/.cache/dpft``: a known file is taken from the first of these that holds
   it, and downloaded into the cache if none does.

Two functions resolve a path, downloading on first use: `data_file` (one file, e.g.
``pretrained/resnet-cifar10/resnet20.safetensors``) and `data_path` (a known file, or a dataset's
folder such as ``fashion-mnist`` with all its files). Which files are known, their sources and
checks are in `dpft.download` (`dpft.download.entries_at`).
"""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "DPFT_DATA_DIR"
_DEFAULTS = ("../shared/data", "../../shared/data")
#: Download cache when ``$DPFT_DATA_DIR`` is not set.
CACHE = "~/.cache/dpft"


class DataError(ValueError):
    """A missing or corrupt data file; the message is one line naming the file and the fix."""


def download_dir() -> pathlib.Path:
    """Where missing files are downloaded: ``$DPFT_DATA_DIR`` if set, else ``~/.cache/dpft``."""
    env = os.environ.get(ENV_VAR)
    return pathlib.Path(env or CACHE).expanduser()


def search_dirs() -> list[pathlib.Path]:
    """The directories looked in, in order (without ``config.data.data_dir``).

    ``[$DPFT_DATA_DIR]`` if it is set (`DataError` if it does not exist), else the existing ones
    of ../shared/data and ../../shared/data, then the download cache (existing or not).
    """
    env = os.environ.get(ENV_VAR)
    if env:
        p = pathlib.Path(env).expanduser()
        if not p.is_dir():
            raise DataError(
                f"data directory {p} does not exist (set {ENV_VAR} to the data dir, or create it)"
            )
        return [p]
    found = [pathlib.Path(c) for c in _DEFAULTS if pathlib.Path(c).is_dir()]
    return [*found, download_dir()]


def data_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The data directory: ``override`` if given, else the first of `search_dirs` that exists.

    With ``override``, `DataError` naming it if it does not exist. Without, the download cache
    if no other directory exists (even before it is created).
    """
    if override:
        p = pathlib.Path(override).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist (config.data.data_dir)")
        return p
    dirs = search_dirs()
    return next((d for d in dirs if d.is_dir()), dirs[-1])


def _missing(p: pathlib.Path) -> DataError:
    return DataError(
        f"missing data file {p} (set {ENV_VAR} or config.data.data_dir, "
        "or fetch it with python -m dpft.download)"
    )


def data_file(relative: str, override: str | os.PathLike | None = None) -> pathlib.Path:
    """The file ``relative`` of the data layout, downloaded on first use if dpft knows it.

    With ``override`` only that directory is looked in. Raises `DataError` (one line naming the
    file) if it is missing and unknown, or if its download fails (`dpft.download.fetch`).
    """
    if override:
        p = data_dir(override) / relative
        if not p.is_file():
            raise _missing(p)
        return p
    dirs = search_dirs()
    for d in dirs:
        if (d / relative).is_file():
            return d / relative
    from dpft import download

    entry = download.find(relative)
    if entry is None:
        raise _missing(next((d for d in dirs if d.is_dir()), dirs[-1]) / relative)
    return download.fetch(entry, download_dir())


def data_path(relative: str, override: str | os.PathLike | None = None) -> pathlib.Path:
    """``relative`` (a known file or dataset folder, `dpft.download.entries_at`), fetched.

    The first of `search_dirs` that holds all its files, else the download directory, after
    downloading those it lacks. An unknown ``relative`` is joined onto `data_dir` without a
    download; with ``override``, onto that directory as it is.
    """
    if override:
        return data_dir(override) / relative
    from dpft import download

    entries = download.entries_at(relative)
    dirs = search_dirs()
    if not entries:
        return pathlib.Path(next((d for d in dirs if d.is_dir()), dirs[-1])) / relative
    for d in dirs:
        if all((d / e.path).is_file() for e in entries):
            return d / relative
    target = download_dir()
    for e in entries:
        if not (target / e.path).is_file():
            download.fetch(e, target)
    return target / relative
