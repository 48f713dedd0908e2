import os

import pytest

# Tests run on the CPU; 8 host devices let multi-device tests run on one machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


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
