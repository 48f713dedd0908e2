"""`dpft.host.tune_host_allocator`: applied on Linux/glibc, off with DPFT_TUNE_MALLOC=0.

Run in subprocesses so that the test process keeps glibc's default allocator settings (other
tests measure resident memory)."""

import os
import platform
import subprocess
import sys

import pytest

CODE = "from dpft.host import tune_host_allocator; print(tune_host_allocator())"


def _run(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("DPFT_TUNE_MALLOC", None)
    if env_value is not None:
        env["DPFT_TUNE_MALLOC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)
def test_applied_on_glibc_and_turned_off_by_the_environment():
    assert _run(None) == "True"
    assert _run("1") == "True"
    assert _run("0") == "False"


def test_values_beyond_a_c_int_are_capped_not_wrapped(monkeypatch):
    import dpft.host as host

    seen = []

    class FakeLibc:
        def mallopt(self, option, value):
            seen.append((option, value.value))
            return 1

    monkeypatch.setattr(host.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(host.sys, "platform", "linux")
    monkeypatch.delenv("DPFT_TUNE_MALLOC", raising=False)
    assert host.tune_host_allocator(mmap_threshold=1 << 40, trim_threshold=5, top_pad=7)
    assert seen == [(-3, 2**31 - 1), (-1, 5), (-2, 7)]
