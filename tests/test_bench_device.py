"""bench/device.sh (the accelerator check) end to end on CPU, in its --tiny setting."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_device_script_prints_one_json_line_with_every_row():
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_TIMEOUT": "600"}
    out = subprocess.run(
        ["bash", "bench/device.sh", "--tiny", "--no-peers"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out.stdout
    result = json.loads(lines[0])
    assert result["backend"] == "cpu" and result["image_size"] == 32
    rows = result["models"]["vit_ti16"]
    rates = rows["examples_per_second"]
    assert set(rates) == {"non_private", "dp_ghost", "dp_vmap", "dp_lamb_huge_batch"}
    assert all(v > 0 for v in rates.values())
    # the ratios are the rates' quotients (rounded), not separate measurements
    ratio = rates["dp_ghost"] / rates["non_private"]
    assert abs(rows["dp_ghost/non_private"] - ratio) <= 1e-3 + 1e-2 * ratio
