"""The DP core (dpft/privacy) imports nothing else from dpft and documents its privacy."""

import ast
import inspect
import pathlib

import pytest

import dpft
from dpft.privacy import (
    accounting,
    clients,
    clipping,
    correlated,
    keys,
    noise,
    releases,
    rows,
    sampling,
    streaming,
    tuning,
    users,
)

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


def test_no_mechanism_outside_the_core():
    """Noise draws, OS secrets and dp-accounting stay in dpft/privacy.

    dpft/audit is exempt: its broken-mechanism controls re-implement pieces on purpose.
    """
    root = CORE.parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("privacy/", "audit/")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Attribute) and node.attr in ("normal", "randbits"):
                offenders.append(f"{rel}:{node.lineno}: .{node.attr}")
                continue
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("dp_accounting", "secrets"):
                    offenders.append(f"{rel}:{node.lineno}: import {name}")
    assert offenders == []


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
    noise.step_key,
    sampling.PoissonSampler,
    sampling.ShuffleSampler,
    accounting.compute_epsilon,
    tuning.draw_repetitions,
    tuning.total_epsilon,
    tuning.ledger_total_epsilon,
    tuning.release_total_epsilon,
    accounting.check_delta,
    accounting.GaussianSteps.event,
    keys.derive,
    keys.run_seed,
    rows.row_clip_factors,
    rows.clip_rows,
    rows.clipped_head_grad_sum,
    rows.gram_sum,
    rows.xty_sum,
    rows.curvature_sum,
    rows.gaussian,
    rows.symmetric_gaussian,
    rows.noisy_head_grad_sum,
    rows.noisy_gram_sum,
    rows.noisy_xty_sum,
    rows.noisy_curvature_sum,
    releases.Release,
    releases.calibrate_gaussian_composition,
    releases.epsilon_of,
    releases.plan_releases,
    releases.dp_event,
    releases.gdp_mu,
    releases.gdp_epsilon,
    clients.clip_client_updates,
    clients.client_level_sum,
    clients.private_mean,
    clients.client_level_entry,
    clients.example_level_entry,
    clients.client_level_epsilon,
    clients.example_level_epsilon,
    clients.calibrate,
    streaming.streamed_head_grad_sum,
    streaming.streamed_gram_sum,
    streaming.streamed_xty_sum,
    streaming.streamed_curvature_sum,
    streaming.noisy_streamed_head_grad_sum,
    streaming.noisy_streamed_gram_sum,
    streaming.noisy_streamed_xty_sum,
    streaming.noisy_streamed_curvature_sum,
    streaming.process_sum,
    correlated.optimal_banded_coefs,
    correlated.correlated_key,
    correlated.banded_step_key,
    correlated.banded_mf_privatizer,
    correlated.banded_entry,
    correlated.banded_dp_event,
    correlated.banded_epsilon,
    correlated.calibrate_banded_noise_multiplier,
    correlated.BandedBudget,
    sampling.CyclicPoissonSampler,
    users.UserPoissonSampler,
    users.per_user_loss,
    users.user_steps,
    users.synthetic_user_ids,
    users.user_members,
    users.split_user_mask,
]


@pytest.mark.parametrize("obj", PUBLIC_DP, ids=lambda o: o.__name__)
def test_public_dp_functions_have_privacy_section(obj):
    doc = inspect.getdoc(obj) or ""
    assert "Privacy:" in doc
    section = doc.split("Privacy:")[1]
    # mechanisms state a sensitivity / neighbouring relation; key functions their independence
    assert any(w in section for w in ("neighbour", "neighboring", "sensitivity", "independen"))


def test_trainer_package_does_not_import_the_drivers_above_it():
    """The layers run one way: dpft.train is below the federated and feature-method drivers."""
    import subprocess
    import sys

    code = (
        "import sys, dpft.train, dpft.train.trainer; "
        "print(sorted(m for m in sys.modules if m.startswith(('dpft.federated', 'dpft.linear'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]", out
