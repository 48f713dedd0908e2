"""Crash safety and randomness modes of a run.

The crash harness runs the CLI as a subprocess and SIGKILLs it at targeted points (through the
trainer's test hook ``DPFT_TEST_KILL_AT=POINT:STEP``: inside a step, after an eval, after a
metrics line, while orbax writes a checkpoint) and after random delays, rerunning in the same
workdir after every kill. It then checks that

* every rerun resumes from the newest COMPLETE checkpoint (never an orbax temporary dir);
* every checkpoint in the workdir, and the final one, equals the uninterrupted run's (arrays and
  JSON record: ledger, sampler state);
* each checkpoint's ledger covers exactly the steps reflected in it, and no epsilon in
  metrics.jsonl is below the ledger's epsilon for that step;
* metrics.jsonl has each step exactly once, with the uninterrupted run's values.

The subprocesses share the pytest worker's persistent XLA compilation cache (conftest
``cli_env``) with the in-process runs of this module, which train the same program: the harness,
last in the module, then compiles nothing. The runs use noise multiplier 2, for which each PLD
epsilon (one per logged step) costs a quarter of what it costs at 1.
"""

import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import crash_at_metrics, latest_checkpoint, needs_data

from dpft.privacy import accounting, keys
from dpft.train import trainer
from dpft.train.checkpoint import Checkpointer

pytestmark = pytest.mark.usefixtures("compilation_cache")

STEPS = 6
DELTA = 1e-4
SIGMA = 2.0
CAP = 48  # the Poisson batch cap of every run here (not left to depend on the steps)
CONFIG = f"""
from dpft.config import base_config


def get_config():
    c = base_config()
    c.name = "crash"
    c.tensorboard = False
    c.data.name = "mnist"
    c.data.train_subset = 600
    c.data.eval_subset = 100
    c.dp.noise_multiplier = {SIGMA}
    c.dp.delta = {DELTA}
    c.train.batch_size = 16
    c.train.max_batch_size = {CAP}
    c.train.steps = {STEPS}
    c.train.learning_rate = 0.5
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 1
    c.train.keep_checkpoints = 100  # keep all: every one is compared with the reference
    c.eval_batch_size = 100
    return c
"""
ROOT = pathlib.Path(__file__).resolve().parents[1]
RESUME = re.compile(r"resuming \S+ from step (\d+)")


def _env(cli_env: dict, kill_at: str = "") -> dict:
    env = dict(cli_env)
    env.pop(trainer._KILL_ENV, None)
    if kill_at:
        env[trainer._KILL_ENV] = kill_at
    return env


def _cli(config: pathlib.Path, workdir: pathlib.Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dpft", "--config", str(config), "--workdir", str(workdir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _complete_steps(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _tmp_dirs(workdir: pathlib.Path) -> list[str]:
    d = workdir / "checkpoints"
    return sorted(p.name for p in d.iterdir() if not p.name.isdigit()) if d.is_dir() else []


def _metric_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _wait_for_checkpoint(proc: subprocess.Popen, workdir: pathlib.Path, step: int, timeout=300):
    """Waits until checkpoint ``step`` is complete (or the process ends); True if it is."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if step in _complete_steps(workdir):
            return True
        time.sleep(0.01)
    return False


def _checkpoint(workdir: pathlib.Path, step: int):
    ck = Checkpointer(workdir)
    try:
        return ck.load_arrays(step)
    finally:
        ck.close()


# --------------------------------------------------------------------------- randomness modes


def _tiny(steps=2, secure=False):
    from dpft.config import base_config

    c = base_config()
    c.name = "tiny"
    c.tensorboard = False
    c.data.name = "mnist"
    c.data.train_subset = 600
    c.data.eval_subset = 100
    c.dp.noise_multiplier = SIGMA
    c.dp.delta = DELTA
    c.dp.secure_noise = secure
    c.train.batch_size = 16
    c.train.max_batch_size = CAP
    c.train.steps = steps
    c.train.learning_rate = 0.5
    c.train.log_every = 1
    c.train.eval_every = steps
    c.train.checkpoint_every = 1
    c.train.keep_checkpoints = 100
    c.eval_batch_size = 100
    return c


_params = latest_checkpoint


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@needs_data
def test_secure_noise_runs_differ_reproducible_runs_match(tmp_path, monkeypatch):
    from dpft.train import train_and_evaluate

    drawn = []
    original = keys.secrets.randbits

    def spy(k):
        drawn.append(original(k))
        return drawn[-1]

    monkeypatch.setattr(keys.secrets, "randbits", spy)
    train_and_evaluate(_tiny(), tmp_path / "r1")
    train_and_evaluate(_tiny(), tmp_path / "r2")
    assert drawn == []  # reproducible mode never touches OS entropy
    train_and_evaluate(_tiny(secure=True), tmp_path / "s1")
    train_and_evaluate(_tiny(secure=True), tmp_path / "s2")
    assert len(drawn) == 2 and drawn[0] != drawn[1]
    r1, r2 = _params(tmp_path / "r1")[0], _params(tmp_path / "r2")[0]
    (s1, m1), (s2, m2) = _params(tmp_path / "s1"), _params(tmp_path / "s2")
    assert _same(r1, r2)
    assert not _same(s1, s2) and not _same(s1, r1)
    assert m1["ledger"] == m2["ledger"]  # the same privacy spent
    # the secret is inside the checkpoints only: not in config.json, metrics or summary
    assert m1["secure_seed"] == drawn[0]
    secret = str(drawn[0])
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["dp"]["secure_noise"]
    for path in (tmp_path / "s1").rglob("*"):
        if path.is_file() and "checkpoints" not in path.parts:
            assert secret not in path.read_bytes().decode("latin-1"), path
    # reproducible config.json is unchanged by the new key (old workdirs still resume)
    assert "secure_noise" not in json.loads((tmp_path / "r1" / "config.json").read_text())["dp"]


@needs_data
def test_secure_run_resumes_exactly_with_its_checkpointed_secret(tmp_path, monkeypatch):
    from dpft.train import train_and_evaluate

    secrets_ = iter([12345678901234567890, 12345678901234567890, 98765432109876543210])
    monkeypatch.setattr(keys.secrets, "randbits", lambda k: next(secrets_))
    train_and_evaluate(_tiny(steps=3, secure=True), tmp_path / "full")
    with crash_at_metrics(2):
        train_and_evaluate(_tiny(steps=3, secure=True), tmp_path / "resumed")
    assert _complete_steps(tmp_path / "resumed") == [0, 1]  # the secret persisted before step 1
    # the resume draws a different secret from the OS but must use the checkpointed one
    train_and_evaluate(_tiny(steps=3, secure=True), tmp_path / "resumed")
    (a, ma), (b, mb) = _params(tmp_path / "full"), _params(tmp_path / "resumed")
    assert ma["step"] == mb["step"] == 3 and ma["secure_seed"] == mb["secure_seed"]
    assert _same(a, b)


# ------------------------------------------------------------------------------ crash harness


@needs_data
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, cli_env):
    config = tmp_path / "crash_config.py"
    config.write_text(CONFIG)
    seed = int(os.environ.get("DPFT_CRASH_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    print(f"crash harness seed {seed} (rerun with DPFT_CRASH_SEED={seed})")

    reference = _cli(config, tmp_path / "reference", _env(cli_env))  # runs alongside the kills
    work = tmp_path / "crashed"
    # targeted points (step numbers are those of the run's 1-based steps), then random ones
    plan = ["step:2", "checkpoint:2", "eval:4", "metrics:5", "checkpoint:5", "random"]
    kills, resumed_from, mid_write = [], [], 0
    for point in plan:
        before = _complete_steps(work)
        if point == "random":
            proc = _cli(config, work, _env(cli_env))
            target = rng.randint(min(max(before, default=0) + 1, STEPS), STEPS)
            if _wait_for_checkpoint(proc, work, target):
                time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        else:
            proc = _cli(config, work, _env(cli_env, point))
        _, err = proc.communicate(timeout=600)
        if proc.returncode == -signal.SIGKILL:
            kills.append(point)
        else:
            assert proc.returncode == 0, err[-3000:]
        m = RESUME.search(err)
        if before and (m or point != "random" or proc.returncode == 0):
            # resumed from the newest complete checkpoint there was when it started (a random
            # kill may come before the process got that far)
            assert m and int(m.group(1)) == before[-1], (point, before, err[-2000:])
            resumed_from.append(int(m.group(1)))
        elif not before:
            assert m is None, err[-2000:]
        mid_write += bool(_tmp_dirs(work))
        if proc.returncode == 0:
            break
    print(f"killed at {kills}; resumed from {resumed_from}; {mid_write} kill(s) mid-write")
    assert len(kills) >= 5, kills

    final = _cli(config, work, _env(cli_env))
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    _, ref_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_err[-3000:]

    ref_dir = tmp_path / "reference"
    assert _complete_steps(ref_dir) == list(range(1, STEPS + 1))
    steps = _complete_steps(work)
    assert steps[-1] == STEPS
    for step in steps:  # every complete checkpoint ever left in the workdir is the reference's
        arrays, meta = _checkpoint(work, step)
        ref_arrays, ref_meta = _checkpoint(ref_dir, step)
        assert meta == ref_meta, step
        assert len(arrays) == len(ref_arrays)
        for a, b in zip(arrays, ref_arrays, strict=True):
            np.testing.assert_array_equal(a, b)
        # the ledger covers exactly the updates in the arrays (leaf 0: TrainState.step)
        ledger = accounting.PrivacyLedger.from_dict(meta["ledger"])
        assert ledger.steps == meta["step"] == meta["sampler"]["step"] == int(arrays[0]) == step

    summary = json.loads((work / "summary.json").read_text())
    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    assert summary["epsilon"] == ref_summary["epsilon"] and summary["steps"] == STEPS
    assert summary["test_accuracy"] == ref_summary["test_accuracy"]

    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    ref_records = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once
    assert records == ref_records
    for r in records:  # a logged epsilon never under-reports the ledger of its step
        _, meta = _checkpoint(ref_dir, r["step"])
        ledger_eps = accounting.PrivacyLedger.from_dict(meta["ledger"]).epsilon(DELTA, "pld")
        assert r["epsilon"] >= ledger_eps
