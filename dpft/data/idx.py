"""Reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or plain, with strict checks.

An IDX file is a 4-byte magic ``00 00 TYPE NDIM``, then ``NDIM`` big-endian uint32 dimensions,
then the row-major payload in the element type named by ``TYPE`` (0x08 = uint8, ...). The
reader streams the payload straight into a preallocated array, so a 47 MB image file is held in
memory once, and it checks everything a corrupt or truncated download could break:

* the file exists (else the message says to set ``DPFT_DATA_DIR`` or ``config.data.data_dir``),
* a ``.gz`` file really is a complete gzip stream (not garbage, not truncated, CRC intact),
* the magic number (and, if asked, the number of dimensions and the element type),
* the payload has exactly ``prod(dims) * itemsize`` bytes, no fewer and no more.

Every failure raises `dpft.paths.DataError` with a single line naming the file.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib
from typing import BinaryIO

import numpy as np

from dpft.paths import ENV_VAR, DataError

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

# IDX type byte -> numpy dtype (multi-byte types are big-endian in the file).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 16
_CHUNK = 1 << 22  # bytes read per call while filling the payload


def _one_line(err: BaseException) -> str:
    """An exception as a short single-line string (type name if it has no message)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the stream."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _fill(f: BinaryIO, out: np.ndarray) -> int:
    """Reads into the bytes of ``out`` until it is full or the stream ends; returns bytes read."""
    view = memoryview(out.reshape(-1).view(np.uint8))  # 1-D bytes, also when empty
    got = 0
    while got < len(view):
        n = f.readinto(view[got : got + _CHUNK])
        if not n:
            break
        got += n
    return got


def _parse(f: BinaryIO, path: pathlib.Path, expect_ndim: int | None, expect_dtype) -> np.ndarray:
    magic = _read_exact(f, 4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
        raise DataError(
            f"corrupt data file {path}: expected an IDX magic 00 00 <type> <ndim> "
            f"(e.g. 00000803 for images, 00000801 for labels), got {magic.hex() or 'nothing'}"
        )
    dtype, ndim = IDX_DTYPES[magic[2]], magic[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataError(
            f"corrupt data file {path}: expected an IDX file with {expect_ndim} dimensions "
            f"(magic {magic[:3].hex()}{expect_ndim:02x}), got {ndim} (magic {magic.hex()})"
        )
    if expect_dtype is not None and dtype.newbyteorder("=") != np.dtype(expect_dtype):
        raise DataError(
            f"corrupt data file {path}: expected IDX elements of type {np.dtype(expect_dtype)}, "
            f"header says {dtype.newbyteorder('=')}"
        )
    if not 0 < ndim <= _MAX_NDIM:
        raise DataError(
            f"corrupt data file {path}: expected 1..{_MAX_NDIM} dims, header has {ndim}"
        )
    header = _read_exact(f, 4 * ndim)
    if len(header) < 4 * ndim:
        raise DataError(
            f"corrupt data file {path}: truncated IDX header, expected {ndim} uint32 dimensions"
        )
    dims = tuple(int(d) for d in np.frombuffer(header, ">u4"))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    out = np.empty(dims, dtype)
    got = _fill(f, out)
    extra = len(_read_exact(f, 1)) if got == expected else 0
    if got != expected or extra:
        found = "trailing bytes after them" if extra else f"only {got}"
        raise DataError(
            f"corrupt data file {path}: header says shape {dims} {dtype.name}, so expected "
            f"{expected} payload bytes, found {found}"
        )
    return out.astype(dtype.newbyteorder("="), copy=False)


def read_idx(
    path: str | os.PathLike,
    expect_ndim: int | None = None,
    expect_dtype: np.dtype | type | str | None = None,
) -> np.ndarray:
    """Reads an IDX file (gzip-compressed if it starts with the gzip magic) into a numpy array.

    Args:
        path: The file. ``*.gz`` files must be gzip streams; other files may be either.
        expect_ndim: If given, the number of dimensions the header must declare.
        expect_dtype: If given, the element type the header must declare (e.g. ``np.uint8``).

    Returns:
        A writable array of the declared shape, in native byte order.

    Raises:
        DataError: one line naming ``path`` and what was expected, if the file is missing, is not
            a valid (complete) gzip stream, has a bad magic number, or a payload whose length does
            not match its header.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"missing data file {path} (set {ENV_VAR} or config.data.data_dir)")
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if path.suffix == ".gz" and not is_gzip:
                raise DataError(
                    f"corrupt data file {path}: expected a gzip file (magic 1f8b), "
                    "got other bytes; re-download it"
                )
            if not is_gzip:
                return _parse(raw, path, expect_ndim, expect_dtype)
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                return _parse(f, path, expect_ndim, expect_dtype)
    except DataError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"corrupt data file {path}: expected a complete gzip stream ({_one_line(e)}); "
            "re-download it"
        ) from None
    except OSError as e:
        raise DataError(f"unreadable data file {path}: {_one_line(e)}") from None


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Writes ``array`` as an IDX file (gzipped if ``compress``, default: the name ends in .gz).

    The inverse of `read_idx`, for tests and for preparing small local datasets.
    """
    path = pathlib.Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(
            f"IDX cannot store dtype {array.dtype}; use one of {sorted(map(str, codes))}"
        )
    if not 0 < array.ndim <= _MAX_NDIM:
        raise ValueError(f"IDX needs 1..{_MAX_NDIM} dimensions, got {array.ndim}")
    code = codes[native]
    data = (
        bytes([0, 0, code, array.ndim])
        + np.asarray(array.shape, ">u4").tobytes()
        + np.ascontiguousarray(array, IDX_DTYPES[code]).tobytes()
    )
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(data) if compress else data)
