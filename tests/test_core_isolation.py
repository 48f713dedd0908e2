"""The DP core (dpft/privacy) imports nothing else from dpft and documents its privacy."""

import ast
import inspect
import pathlib

import pytest

import dpft
from dpft.privacy import accounting, clipping, noise, sampling

CORE = pathlib.Path(dpft.__file__).parent / "privacy"


def test_core_imports_nothing_else_from_dpft():
    offenders = []
    for path in sorted(CORE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 1:
                    offenders.append(f"{path.name}: relative import above dpft.privacy")
                    continue
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                if name.split(".")[0] == "dpft" and not name.startswith("dpft.privacy"):
                    offenders.append(f"{path.name}: {name}")
        # no dynamic import of other dpft modules either
        src = path.read_text()
        assert 'importlib.import_module("dpft.' not in src
    assert offenders == []
    assert len(list(CORE.glob("*.py"))) >= 5


PUBLIC_DP = [
    clipping.clipped_grad,
    clipping.clip_factors,
    clipping.FlatClip,
    clipping.PerLayerClip,
    clipping.AutoClip,
    clipping.GlobalClip,
    noise.gaussian_privatizer,
    noise.gaussian_noise,
    noise.noise_std,
    sampling.PoissonSampler,
    accounting.compute_epsilon,
]


@pytest.mark.parametrize("obj", PUBLIC_DP, ids=lambda o: o.__name__)
def test_public_dp_functions_have_privacy_section(obj):
    doc = inspect.getdoc(obj) or ""
    assert "Privacy:" in doc
    section = doc.split("Privacy:")[1]
    assert "neighbour" in section or "neighboring" in section or "sensitivity" in section
