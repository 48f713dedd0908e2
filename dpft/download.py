"""The public files dpft's configs need, where they come from, and fetching them safely.

`REGISTRY` maps a name to its files, each a `Remote` at a path of the data layout (see
`dpft.paths`):

* ``mnist``, ``fashion_mnist``: the 4 original gzipped IDX files each, from torchvision's MNIST
  mirror and from Zalando's Fashion-MNIST bucket, checked against their full sha256.
* ``resnet20`` … ``resnet56``: CIFAR-10 ResNets as safetensors in PyTorch's names. The public
  originals are Idelbayev's ``torch.save`` checkpoints (akamaster/pytorch_resnet_cifar10,
  ``pretrained_models/resnet20-12fca82f.th`` etc.): ``{'state_dict': ...}`` of a DataParallel
  model (names prefixed ``module.``). No full sha256 of the originals is recorded, so the
  original is checked as torch.hub's ``check_hash`` does: the hex digits between a ``-`` and the
  next ``.`` of its file name (torch.hub's ``HASH_REGEX``) must be a prefix of its sha256. The
  conversion drops the ``module.`` prefix and any ``num_batches_tracked`` and writes the float32
  tensors with ``safetensors.numpy`` (no metadata); the result must then match the full sha256
  of the converted file, which is that of the shared data directory's copy.
* ``mobilenet_v2``: torchvision's float ImageNet weights (``mobilenet_v2-b0353104.pth``, whose
  name carries its sha256 prefix, checked as above) converted to safetensors with torchvision's
  state-dict names (314 tensors) and real BatchNorm statistics. The file a mirror serves
  (`Remote.sha256`) is a folded-BatchNorm variant with the same names and shapes, so one loader
  reads both; the conversion has no full sha256 to match, its names are checked instead.

Conversions import torch (an optional dependency; ``pip install torch``) and read the pickle
with ``torch.load(..., weights_only=True)``. With ``DPFT_DOWNLOAD_MIRROR=URL`` every file
comes from ``URL/<path in the data layout>`` instead (``URL/fashion-mnist/<file>``,
``URL/pretrained/resnet-cifar10/resnet20.safetensors``, ...), already converted and checked
against its full sha256, so a mirror (e.g. ``python -m http.server`` in a data directory) needs
no torch.

A download streams into a temporary file beside its target, hashing as it goes (progress on
stderr), and is renamed into place only once its hash matches; any failure deletes it and raises
`dpft.paths.DataError` with one line naming the file, the URL and the fix.

    python -m dpft.download --list
    python -m dpft.download fashion_mnist resnet20     # fetch ahead of time, print the paths
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import re
import sys
import tempfile
import urllib.error
import urllib.request

from dpft import paths
from dpft.paths import DataError

MIRROR_VAR = "DPFT_DOWNLOAD_MIRROR"
#: Seconds a connection attempt or any single read may take.
TIMEOUT = 60.0
_CHUNK = 1 << 20
# torch.hub's HASH_REGEX: the digits after a '-' and before a '.' in the file name
_HASH_PREFIX = re.compile(r"-([a-f0-9]*)\.")
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FMNIST = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_AKAMASTER = "https://raw.githubusercontent.com/akamaster/pytorch_resnet_cifar10/master/"
_TORCHVISION = "https://download.pytorch.org/models/"


@dataclasses.dataclass(frozen=True)
class Remote:
    """One file of the data layout and its public source.

    Attributes:
        path: Path inside the data directory, e.g. ``mnist/t10k-images-idx3-ubyte.gz``.
        sha256: Full sha256 of the file dpft reads (what a mirror serves).
        size: Its size in bytes.
        url: The public source: the file itself, or (``convert`` set) a torch pickle.
        convert: '' (``url`` serves the file), 'resnet_cifar' or 'torchvision'.
        converted_sha256: Whether the conversion reproduces ``sha256`` (checked if so).
    """

    path: str
    sha256: str
    size: int
    url: str
    convert: str = ""
    converted_sha256: bool = False


def _idx(folder: str, base: str, digests: dict[str, tuple[str, int]]) -> tuple[Remote, ...]:
    return tuple(Remote(f"{folder}/{f}", h, n, base + f) for f, (h, n) in digests.items())


def _resnet(depth: int, tag: str, sha256: str, size: int) -> tuple[Remote, ...]:
    url = f"{_AKAMASTER}pretrained_models/resnet{depth}-{tag}.th"
    path = f"pretrained/resnet-cifar10/resnet{depth}.safetensors"
    return (Remote(path, sha256, size, url, "resnet_cifar", converted_sha256=True),)


REGISTRY: dict[str, tuple[Remote, ...]] = {
    "mnist": _idx(
        "mnist",
        _MNIST,
        {
            "train-images-idx3-ubyte.gz": (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                9912422,
            ),
            "train-labels-idx1-ubyte.gz": (
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                28881,
            ),
            "t10k-images-idx3-ubyte.gz": (
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                1648877,
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                4542,
            ),
        },
    ),
    "fashion_mnist": _idx(
        "fashion-mnist",
        _FMNIST,
        {
            "train-images-idx3-ubyte.gz": (
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                26421880,
            ),
            "train-labels-idx1-ubyte.gz": (
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                29515,
            ),
            "t10k-images-idx3-ubyte.gz": (
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                4422102,
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                5148,
            ),
        },
    ),
    "resnet20": _resnet(
        20, "12fca82f", "02926273efb1deadb6dc654c7087baea932ef2026d9f854680d6858146d85838", 1092520
    ),
    "resnet32": _resnet(
        32, "d509ac18", "897ca9a2e3e0f83d51ba9f0b65434c9242c2d4c896ded18d40f5bab4254875da", 1878968
    ),
    "resnet44": _resnet(
        44, "014dd654", "c0e417f177f2f9e763c00e58d95804957cda4a81899671d43ee57b972594bc76", 2665480
    ),
    "resnet56": _resnet(
        56, "4bfd9763", "cf29b05e3acebb9dc28868ebd84a604ff452971bb6770f22beaff48708079aee", 3451984
    ),
    "mobilenet_v2": (
        Remote(
            "pretrained/imagenet/mobilenet_v2.safetensors",
            "3a3039cdb079c4e30441a5b133d193da2b76ea84eb5624341d193ae2bb9d0797",
            14186608,
            _TORCHVISION + "mobilenet_v2-b0353104.pth",
            "torchvision",
        ),
    ),
}


def find(relative: str) -> Remote | None:
    """The `Remote` at path ``relative`` of the data layout, or None if dpft does not know it."""
    rel = _norm(relative)
    return next((e for es in REGISTRY.values() for e in es if e.path == rel), None)


def entries_at(relative: str) -> list[Remote]:
    """What fetching ``relative`` means: ``[its Remote]`` for a known file; all files of one name
    for the folder that holds exactly that name's files (``mnist``, ``fashion-mnist``); else []
    (a folder shared by several names, e.g. ``pretrained/resnet-cifar10``, fetches nothing)."""
    entry = find(relative)
    if entry is not None:
        return [entry]
    rel = _norm(relative)
    under = [n for n, es in REGISTRY.items() if any(e.path.startswith(rel + "/") for e in es)]
    if len(under) == 1 and all(e.path.startswith(rel + "/") for e in REGISTRY[under[0]]):
        return list(REGISTRY[under[0]])
    return []


def _norm(relative: str) -> str:
    return pathlib.PurePosixPath(relative).as_posix().removeprefix("./").rstrip("/")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _by_hand(dest: pathlib.Path) -> str:
    return f"put it at {dest} by hand, or set {MIRROR_VAR} to a mirror of the data directory"


def _stream(url: str, tmp: pathlib.Path, entry: Remote, dest: pathlib.Path) -> str:
    """Writes ``url`` to ``tmp`` and returns its sha256; `DataError` (one line) on failure."""
    from tqdm import tqdm

    print(f"dpft: downloading {url} -> {dest}", file=sys.stderr)
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "dpft"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=None
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        raise DataError(
            _one_line(
                f"cannot download {entry.path} from {url} ({reason or type(e).__name__}): "
                + _by_hand(dest)
            )
        ) from None
    return digest.hexdigest()


def _mismatch(entry: Remote, url: str, expected: str, got: str, dest: pathlib.Path) -> DataError:
    return DataError(
        f"sha256 mismatch for {entry.path} from {url}: expected {expected}, got {got} "
        f"(the download was deleted; {_by_hand(dest)})"
    )


def _import_torch(entry: Remote):
    try:
        import torch
    except ImportError:
        raise DataError(
            f"pip install torch is needed for converting {_name_of(entry)} ({entry.url} is a "
            f"torch pickle), or set {MIRROR_VAR} to a mirror that serves {entry.path}"
        ) from None
    return torch


def _name_of(entry: Remote) -> str:
    return next(n for n, es in REGISTRY.items() if entry in es)


def mobilenet_v2_names() -> list[str]:
    """The 314 tensor names of torchvision's ``mobilenet_v2`` state dict (BatchNorm included)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def conv_bn(prefix: str) -> list[str]:
        return [f"{prefix}.0.weight", *(f"{prefix}.1.{s}" for s in bn)]

    names = conv_bn("features.0")
    names += [*conv_bn("features.1.conv.0"), "features.1.conv.1.weight"]
    names += [f"features.1.conv.2.{s}" for s in bn]
    for i in range(2, 18):
        names += [*conv_bn(f"features.{i}.conv.0"), *conv_bn(f"features.{i}.conv.1")]
        names += [f"features.{i}.conv.2.weight", *(f"features.{i}.conv.3.{s}" for s in bn)]
    return [*names, *conv_bn("features.18"), "classifier.1.weight", "classifier.1.bias"]


def convert(kind: str, state: object, source: str) -> dict:
    """numpy tensors of a loaded torch checkpoint ``state`` in dpft's names (see module doc).

    ``kind``: 'resnet_cifar' or 'torchvision'. `DataError` (one line naming ``source``) if the
    checkpoint does not hold the expected state dict.
    """
    import numpy as np

    if kind == "resnet_cifar" and isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise DataError(f"{source}: expected a torch state dict, got {type(state).__name__}")
    tensors = {}
    for key, value in state.items():
        name = key.removeprefix("module.") if kind == "resnet_cifar" else key
        if kind == "resnet_cifar" and name.endswith(".num_batches_tracked"):
            continue
        if not hasattr(value, "numpy"):
            raise DataError(f"{source}: expected tensors, {key!r} is a {type(value).__name__}")
        array = np.ascontiguousarray(value.detach().cpu().numpy())
        tensors[name] = array.astype(np.float32) if kind == "resnet_cifar" else array
    if kind == "torchvision":
        want = set(mobilenet_v2_names())
        extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
        if extra or missing:
            raise DataError(
                f"{source}: expected torchvision's mobilenet_v2 state dict, got "
                f"{len(missing)} missing tensors {missing[:2]} and {len(extra)} others {extra[:2]}"
            )
    return tensors


def _fetch_converted(entry: Remote, dest: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    torch = _import_torch(entry)
    original, converted = (_temp(dest.parent, n) for n in (entry.url.rsplit("/", 1)[-1], dest.name))
    try:
        digest = _stream(entry.url, original, entry, dest)
        match = _HASH_PREFIX.search(entry.url.rsplit("/", 1)[-1])
        prefix = match.group(1) if match else ""
        if not digest.startswith(prefix):
            raise _mismatch(entry, entry.url, f"{prefix}... (in the file name)", digest, dest)
        try:
            state = torch.load(original, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable pickle is one DataError line
            raise DataError(
                _one_line(f"{entry.url}: not a readable torch checkpoint ({e})")
            ) from None
        # no metadata where the result must reproduce a known sha256 byte for byte
        metadata = None if entry.converted_sha256 else {"source": entry.url}
        save_file(convert(entry.convert, state, entry.url), converted, metadata=metadata)
        got = _sha256(converted)
        if entry.converted_sha256 and got != entry.sha256:
            raise _mismatch(entry, entry.url + " (converted)", entry.sha256, got, dest)
        os.replace(converted, dest)
    finally:
        original.unlink(missing_ok=True)
        converted.unlink(missing_ok=True)


def _temp(folder: pathlib.Path, name: str) -> pathlib.Path:
    """A new empty hidden file ``.NAME.*.part`` in ``folder`` (same file system as the target)."""
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    os.close(fd)
    return pathlib.Path(path)


def _sha256(file: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(entry: Remote, root: str | os.PathLike) -> pathlib.Path:
    """Downloads ``entry`` to ``root/entry.path`` (from the mirror if set) and returns that path.

    Raises `DataError` (one line) on a network or HTTP error, a hash mismatch, or a needed
    conversion without torch; nothing is left at the target then.
    """
    dest = pathlib.Path(root) / entry.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    mirror = os.environ.get(MIRROR_VAR, "").rstrip("/")
    if entry.convert and not mirror:
        _fetch_converted(entry, dest)
        return dest
    url = f"{mirror}/{entry.path}" if mirror else entry.url
    tmp = _temp(dest.parent, dest.name)
    try:
        got = _stream(url, tmp, entry, dest)
        if got != entry.sha256:
            raise _mismatch(entry, url, entry.sha256, got, dest)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m dpft.download [--list] NAME...``: fetch ahead of time, print where each is."""
    args = sys.argv[1:] if argv is None else argv
    if "--list" in args:
        for name, entries in REGISTRY.items():
            size = sum(e.size for e in entries)
            source = entries[0].url.rsplit("/", 1)[0] + "/"
            print(f"{name:14s} {len(entries)} file(s) {size:>11,d} bytes  from {source}")
        return 0
    unknown = [a for a in args if a not in REGISTRY]
    if not args or unknown:
        what = f"unknown name {unknown[0]!r}" if unknown else "no name given"
        print(
            f"dpft.download: {what}: expected --list or names from {list(REGISTRY)}",
            file=sys.stderr,
        )
        return 2
    try:
        for name in args:
            for entry in REGISTRY[name]:
                print(f"{name} {paths.data_file(entry.path).resolve()}")
    except DataError as e:
        print(f"dpft.download: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
