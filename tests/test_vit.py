"""ViT: checkpoints in every layout reproduce an independent forward; ghost norms equal vmap.

Random checkpoints are generated from one set of "canonical" tensors (per-head attention kernels,
as the ViT paper writes them) and written in each published layout by the helpers' own writers
(`vit_checkpoints`), whose reference forward computes the canonical model with numpy in float64
(its own patchify, LayerNorm, attention, both GELUs). A wrong name, transpose, head split,
pooling or GELU in `dpft.models.vit_import` / `dpft.models.vit` changes the outputs.
"""

import ast
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ghost import FAST_COMPILE, compare, setup
from vit_checkpoints import (
    DEPTH,
    GRID,
    D,
    H,
    K,
    M,
    P,
    canonical,
    hf_tensors,
    images,
    reference,
    save_file,
    timm_tensors,
    write_big_vision,
)

from dpft import models
from dpft.models import pretrained, vit_import
from dpft.models.vit import ViT
from dpft.paths import DataError
from dpft.privacy import clipping as C
from dpft.privacy.ghost import GhostNorms


def assert_matches(model, variables, ref, x):
    def both(v, x):
        return model.apply(v, x), model.apply(v, x, method=model.features)

    # one compile (LLVM optimisation off) instead of op-by-op dispatch of every op
    logits, feats = jax.jit(both, compiler_options=FAST_COMPILE)(variables, jnp.asarray(x))
    logits, feats = np.asarray(logits), np.asarray(feats)
    for got, want in ((logits, ref[0]), (feats, ref[1])):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def assert_arch(model, pool, gelu, eps, fc_norm=False):
    assert isinstance(model, ViT)
    assert (model.patch_size, model.width, model.depth, model.mlp_dim, model.num_heads) == (
        P,
        D,
        DEPTH,
        M,
        H,
    )
    assert (model.pool_type, model.gelu, model.layernorm_eps, model.fc_norm) == (
        pool,
        gelu,
        eps,
        fc_norm,
    )
    assert model.num_classes == K


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "naming,tok,scan,prefix",
    [
        ("vit", True, False, ""),  # ViT / AugReg: posembed_input with the class row
        ("big_vision", False, False, "params/"),  # gap, per-type module numbers
        ("big_vision", True, True, "params/"),  # scanned blocks, grid-only table
    ],
)
def test_big_vision_npz_matches_reference(tmp_path, naming, tok, scan, prefix):
    c = canonical(1, tok=tok, embed_class=naming == "vit")
    path = write_big_vision(c, tmp_path / "vit.npz", naming, scan, prefix)
    model, variables = pretrained.load("vit", path)
    assert_arch(model, "tok" if tok else "gap", "tanh", 1e-6)
    x = images(3, 32)
    assert_matches(model, variables, reference(c, x, "tanh", 1e-6), x)


@pytest.mark.parametrize(
    "layout,tok,fc_norm,embed_class",
    [
        ("timm", True, False, True),
        ("timm", True, False, False),  # no_embed_class: table without the class row
        ("timm", False, True, True),  # average pooling, LayerNorm after pooling
        ("timm", False, False, True),  # average pooling, LayerNorm before pooling
        ("hf", True, False, True),
    ],
)
def test_timm_and_hf_safetensors_match_reference(tmp_path, layout, tok, fc_norm, embed_class):
    c = canonical(2, tok=tok, embed_class=embed_class)
    tensors = timm_tensors(c, fc_norm, embed_class) if layout == "timm" else hf_tensors(c)
    save_file(tensors, tmp_path / "vit.safetensors")
    model, variables = vit_import.load(tmp_path / "vit.safetensors", num_heads=H)
    eps = 1e-6 if layout == "timm" else 1e-12
    assert_arch(model, "tok" if tok else "gap", "exact", eps, fc_norm)
    x = images(3, 32, seed=1)
    assert_matches(model, variables, reference(c, x, "exact", eps, fc_norm), x)


def test_heads_from_standard_width_or_argument(tmp_path):
    c = canonical(3)
    save_file(timm_tensors(c), tmp_path / "w32.safetensors")
    with pytest.raises(DataError, match=r"w32\.safetensors.*width 32.*num_heads=") as e:
        vit_import.load(tmp_path / "w32.safetensors")
    assert "\n" not in str(e.value)
    wide = canonical(3, width=192, depth=1, heads=3)
    save_file(hf_tensors(wide, prefix=""), tmp_path / "w192.safetensors")
    model, variables = vit_import.load(tmp_path / "w192.safetensors")
    assert (model.width, model.num_heads, model.depth) == (192, 3, 1)
    # the pooler of a bare ViTModel file is ignored, the head kept
    assert variables["params"]["linear"]["kernel"].shape == (192, K)


def test_registry_sizes_have_the_published_parameter_counts():
    # ViT-Ti/S/B/L at patch 16, 224 px, 1000 classes (timm's and the ViT paper's counts)
    published = {"ti": 5_717_416, "s": 22_050_664, "b": 86_567_656, "l": 304_326_632}
    x = jnp.zeros((1, 224, 224, 3))
    for size, count in published.items():
        model = models.get_model(f"vit_{size}16", 1000)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        assert models.count_params(shapes) == count, size
        assert model.mlp_dim == 4 * model.width and model.patch_size == 16
    assert "pool_type" in models.model_kwargs("vit_b16")
    assert models.get_model("vit_s16", 3, pool_type="gap").pool_type == "gap"
    with pytest.raises(ValueError, match="pool_type"):
        models.get_model("vit_ti16", 3, pool_type="map")


# ----------------------------------------------------------------------------- pos embedding


def bilinear_weights(n_in, n_out):
    """[n_out, n_in] half-pixel bilinear weights, the triangle widened by n_in/n_out when
    shrinking (antialiasing), each row normalised."""
    scale = n_out / n_in
    src = (np.arange(n_out) + 0.5) / scale  # output centres in input coordinates
    dist = np.abs(src[:, None] - (np.arange(n_in) + 0.5)[None, :]) * min(scale, 1.0)
    w = np.maximum(0.0, 1.0 - dist)
    return w / w.sum(1, keepdims=True)


def test_pos_embedding_interpolated_to_image_size(tmp_path):
    c = canonical(4)
    path = write_big_vision(c, tmp_path / "vit32.npz")
    model32, variables32 = pretrained.load("vit", path)
    with pytest.raises(ValueError, match="image_size"):
        model32.apply(variables32, jnp.zeros((1, 48, 48, 3)))
    for size in (48, (48, 16)):  # grid 4x4 -> 6x6; -> 6x2 (shrinking one side)
        h, w = (size, size) if isinstance(size, int) else size
        model, variables = pretrained.load("vit", path, image_size=size)
        grid = c["pos"][0, 1:].reshape(GRID, GRID, D).astype(np.float64)
        grid = np.einsum(
            "ai,bj,ijd->abd", bilinear_weights(GRID, h // P), bilinear_weights(GRID, w // P), grid
        )
        pos = np.concatenate([c["pos"][:, :1], grid.reshape(1, -1, D)], axis=1)
        np.testing.assert_allclose(np.asarray(variables["params"]["pos_embedding"]), pos, atol=1e-6)
        x = images(2, size, seed=2)
        assert_matches(model, variables, reference(c, x, "tanh", 1e-6, pos=pos), x)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        pretrained.load("vit", path, image_size=36)


# ----------------------------------------------------------------------------- bad checkpoints


def test_bad_checkpoints_give_one_line_data_errors(tmp_path):
    c = canonical(5)
    good = timm_tensors(c)

    def check(name, tensors, pattern):
        file = tmp_path / name
        if tensors is not None:
            save_file(tensors, file)
        with pytest.raises(DataError) as e:
            vit_import.load(file, num_heads=H)
        msg = str(e.value)
        assert name in msg and re.search(pattern, msg) and "\n" not in msg, msg

    check(
        "missing.safetensors",
        {k: v for k, v in good.items() if k != "blocks.1.attn.qkv.bias"},
        r"missing tensor 'blocks\.1\.attn\.qkv\.bias'",
    )
    check(
        "shape.safetensors",
        {**good, "blocks.0.mlp.fc2.weight": np.zeros((D, M + 1), np.float32)},
        r"'blocks\.0\.mlp\.fc2\.weight' has shape \[32, 65\], expected \[32, 64\]",
    )
    check(
        "extra.safetensors",
        {**good, "reg_token": np.zeros((1, 4, D), np.float32)},
        r"unexpected tensors.*reg_token",
    )
    bad = dict(good)
    bad["norm.weight"] = np.full(D, np.nan, np.float32)
    check("nan.safetensors", bad, r"'norm\.weight' has non-finite values")
    check(
        "int.safetensors",
        {**good, "head.bias": np.zeros(K, np.int32)},
        r"'head\.bias' has dtype int32",
    )
    check(
        "rows.safetensors",
        {**good, "pos_embed": np.zeros((1, 15, D), np.float32)},
        r"'pos_embed' has 15 rows",
    )
    check("other.safetensors", {"fc.weight": np.zeros((2, 2), np.float32)}, "not a ViT checkpoint")
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    check("junk.npz", None, "unreadable ViT checkpoint")
    check("absent.npz", None, "missing ViT checkpoint")
    np.savez(
        tmp_path / "logits.npz",
        **{"pre_logits/kernel": np.zeros((D, D), np.float32)},
        **{k: v for k, v in np.load(write_big_vision(c, tmp_path / "bv.npz")).items()},
    )
    check("logits.npz", None, r"unexpected tensors.*pre_logits/kernel")
    with pytest.raises(DataError, match="give the checkpoint file"):
        pretrained.load("vit", None)
    with pytest.raises(ValueError, match="image_size is only for"):
        pretrained.load("resnet20", None, image_size=32)


def test_head_reinit_and_headless_checkpoint(tmp_path):
    c = canonical(6)
    path = write_big_vision(c, tmp_path / "vit.npz")
    model, variables = pretrained.load_head_reinit("vit", 7, path=path, image_size=16)
    assert model.num_classes == 7 and variables["params"]["pos_embedding"].shape == (1, 5, D)
    head = variables["params"]["linear"]
    assert head["kernel"].shape == (D, 7) and not np.any(np.asarray(head["kernel"]))
    t = timm_tensors(c)
    del t["head.weight"], t["head.bias"]
    save_file(t, tmp_path / "headless.safetensors")
    with pytest.raises(DataError, match="num_heads="):
        vit_import.load(tmp_path / "headless.safetensors")
    model, variables = vit_import.load(tmp_path / "headless.safetensors", num_heads=H)
    assert model.num_classes == 0
    assert variables["params"]["linear"]["kernel"].shape == (D, 0)


# ----------------------------------------------------------------------------- ghost norms


def tiny(pool, depth=2, **kw):
    return ViT(
        num_classes=5,
        patch_size=8,
        width=32,
        depth=depth,
        mlp_dim=64,
        num_heads=2,
        pool_type=pool,
        **kw,
    )


def by_module(path):
    return path.rsplit("/", 1)[0]


@pytest.mark.parametrize(
    "pool,kw,clipper",
    [
        ("tok", {}, C.FlatClip(1e-3)),
        # one block keeps the compile short; per-module bounds: per-group clipping factors
        ("gap", {"depth": 1, "gelu": "exact", "fc_norm": True}, C.PerLayerClip(0.05, by_module)),
    ],
)
def test_ghost_norms_equal_vmap_norms(pool, kw, clipper):
    """Every parameter trainable, random head: ghost (Dense over T tokens, strided patch conv,
    exact per-example LayerNorm / cls / pos_embedding) equals per-example gradients."""
    per_example, params, batch = setup(tiny(pool, **kw), (16, 16, 3), 3, 5)
    (out,) = compare(per_example, [clipper], params, batch, jnp.asarray([1.0, 1.0, 0.0]))
    assert int(out.num_clipped) == 2 and np.all(np.asarray(out.norms)[:2] > 1e-3)


def test_ghost_covers_every_dense_and_conv():
    """Without fallback, GhostNorms names exactly the LayerNorm, cls and pos_embedding leaves."""
    per_example, params, batch = setup(tiny("tok"), (16, 16, 3), 2, 5)
    fn = C.clipped_grad(per_example, C.FlatClip(1.0), norm_strategy=GhostNorms(False))
    with pytest.raises(ValueError) as e:
        fn(params, batch, jnp.ones(2), jax.random.PRNGKey(0))
    named = set(ast.literal_eval(re.search(r"call: (\[.*?\])", str(e.value)).group(1)))
    norms = {k for k in params if re.search(r"norm[12]?/(scale|bias)$", k)}
    assert len(norms) == 2 * (2 * 2 + 1)
    assert named == norms | {"params/cls", "params/pos_embedding"}
    kernels = [k for k in params if k.endswith(("kernel", "bias")) and k not in norms]
    assert len(kernels) == 2 + 2 * 8 + 2  # embedding, 4 Dense per block, head
    assert not named & set(kernels)
