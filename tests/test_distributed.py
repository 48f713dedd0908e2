"""Multi-host as far as CPU allows: two local processes (gloo collectives) equal one process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from tests.dist_case import run_case

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "params.json"
    env = {
        **os.environ,
        "DPFT_COORDINATOR": f"127.0.0.1:{_free_port()}",
        "DPFT_NUM_PROCESSES": "2",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, str(ROOT / "tests" / "mh_worker.py"), str(out)]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "DPFT_PROCESS_ID": str(i)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert "of 2 devices 4" in logs[0] and "of 2 devices 4" in logs[1]
    two_processes = {k: np.asarray(v) for k, v in json.loads(out.read_text()).items()}
    # the same 4-device mesh in this one process, and no mesh at all
    one_process = run_case(Mesh(np.asarray(jax.devices()[:4]), ("data",)), global_arrays=True)
    no_mesh = run_case(None, global_arrays=False)
    for k in no_mesh:
        np.testing.assert_allclose(two_processes[k], one_process[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(two_processes[k], no_mesh[k], rtol=1e-5, atol=1e-6)
    assert np.abs(no_mesh["w"]).max() > 0
