"""The ViT workload of ``bench.run``: its restriction to a few DP rows, and its PyTorch model:
timm's ``vit_tiny_patch16_224`` when timm imports, else the layer-identical `ViTTwin`."""

import sys

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


def _timm_or_skip():
    """timm, or a skip: besides ImportError, timm's import fails with RuntimeError where the
    installed torchvision was built for another torch (then bench.peers_torch uses ViTTwin)."""
    pytest.importorskip("torch")
    try:
        import timm
    except Exception as e:
        pytest.skip(f"timm not importable: {type(e).__name__}: {e}")
    return timm


def _dpft_vit_params(image: int, classes: int = 10) -> int:
    x = np.zeros((1, image, image, 3), np.float32)
    variables = jax.eval_shape(
        get_model("vit_ti16", classes, gelu="exact").init, jax.random.PRNGKey(0), x
    )
    return count_params(variables["params"])


def test_vit_param_count_formula_matches_dpft():
    pytest.importorskip("torch")
    from bench import peers_torch_vit

    for image in (32, 224):
        assert peers_torch_vit.vit_param_count(image, 10, 192, 12) == _dpft_vit_params(image)
    assert _dpft_vit_params(224) == 5_526_346


@pytest.mark.parametrize("use_timm", [True, False], ids=["timm", "vit_twin"])
def test_torch_vit_matches_dpft_and_its_opacus_grad_sampler(use_timm, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModule

    from bench import peers_torch

    if use_timm:
        _timm_or_skip()
    else:  # timm absent: the twin, with a printed line
        monkeypatch.setitem(sys.modules, "timm", None)
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    torch.manual_seed(0)
    model = peers_torch.get_model("vit_ti16", 10, x.shape[1:])
    described = peers_torch.describe_model("vit_ti16", model)
    if use_timm:
        assert described.startswith("timm ") and "vit_tiny_patch16_224" in described
    else:
        assert isinstance(model, peers_torch.ViTTwin) and described.startswith("ViTTwin")
        assert "timm not importable" in capsys.readouterr().out
    assert peers_torch.count_params(model) == _dpft_vit_params(32)

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


def test_timm_vit_is_timms_forward_with_every_parameter_grad_sampled():
    """The timm model with its tokens moved computes what stock timm computes, and Opacus then
    grad-samples layer by layer (stock timm's ViT is one functorch layer to Opacus)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("opacus")
    timm = _timm_or_skip()
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from bench import peers_torch, peers_torch_vit

    torch.manual_seed(0)
    model = peers_torch_vit.timm_vit("vit_ti16", 10, 32)
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    state = model.state_dict()
    state["cls_token"], state["pos_embed"] = state.pop("tokens.cls"), state.pop("tokens.pos")
    stock.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), stock(x))

    peers_torch._register_opacus_samplers()
    kw = dict(max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="sum")
    ghost = GradSampleModuleFastGradientClipping(model, **kw)
    hooked = list(ghost.iterate_submodules(model))
    assert model.tokens in hooked and model not in hooked
    assert any(type(m) in ghost.NORM_SAMPLERS for m in hooked)  # Linear: ghost norms
    whole = GradSampleModuleFastGradientClipping(stock, **kw)
    assert list(whole.iterate_submodules(stock)) == [stock]
