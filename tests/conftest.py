"""Set-up and helpers shared by the test files.

* The tests run on the CPU with 8 host devices, so that multi-device tests run on one machine.
* `needs_data` / `have_data`: skip a test when the public data directory (or a file in it) is
  not there.
* The ``compilation_cache`` fixture turns on JAX's persistent compilation cache for a module
  whose tests train the same programs several times (a resumed run next to an uninterrupted one,
  the same model on another code path): a program already compiled in this pytest worker is
  loaded instead of being compiled again. The cache is keyed by the lowered program and the
  compiler options, so every run still traces and lowers its own program and executes the same
  machine code it would have compiled; subprocesses share the same cache through `cli_env`.
* The ``shared_run`` fixture trains a config once per module, for the tests that compare with
  the same uninterrupted run.
* `tiny_mnist_config` is the tiny MNIST run of the trainer tests (test_train, test_correlated).
* `fed_config` is the federated run settings of the federated tests, with their defaults.
* `latest_checkpoint` and `crash_at_metrics` are the checkpoint reader and the simulated crash
  that the resume tests use.
* `run_two_processes` launches a script as the two processes of a multi-process JAX run.
* The test files run slowest first (`SLOWEST_FILES`): `make test` hands whole files to the
  workers in that order (``--dist loadfile --no-loadscope-reorder``), so the short files fill
  in at the end instead of one long file running alone on one worker.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 host devices for the mesh tests; XLA's backend optimisation off: the tests' programs are
# small and run a few steps, so compiling them dominates (results equal up to float rounding).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)


# Slowest first, by the per-file seconds of a clean-clone `make test` (2 workers on 2 cores);
# the other files follow in their usual order. Only the order changes, never what runs.
SLOWEST_FILES = (
    "test_train.py",
    "test_ghost.py",
    "test_federated.py",
    "test_mobilenet.py",
    "test_crash.py",
    "test_adaptive.py",
    "test_peft.py",
    "test_stream.py",
    "test_download.py",
    "test_user_level.py",
    "test_federated_adaptive.py",
    "test_vit_train.py",
    "test_bench_device.py",
    "test_augmult.py",
    "test_pretrained_torchvision.py",
    "test_federated_privacy.py",
    "test_distributed.py",
    "test_imagenet_vit.py",
    "test_federated_lp_ft.py",
    "test_finetune.py",
    "test_accounting.py",
    "test_grouped_conv_nonfinite.py",
    "test_scatternet.py",
    "test_conv.py",
    "test_audit.py",
    "test_models.py",
)


def pytest_collection_modifyitems(items):
    """Runs the files of `SLOWEST_FILES` first, slowest first (a stable sort: each file's tests
    keep their order and stay together)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def have_data(*files: str) -> bool:
    """True if the data directory is there and holds ``files`` (relative paths in it)."""
    from dpft import paths

    try:
        paths.data_dir()
        for f in files:
            paths.data_file(f)
    except paths.DataError:
        return False
    return True


needs_data = pytest.mark.skipif(not have_data(), reason="no data dir (set DPFT_DATA_DIR)")


@pytest.fixture
def ghost_traces(monkeypatch):
    """A list that grows by one each time `dpft.privacy.ghost.GhostNorms` is called (traced)."""
    from dpft.privacy.ghost import GhostNorms

    traced = []
    original = GhostNorms.__call__

    def counting(self, *args, **kwargs):
        traced.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GhostNorms, "__call__", counting)
    return traced


@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory) -> pathlib.Path:
    """The persistent compilation cache of this pytest worker (in- and out-of-process runs)."""
    return tmp_path_factory.mktemp("xla_cache")


_CACHE_OPTIONS = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


@pytest.fixture(scope="module")
def compilation_cache(xla_cache_dir):
    """JAX's persistent compilation cache in `xla_cache_dir` while the module's tests run.

    Restored on exit (cache off again), so other modules compile as they would alone.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ["jax_compilation_cache_dir", *_CACHE_OPTIONS]
    before = {name: getattr(jax.config, name) for name in names}
    for name, value in {"jax_compilation_cache_dir": str(xla_cache_dir), **_CACHE_OPTIONS}.items():
        jax.config.update(name, value)
    cc.reset_cache()  # re-read the settings at the next compilation
    yield xla_cache_dir
    for name, value in before.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture
def cli_env(xla_cache_dir) -> dict:
    """Environment for a ``python -m dpft`` subprocess: this one's, on the CPU, sharing the
    worker's compilation cache."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(xla_cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """``run(name, config)``: ``(summary, workdir)`` of ``train_and_evaluate(config, ...)``,
    trained on the first call with that ``name`` in the module and reused afterwards.

    The first call runs inside the calling test, under its monkeypatches. A later call with the
    same name must pass the same config (checked), so a shared run is what each test asks for.
    """
    runs: dict = {}

    def run(name: str, config):
        from dpft.train import train_and_evaluate

        as_json = config.to_json_best_effort(sort_keys=True)
        if name not in runs:
            workdir = tmp_path_factory.mktemp(name)
            runs[name] = (as_json, train_and_evaluate(config, workdir), workdir)
        saved, summary, workdir = runs[name]
        assert saved == as_json, f"shared run {name!r} was trained with another config"
        return summary, workdir

    return run


def tiny_mnist_config(name: str = "tiny", **dp):
    """The tiny MNIST run of the trainer tests: 6 DP-SGD steps of ``sample_convnet`` on 600
    training examples (expected batch 32 under a Poisson cap of 96, in 6 microbatches of 16),
    noise multiplier 2 at clip norm 1, delta 1e-4, metrics every 2 steps, evaluation on 200
    examples and a checkpoint every 3 steps; ``dp`` overrides fields of ``config.dp``.

    With noise multiplier 2 the PLD epsilon logged every other step is much cheaper to compute
    than at 1, and what the tests check does not depend on it.
    """
    from dpft.config import base_config

    c = base_config()
    c.name, c.tensorboard, c.eval_batch_size = name, False, 100
    c.model.name = "sample_convnet"
    c.data.update(name="mnist", train_subset=600, eval_subset=200)
    c.dp.update({"noise_multiplier": 2.0, "clip_norm": 1.0, "delta": 1e-4, **dp})
    c.train.update(batch_size=32, max_batch_size=96, microbatch_size=16, steps=6)
    c.train.update(learning_rate=0.5, log_every=2, eval_every=3, checkpoint_every=3)
    return c


FED_DEFAULTS = {"local_steps": 2, "dp": "client", "accountant": "rdp"}


def fed_config(**overrides):
    """`dpft.federated.driver.FedConfig` of the federated tests: client-level DP (DP-FedAvg),
    2 local steps a round and RDP accounting (PLD is checked on its own; RDP keeps the runs
    fast), the other fields at FedConfig's defaults; ``overrides`` set any field."""
    from dpft.federated import driver

    return driver.FedConfig(**{**FED_DEFAULTS, **overrides})


def latest_checkpoint(workdir) -> tuple[list, dict]:
    """(arrays, meta) of the newest checkpoint in ``workdir`` (the trainer's layout)."""
    from dpft.train.checkpoint import Checkpointer

    ck = Checkpointer(workdir)
    try:
        return ck.load_arrays(ck.latest_step())
    finally:
        ck.close()


@contextlib.contextmanager
def crash_at_metrics(step: int):
    """A simulated crash: inside the block, the run raises KeyboardInterrupt when it writes the
    metrics of ``step`` (after the step ran, before its checkpoint); the block must crash."""
    from dpft.train import report

    original = report.MetricsWriter.write

    def write(self, at, record):
        if at == step:
            raise KeyboardInterrupt("simulated crash")
        return original(self, at, record)

    report.MetricsWriter.write = write
    try:
        with pytest.raises(KeyboardInterrupt, match="simulated crash"):
            yield
    finally:
        report.MetricsWriter.write = original


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_two_processes(argv_of, timeout: float = 300) -> list[str]:
    """Runs ``argv_of(i)`` as processes i = 0, 1 of one JAX run (2 CPU devices each, the
    coordinator on a free local port, ``DPFT_PROCESS_ID=i``); returns their logs after asserting
    that both exited 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "DPFT_COORDINATOR": f"127.0.0.1:{port}",
        "DPFT_NUM_PROCESSES": "2",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, *map(str, argv_of(i))],
            env={**env, "DPFT_PROCESS_ID": str(i)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    return logs
