"""The ViT workload of ``bench.run``: its restriction to a few DP rows, and its PyTorch twin."""

import jax
import numpy as np
import pytest

from bench.steps import LIMITS, Limits, workloads
from dpft.models import count_params, get_model


def test_vit_workload_is_restricted_to_flat_ghost_and_vmap():
    mname, kwargs, x, classes = workloads()["vit_ti16"]
    assert mname == "vit_ti16" and kwargs == {"gelu": "exact"} and x.shape[1:] == (224, 224, 3)
    limits = LIMITS["vit_ti16"]
    clippers, norms = limits.apply(
        {"flat": 1, "per_layer": 2, "auto": 3}, {"vmap": 4, "ghost": 5, "other": 6}
    )
    assert clippers == {"flat": 1} and norms == {"vmap": 4, "ghost": 5}
    assert limits.opacus_modes == ("ghost",) and not limits.jax_privacy
    assert "restricted" in limits.describe()
    # an unlisted workload times everything and adds no note
    assert Limits().apply({"a": 1}, {"b": 2}) == ({"a": 1}, {"b": 2})
    assert Limits().describe() is None


def test_torch_vit_twin_matches_dpft_and_its_opacus_grad_sampler():
    torch = pytest.importorskip("torch")
    pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModule

    from bench import peers_torch

    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    variables = jax.eval_shape(
        get_model("vit_ti16", 10, gelu="exact").init, jax.random.PRNGKey(0), x[:1]
    )
    torch.manual_seed(0)
    model = peers_torch.get_model("vit_ti16", 10, x.shape[1:])
    assert peers_torch.count_params(model) == count_params(variables["params"])

    xt, yt = peers_torch._to_torch(x), torch.arange(3)
    exact = []
    for i in range(3):  # per-example gradients by one backward pass per example
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[i : i + 1]), yt[i : i + 1]).backward()
        exact.append(torch.cat([p.grad.flatten() for p in model.tokens.parameters()]))
    peers_torch._register_opacus_samplers()
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.zero_grad()
    torch.nn.functional.cross_entropy(gsm(xt), yt, reduction="sum").backward()
    sampled = torch.cat([p.grad_sample.flatten(1) for p in model.tokens.parameters()], dim=1)
    np.testing.assert_allclose(sampled.numpy(), torch.stack(exact).numpy(), rtol=1e-4, atol=1e-6)
