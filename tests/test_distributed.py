"""Multi-host as far as CPU allows: two local processes (gloo collectives) equal one process."""

import json

import jax
import numpy as np
import pytest
from conftest import ROOT, run_two_processes
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpft.train import step as step_lib
from dpft.train import train_and_evaluate
from dpft.train.checkpoint import Checkpointer
from tests.dist_case import run_case, tiny_train_config, write_tiny_mnist


def _two_processes(*args: str) -> list[str]:
    """Runs ``tests/mh_worker.py ARGS PROCESS_ID`` as processes 0 and 1; their logs."""
    return run_two_processes(lambda i: [ROOT / "tests" / "mh_worker.py", *args, i])


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "params.json"
    logs = _two_processes("step", str(out))
    assert "of 2 devices 4" in logs[0] and "of 2 devices 4" in logs[1]
    two_processes = {k: np.asarray(v) for k, v in json.loads(out.read_text()).items()}
    # the same 4-device mesh in this one process, and no mesh at all
    one_process = run_case(Mesh(np.asarray(jax.devices()[:4]), ("data",)), global_arrays=True)
    no_mesh = run_case(None, global_arrays=False)
    for k in no_mesh:
        np.testing.assert_allclose(two_processes[k], one_process[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(two_processes[k], no_mesh[k], rtol=1e-5, atol=1e-6)
    assert np.abs(no_mesh["w"]).max() > 0


def _final(workdir):
    ck = Checkpointer(workdir)
    arrays, meta = ck.load_arrays(ck.latest_step())
    ck.close()
    return arrays, meta


def _files(workdir) -> list[str]:
    """The workdir's files, event files and checkpoint internals abstracted away."""
    names = set()
    for p in workdir.rglob("*"):
        rel = p.relative_to(workdir)
        if rel.parts[0] == "checkpoints":
            names.add("/".join(rel.parts[:2]))
        elif p.name.startswith("events.out.tfevents"):
            names.add(f"{p.name.split('.', 3)[:3]}")
        else:
            names.add(str(rel))
    return sorted(names)


def test_trainer_two_processes_equal_one_process(tmp_path):
    """`train_and_evaluate` in 2 processes x 2 devices == 1 process x 4 devices; 0 writes."""
    data_dir = tmp_path / "data"
    write_tiny_mnist(data_dir)
    work = tmp_path / "two"
    logs = _two_processes("train", str(data_dir), str(work), str(tmp_path / "summary"))
    s0, s1 = (json.loads((tmp_path / f"summary{i}").read_text()) for i in range(2))
    assert (s0["process"], s1["process"], s0["devices"]) == (0, 1, 4)
    one = train_and_evaluate(tiny_train_config(data_dir, num_devices=4), tmp_path / "one")
    for s in (s0, s1):
        assert s["steps"] == one["steps"] == 4
        assert s["epsilon"] == one["epsilon"] and s["epsilon_rdp"] == one["epsilon_rdp"]
        assert s["test_accuracy"] == one["test_accuracy"]
    a, meta_a = _final(work)
    b, meta_b = _final(tmp_path / "one")
    assert meta_a["ledger"] == meta_b["ledger"] and meta_a["step"] == 4
    for x, y in zip(a, b, strict=True):  # same examples, keys and single noise draw
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert max(np.abs(x).max() for x in a) > 0
    # only process 0 wrote: the files of a one-process run, each once
    assert _files(work) == _files(tmp_path / "one")
    steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert len(list(work.glob("events.out.tfevents*"))) == 1
    assert json.loads((work / "summary.json").read_text())["epsilon"] == s0["epsilon"]
    assert "tiny_mh" in logs[0] and "tiny_mh" not in logs[1]  # the progress bar


def test_fsdp_spec_shards_the_largest_divisible_dimension():
    from dpft.train.step import fsdp_spec

    assert fsdp_spec((784, 16), 8) == P("data")
    assert fsdp_spec((3, 3, 16, 32), 8) == P(None, None, None, "data")
    assert fsdp_spec((10,), 8) == P() and fsdp_spec((), 8) == P() and fsdp_spec((4,), 8) == P()


def test_fsdp_eight_devices_equal_one_device(tmp_path, monkeypatch):
    """Params and optimizer state sharded over 8 CPU devices: the run of one device."""
    from dpft.train import runtime

    assert jax.device_count() >= 8, "conftest sets 8 host devices"
    data_dir = tmp_path / "data"
    write_tiny_mnist(data_dir)
    specs = []

    def spy(mesh, state, fsdp):
        out = step_lib.state_shardings(mesh, state, fsdp)
        specs.extend(s.spec for s in jax.tree_util.tree_leaves(out.params))
        specs.extend(s.spec for s in jax.tree_util.tree_leaves(out.opt_state))
        return out

    monkeypatch.setattr(runtime, "state_shardings", spy)
    fsdp = tiny_train_config(data_dir, num_devices=8)
    fsdp.parallel.fsdp = True
    fsdp.train.momentum = 0.9  # optimizer state to shard too
    one = tiny_train_config(data_dir, num_devices=1)
    one.train.momentum = 0.9
    one.train.max_batch_size = 64
    s8 = train_and_evaluate(fsdp, tmp_path / "fsdp")
    s1 = train_and_evaluate(one, tmp_path / "one")
    assert P("data") in specs and P() in specs  # kernel [784, 10] sharded, bias not
    assert s8["epsilon"] == s1["epsilon"] and s8["steps"] == s1["steps"] == 4
    a, meta_a = _final(tmp_path / "fsdp")
    b, meta_b = _final(tmp_path / "one")
    assert meta_a["ledger"] == meta_b["ledger"]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert s8["test_accuracy"] == pytest.approx(s1["test_accuracy"], abs=1 / 64 + 1e-9)
