"""dpft.download and the fetch-on-first-use of dpft.paths, against a local HTTP server.

The server (http.server in a daemon thread on 127.0.0.1, an ephemeral port) serves a temp dir
laid out like the data directory, records every requested path, and shuts itself down after
`SERVER_LIFETIME` seconds if a test never stops it. Every test runs from an empty temp working
directory (so ../shared/data and ../../shared/data do not exist) with HOME in a temp dir (so the
default cache ~/.cache/dpft is fresh), except where a fake ../shared/data is built on purpose.
The conversion tests need torch and are skipped without it.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import pytest

from dpft import download, paths
from dpft.paths import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # the public files that the served dirs link to
SERVER_LIFETIME = 600.0
T10K = ("mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz")

needs_shared = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(), reason=f"needs the public data in {SHARED}"
)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Server:
    """Serves ``root`` over HTTP; ``requests`` lists the paths asked for."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet; record instead
                outer.requests.append(self.path)

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.timer = threading.Timer(SERVER_LIFETIME, self.httpd.shutdown)
        self.timer.daemon = True

    def put(self, relative: str, source: pathlib.Path | bytes) -> pathlib.Path:
        dest = self.root / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            dest.write_bytes(source)
        else:
            dest.symlink_to(source)
        return dest


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "served")
    srv.root.mkdir()
    srv.thread.start()
    srv.timer.start()
    yield srv
    srv.timer.cancel()
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch, server):
    """Empty cwd and HOME, no DPFT_DATA_DIR, the mirror set to ``server``."""
    cwd = tmp_path / "a" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    monkeypatch.setenv(download.MIRROR_VAR, server.url)
    return tmp_path


def no_partial_files(folder: pathlib.Path) -> bool:
    return not folder.exists() or not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_registry_matches_the_shared_readme():
    readme = (SHARED / "README.md").read_text() if SHARED.is_dir() else ""
    for name, entries in download.REGISTRY.items():
        assert entries, name
        for e in entries:
            assert len(e.sha256) == 64 and e.url.startswith(("http://", "https://"))
            if readme:
                assert e.sha256 in readme, e.path
                assert (SHARED / e.path).stat().st_size == e.size, e.path
    assert download.entries_at("mnist/") == list(download.REGISTRY["mnist"])
    assert download.entries_at("./fashion-mnist") == list(download.REGISTRY["fashion_mnist"])
    assert download.entries_at(T10K[0]) == [download.find(T10K[0])]
    # folders of several names fetch nothing as a whole
    assert download.entries_at("pretrained") == download.entries_at("pretrained/resnet-cifar10")
    assert download.entries_at("pretrained/resnet-cifar10") == []
    assert download.find("mnist/nope.gz") is None and download.entries_at("mnist-extra") == []


@needs_shared
def test_mirror_download_into_the_cache_checks_sha256(env, server):
    for rel in T10K:
        server.put(rel, SHARED / rel)
    cache = env / "home" / ".cache" / "dpft"
    got = [paths.data_file(rel) for rel in T10K]
    assert got == [cache / rel for rel in T10K]
    for rel, p in zip(T10K, got, strict=True):
        assert sha256(p) == download.find(rel).sha256 == sha256(SHARED / rel)
    assert sorted(server.requests) == sorted(f"/{rel}" for rel in T10K)
    assert no_partial_files(cache / "mnist")
    # second use: from the cache, no request
    assert paths.data_file(T10K[0]) == got[0] and len(server.requests) == 2


@needs_shared
def test_corrupted_download_names_file_and_both_hashes_and_is_deleted(env, server):
    rel = T10K[1]
    bad = bytearray((SHARED / rel).read_bytes())
    bad[100] ^= 0xFF
    served = server.put(rel, bytes(bad))
    with pytest.raises(DataError) as excinfo:
        paths.data_file(rel)
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert rel in msg and f"{server.url}/{rel}" in msg
    assert download.find(rel).sha256 in msg and sha256(served) in msg
    folder = env / "home" / ".cache" / "dpft" / "mnist"
    assert not (folder / pathlib.Path(rel).name).exists()
    assert no_partial_files(folder)


def test_missing_file_404_is_one_line_naming_file_source_destination(env, server):
    rel = T10K[0]
    with pytest.raises(DataError) as excinfo:
        paths.data_file(rel)
    msg = str(excinfo.value)
    dest = env / "home" / ".cache" / "dpft" / rel
    assert "\n" not in msg and "404" in msg
    assert rel in msg and f"{server.url}/{rel}" in msg and str(dest) in msg
    assert not dest.exists() and no_partial_files(dest.parent)


def test_unreachable_source_is_one_line(env, server, monkeypatch):
    server.httpd.shutdown()
    server.httpd.server_close()  # nothing listens on the port any more
    with pytest.raises(DataError, match="cannot download mnist/t10k-labels") as excinfo:
        paths.data_file(T10K[1])
    assert "\n" not in str(excinfo.value) and server.url in str(excinfo.value)


def test_unknown_file_is_not_downloaded(env, server):
    with pytest.raises(DataError, match="missing data file .*mnist/extra.gz"):
        paths.data_file("mnist/extra.gz")
    assert server.requests == []


@needs_shared
def test_shared_data_is_looked_at_first(env, server):
    shared = env / "a" / "shared" / "data"  # ../shared/data from the cwd
    for rel in download.REGISTRY["mnist"]:
        server.put(rel.path, SHARED / rel.path)
    (shared / "mnist").mkdir(parents=True)
    shutil.copy(SHARED / T10K[1], shared / T10K[1])
    assert paths.data_file(T10K[1]) == pathlib.Path("../shared/data") / T10K[1]
    assert server.requests == []
    # a file ../shared/data lacks goes to the cache
    cache = env / "home" / ".cache" / "dpft"
    assert paths.data_file(T10K[0]) == cache / T10K[0]
    assert server.requests == [f"/{T10K[0]}"]
    # a folder: ../shared/data lacks some of its files, so data_path fetches them into the cache
    assert paths.data_dir() == pathlib.Path("../shared/data")
    assert paths.data_path("mnist") == cache / "mnist"
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(
        pathlib.Path(e.path).name for e in download.REGISTRY["mnist"]
    )
    assert len(server.requests) == 4
    assert paths.data_path("not-known") == pathlib.Path("../shared/data/not-known")
    assert paths.data_path("pretrained") == pathlib.Path("../shared/data/pretrained")
    assert len(server.requests) == 4


def test_explicit_data_dir_is_used_as_given(env, server, tmp_path):
    with pytest.raises(DataError, match="missing data file"):
        paths.data_file(T10K[0], override=tmp_path)
    assert paths.data_dir(tmp_path) / "mnist" == tmp_path / "mnist"
    assert server.requests == []


def test_conversion_without_torch_says_pip_install_torch(env, monkeypatch):
    monkeypatch.delenv(download.MIRROR_VAR)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(DataError) as excinfo:
        paths.data_file("pretrained/resnet-cifar10/resnet20.safetensors")
    msg = str(excinfo.value)
    assert "\n" not in msg and "pip install torch" in msg and "resnet20" in msg
    assert download.MIRROR_VAR in msg


@needs_shared
def test_conversion_of_a_torch_checkpoint(env, server, monkeypatch):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    monkeypatch.delenv(download.MIRROR_VAR)
    (entry,) = download.REGISTRY["resnet20"]
    # an akamaster-style checkpoint: DataParallel names, extra keys beside the state dict
    state = {f"module.{k}": torch.from_numpy(v) for k, v in load_file(SHARED / entry.path).items()}
    original = server.root / "orig.th"
    # the legacy (pre-zip) format of torch < 1.6, as the originals were written
    torch.save(
        {"state_dict": state, "best_prec1": 91.7}, original, _use_new_zipfile_serialization=False
    )
    digest = sha256(original)
    good = server.put(f"resnet20-{digest[:8]}.th", original.read_bytes())
    monkeypatch.setitem(
        download.REGISTRY,
        "resnet20",
        (download.dataclasses.replace(entry, url=f"{server.url}/{good.name}"),),
    )
    out = paths.data_file(entry.path)
    assert sha256(out) == entry.sha256  # byte for byte the shared file
    # a wrong prefix in the name: torch.hub-style check fails, nothing is written
    out.unlink()
    bad = server.put(f"resnet20-{'0' * 8}.th", original.read_bytes())
    monkeypatch.setitem(
        download.REGISTRY,
        "resnet20",
        (download.dataclasses.replace(entry, url=f"{server.url}/{bad.name}"),),
    )
    with pytest.raises(DataError, match=f"expected 00000000.*got {digest}"):
        paths.data_file(entry.path)
    assert not out.exists() and no_partial_files(out.parent)


@needs_shared
def test_torchvision_conversion_keeps_names_and_batchnorm(env, server, monkeypatch):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.numpy import load_file

    monkeypatch.delenv(download.MIRROR_VAR)
    (entry,) = download.REGISTRY["mobilenet_v2"]
    tensors = load_file(SHARED / entry.path)
    tensors["features.0.1.running_var"] = tensors["features.0.1.running_var"] * 0 + 2.5
    original = server.root / "orig.pth"
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, original)
    good = server.put(f"mobilenet_v2-{sha256(original)[:8]}.pth", original.read_bytes())
    replaced = download.dataclasses.replace(entry, url=f"{server.url}/{good.name}")
    monkeypatch.setitem(download.REGISTRY, "mobilenet_v2", (replaced,))
    out = load_file(paths.data_file(entry.path))
    assert sorted(out) == sorted(download.mobilenet_v2_names())
    assert all(out[k].dtype == v.dtype and (out[k] == v).all() for k, v in tensors.items())
    with safe_open(paths.data_file(entry.path), "np") as f:
        assert f.metadata()["source"] == replaced.url
    # a state dict of another model is refused, naming the source
    del tensors["classifier.1.bias"]
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, original)
    bad = server.put(f"mobilenet_v2-{sha256(original)[:8]}.pth", original.read_bytes())
    replaced = download.dataclasses.replace(entry, url=f"{server.url}/{bad.name}")
    monkeypatch.setitem(download.REGISTRY, "mobilenet_v2", (replaced,))
    paths.data_file(entry.path).unlink()
    with pytest.raises(DataError, match=f"{bad.name}: expected torchvision's mobilenet_v2"):
        paths.data_file(entry.path)


def run_cli(*args, cwd, env_vars):
    return subprocess.run(
        [sys.executable, "-m", "dpft.download", *args],
        cwd=cwd,
        env={**os.environ, **env_vars},
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_shared
def test_cli_exit_codes(env, server):
    for e in download.REGISTRY["mnist"]:
        server.put(e.path, SHARED / e.path)
    data = env / "data"
    data.mkdir()
    env_vars = {paths.ENV_VAR: str(data), download.MIRROR_VAR: server.url}
    ok = run_cli("mnist", cwd=os.getcwd(), env_vars=env_vars)
    assert ok.returncode == 0, ok.stderr
    printed = [pathlib.Path(line.split(" ", 1)[1]) for line in ok.stdout.splitlines()]
    assert printed == [data / e.path for e in download.REGISTRY["mnist"]]
    assert all(
        sha256(p) == e.sha256 for p, e in zip(printed, download.REGISTRY["mnist"], strict=True)
    )
    listed = run_cli("--list", cwd=os.getcwd(), env_vars=env_vars)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(download.REGISTRY)
    unknown = run_cli("mnist", "cifar11", cwd=os.getcwd(), env_vars=env_vars)
    assert unknown.returncode == 2 and "cifar11" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    failed = run_cli("fashion_mnist", cwd=os.getcwd(), env_vars=env_vars)  # not served: 404
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert "404" in lines[-1] and "fashion-mnist/train-images-idx3-ubyte.gz" in lines[-1]
    assert not (data / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()


@needs_shared
def test_fresh_machine_smoke_run_downloads_what_it_needs(env, server):
    """``python -m dpft`` with an empty DPFT_DATA_DIR, from a cwd without ../shared/data.

    The real data dir is out of reach twice over: with DPFT_DATA_DIR set only that directory is
    looked in, and the cwd (a temp dir) has no ../shared/data or ../../shared/data.
    """
    needed = [*download.REGISTRY["fashion_mnist"], *download.REGISTRY["resnet20"]]
    for e in needed:
        server.put(e.path, SHARED / e.path)
    data, workdir = env / "data", env / "run"
    data.mkdir()
    assert not pathlib.Path("../shared/data").exists()
    proc = subprocess.run(
        [
            sys.executable, "-m", "dpft",
            f"--config={REPO / 'configs' / 'fmnist_resnet20.py'}:smoke",
            f"--workdir={workdir}",
            "--config.data.train_subset=512", "--config.data.eval_subset=128",
            "--config.train.steps=2",
            "--config.dp.accountant=rdp",  # the run's accountant is not what is tested here
        ],
        env={
            **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},  # one device
            paths.ENV_VAR: str(data), download.MIRROR_VAR: server.url,
        },
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert sorted(server.requests) == sorted(f"/{e.path}" for e in needed)
    for e in needed:
        assert sha256(data / e.path) == e.sha256
