"""Tests of dpft.models.conv: im2col convolution against lax.conv_general_dilated, in the models."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dpft import models
from dpft.models import conv as conv_mod
from dpft.models.cnn import SampleConvNet
from dpft.models.conv import (
    CONV_IMPLS,
    auto_conv_general_dilated,
    conv_impl,
    im2col_conv_general_dilated,
    prefers_im2col,
)
from dpft.models.resnet import CifarResNet, WideResNet

NHWC = ("NHWC", "HWIO", "NHWC")
RNG = np.random.default_rng(0)


def _normal(*shape: int) -> jax.Array:
    return jnp.asarray(RNG.normal(size=shape).astype(np.float32))


def _close(actual, expected, rtol: float = 1e-5) -> None:
    """Equal up to ``rtol`` relative to the largest magnitude of ``expected`` (per array)."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    leaves = zip(
        jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True
    )
    for a, e in leaves:
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)


def _conv_and_vjp(conv, x, w, **kw):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, **kw), x, w)
    return y, vjp(jnp.cos(y))  # a cotangent that is not a function of y's sign alone


def _check_against_lax(x, w, **kw) -> None:
    def both(x, w):
        return (
            _conv_and_vjp(im2col_conv_general_dilated, x, w, **kw),
            _conv_and_vjp(lax.conv_general_dilated, x, w, **kw),
        )

    (y, (dx, dw)), (y_ref, (dx_ref, dw_ref)) = jax.jit(both)(x, w)
    _close(y, y_ref)
    _close(dx, dx_ref)
    _close(dw, dw_ref)


# ----------------------------------------------------------------------------- the function


_PADDINGS = ["SAME", "VALID", ((3, 3), (3, 3)), ((0, 2), (1, 0))]
# Every padding x stride for kernels 1, 3, 4; kernel 8 (64 patch slices, slow to compile) only
# in the two shapes dpft's models use it with (SampleConvNet's conv1) and one asymmetric pad.
_GRID = [(k, s, p) for k in (1, 3, 4) for s in (1, 2) for p in _PADDINGS] + [
    (8, 2, ((3, 3), (3, 3))),
    (8, 1, ((0, 2), (1, 0))),
]


@pytest.mark.parametrize(("kernel", "stride", "padding"), _GRID)
def test_im2col_matches_lax_nhwc(kernel, stride, padding):
    cin, cout = (1, 8) if kernel == 8 else (3, 5)
    x = _normal(2, 11, 13, cin)
    w = _normal(kernel, kernel, cin, cout)
    _check_against_lax(
        x, w, window_strides=(stride, stride), padding=padding, dimension_numbers=NHWC
    )


@pytest.mark.parametrize(
    "kw",
    [
        # kernel dilation, anisotropic strides
        {"window_strides": (1, 2), "padding": "SAME", "rhs_dilation": (2, 3)},
        # transposed convolution (input dilation) with negative padding
        {"window_strides": (1, 1), "padding": ((2, 1), (-1, 2)), "lhs_dilation": (2, 1)},
        # flax's dimension numbers object
        {
            "window_strides": (2, 2),
            "padding": ((1, 1), (1, 1)),
            "dimension_numbers": lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),
        },
        # lax's default layouts (NCHW / OIHW), via dimension_numbers=None: see the transposes
        {"window_strides": (1, 1), "padding": "VALID", "dimension_numbers": "nchw"},
        # mixed layouts
        {
            "window_strides": (2, 1),
            "padding": "SAME",
            "dimension_numbers": ("NCHW", "OIHW", "NHWC"),
        },
    ],
)
def test_im2col_matches_lax_dilations_and_layouts(kw):
    kw = dict(kw)
    x, w = _normal(2, 9, 10, 3), _normal(3, 2, 3, 4)
    if kw.get("dimension_numbers") == "nchw":
        kw["dimension_numbers"] = None
        x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
    elif isinstance(kw.get("dimension_numbers"), tuple) and kw["dimension_numbers"][0] == "NCHW":
        x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
    else:
        kw.setdefault("dimension_numbers", NHWC)
    _check_against_lax(x, w, **kw)


def test_im2col_one_dimensional_and_empty_output():
    x, w = _normal(2, 7, 3), _normal(3, 3, 4)
    _check_against_lax(
        x, w, window_strides=(2,), padding="SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    # A kernel larger than the (padded) input: an empty output, like lax.
    x, w = _normal(1, 3, 3, 2), _normal(5, 5, 2, 4)
    y = im2col_conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC)
    assert y.shape == lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC).shape


def test_one_by_one_is_a_single_dot():
    x, w = _normal(2, 6, 6, 5), _normal(1, 1, 5, 7)
    jaxpr = jax.make_jaxpr(
        lambda x, w: im2col_conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC)
    )(x, w)
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert "dot_general" in prims and "concatenate" not in prims
    assert "conv_general_dilated" not in prims


def test_grouped_convolutions():
    x, w = _normal(2, 8, 8, 4), _normal(3, 3, 2, 6)
    kw = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC}
    with pytest.raises(NotImplementedError, match="feature_group_count=2"):
        im2col_conv_general_dilated(x, w, feature_group_count=2, **kw)
    # 'auto' falls back to XLA for grouped convolutions.
    expected = lax.conv_general_dilated(x, w, feature_group_count=2, **kw)
    _close(auto_conv_general_dilated(x, w, feature_group_count=2, **kw), expected)


def test_under_vmap_and_unbatched_flax_conv():
    """Per-example gradients of a flax Conv on unbatched inputs (flax adds the batch dim)."""
    x = _normal(4, 10, 10, 3)
    params = {"params": {"kernel": _normal(3, 3, 3, 6), "bias": _normal(6)}}

    def per_example(kind):
        layer = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME", conv_general_dilated=kind)
        shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(1), x[0])  # [H, W, C]: no batch
        assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == jax.tree_util.tree_map(
            jnp.shape, params
        )
        loss = lambda p, xi: jnp.sum(jnp.sin(layer.apply(p, xi)))  # noqa: E731
        return jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0)))(params, x)

    _close(per_example(im2col_conv_general_dilated), per_example(lax.conv_general_dilated))


# ----------------------------------------------------------------------------- selection


def test_conv_impl_names():
    assert conv_impl("xla") is lax.conv_general_dilated
    assert conv_impl("im2col") is im2col_conv_general_dilated
    assert conv_impl("auto") is auto_conv_general_dilated
    with pytest.raises(ValueError, match="conv must be one of"):
        conv_impl("cudnn")
    for cls in (SampleConvNet, CifarResNet, WideResNet):
        with pytest.raises(ValueError, match="conv must be one of"):
            cls(conv="cudnn")
    assert "conv" in models.model_kwargs("resnet20")
    assert models.get_model("sample_convnet", 10, conv="xla").conv == "xla"


def test_config_model_conv_reaches_the_model():
    from dpft.config import base_config
    from dpft.train import build

    image = np.zeros((28, 28, 1), np.float32)
    for kind in CONV_IMPLS:
        c = base_config()
        c.model.conv = kind
        model, _ = build.build_model(c, 10, image)
        assert model.conv == kind
    c = base_config()
    c.model.name, c.model.conv = "linear", "xla"  # no convolutions: the key is ignored
    assert not hasattr(build.build_model(c, 10, image)[0], "conv")


def _prims(fn, *args) -> set[str]:
    return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_auto_chooses_per_backend_and_shape(monkeypatch):
    kw = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)), "dimension_numbers": NHWC}
    small = (_normal(1, 8, 8, 1), _normal(3, 3, 1, 16))  # one input channel: im2col
    large = (_normal(1, 32, 32, 16), _normal(3, 3, 16, 16))  # ResNet stage 1: XLA
    assert prefers_im2col(small[0].shape, small[1].shape, **kw)
    assert not prefers_im2col(large[0].shape, large[1].shape, **kw)
    assert prefers_im2col((1, 64, 64, 16), (1, 1, 16, 8), (2, 2), "VALID", dimension_numbers=NHWC)

    def auto(x, w):
        return auto_conv_general_dilated(x, w, **kw)

    assert jax.default_backend() == "cpu"
    assert "conv_general_dilated" not in _prims(auto, *small)
    assert "conv_general_dilated" in _prims(auto, *large)
    monkeypatch.setattr(conv_mod.jax, "default_backend", lambda: "gpu")
    on_gpu = lambda x, w: auto_conv_general_dilated(x, w, **kw)  # noqa: E731 (a fresh trace)
    assert "conv_general_dilated" in _prims(on_gpu, *small)


def test_auto_choices_for_the_models():
    nhwc = {"dimension_numbers": NHWC}
    pad1 = ((1, 1), (1, 1))
    # SampleConvNet: the single-channel first layer only.
    assert prefers_im2col((1, 28, 28, 1), (8, 8, 1, 16), (2, 2), ((3, 3), (3, 3)), **nhwc)
    assert not prefers_im2col((1, 13, 13, 16), (4, 4, 16, 32), (2, 2), "VALID", **nhwc)
    # ResNet-20: no layer (the 3-channel stem included); ImageNet ResNets: the 1x1 shortcuts.
    assert not prefers_im2col((1, 32, 32, 3), (3, 3, 3, 16), (1, 1), pad1, **nhwc)
    assert not prefers_im2col((1, 32, 32, 16), (3, 3, 16, 32), (2, 2), pad1, **nhwc)
    assert not prefers_im2col((1, 8, 8, 64), (3, 3, 64, 64), (1, 1), pad1, **nhwc)
    assert prefers_im2col((1, 56, 56, 64), (1, 1, 64, 128), (2, 2), "VALID", **nhwc)


# ----------------------------------------------------------------------------- models


def _per_example(model, variables, x, y):
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(p, xi, yi):
        logits = model.apply({"params": p, **rest}, xi[None])[0]
        return -jax.nn.log_softmax(logits)[yi], logits

    grad = jax.vmap(jax.grad(loss, has_aux=True), in_axes=(None, 0, 0))
    return jax.jit(grad)(params, x, y)


def _variables(model, x, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape).astype(np.float32)), shapes
    )
    if "batch_stats" in variables:  # positive running variances
        variables["batch_stats"] = jax.tree_util.tree_map(
            lambda v: jnp.abs(v) + 0.5, variables["batch_stats"]
        )
    return variables


def _same_param_tree(make) -> None:
    x = jnp.zeros((1, 32, 32, 3))
    trees = [
        jax.eval_shape(make(kind).init, jax.random.PRNGKey(0), x) for kind in conv_mod.CONV_IMPLS
    ]
    paths = [jax.tree_util.tree_flatten_with_path(t)[0] for t in trees]
    for other in paths[1:]:
        assert [(p, (v.shape, v.dtype)) for p, v in other] == [
            (p, (v.shape, v.dtype)) for p, v in paths[0]
        ]


def test_param_tree_does_not_depend_on_conv():
    _same_param_tree(lambda kind: SampleConvNet(conv=kind))
    _same_param_tree(lambda kind: CifarResNet(20, conv=kind))
    _same_param_tree(lambda kind: WideResNet(depth=10, width=1, conv=kind))


def test_sample_convnet_im2col_matches_xla():
    x, y = _normal(3, 28, 28, 1), jnp.array([1, 5, 9])
    variables = _variables(SampleConvNet(), x)
    got = _per_example(SampleConvNet(conv="im2col"), variables, x, y)
    expected = _per_example(SampleConvNet(conv="xla"), variables, x, y)
    _close(got, expected, rtol=1e-5)


def test_resnet20_im2col_matches_xla():
    # 16x16 inputs: every layer type of ResNet-20 (stem, stride-1 and stride-2 3x3 convs).
    x, y = _normal(2, 16, 16, 3), jnp.array([3, 7])
    # frozen BatchNorm: the logits (per-example gradients are checked with GroupNorm, the
    # convolutions are the same; compiling vmap(grad) of ResNet-20 takes seconds per variant).
    variables = _variables(CifarResNet(20), x)
    logits = {
        kind: jax.jit(CifarResNet(20, conv=kind).apply)(variables, x) for kind in ("xla", "im2col")
    }
    _close(logits["im2col"], logits["xla"], rtol=1e-4)  # 19 convolutions deep
    # GroupNorm: logits and per-example gradients.
    variables = _variables(CifarResNet(20, norm="group_norm"), x)
    got = _per_example(CifarResNet(20, norm="group_norm", conv="im2col"), variables, x, y)
    expected = _per_example(CifarResNet(20, norm="group_norm", conv="xla"), variables, x, y)
    _close(got, expected, rtol=1e-4)


def test_wide_resnet_im2col_matches_xla():
    x = _normal(2, 8, 8, 3)
    variables = _variables(WideResNet(depth=10, width=1), x)
    got = jax.jit(WideResNet(depth=10, width=1, conv="im2col").apply)(variables, x)
    expected = jax.jit(WideResNet(depth=10, width=1, conv="xla").apply)(variables, x)
    _close(got, expected, rtol=1e-4)


# ----------------------------------------------------------------------------- chunked kernel grad

CHUNKED_CASES = [
    # (input shape, kernel shape, conv kwargs): layouts, strides, dilations, groups
    ((8, 10, 10, 4), (3, 3, 4, 6), {"window_strides": (1, 1), "padding": "SAME"}),
    ((6, 9, 9, 4), (3, 3, 4, 8), {"window_strides": (2, 2), "padding": ((1, 0), (2, 1))}),
    ((8, 12, 12, 4), (3, 3, 2, 6), {"window_strides": (1, 1), "padding": "VALID", "fgc": 2}),
    ((4, 11, 11, 3), (3, 3, 3, 5), {"window_strides": (1, 1), "padding": "SAME", "rd": (2, 2)}),
    ((6, 4, 9, 9), (5, 4, 3, 3), {"window_strides": (1, 2), "padding": "SAME", "nchw": True}),
    ((7, 16, 3), (5, 3, 4), {"window_strides": (2,), "padding": "SAME", "one_d": True}),
]


def _chunked_kw(kw):
    kw = dict(kw)
    out = {"window_strides": kw.pop("window_strides"), "padding": kw.pop("padding")}
    out["feature_group_count"] = kw.pop("fgc", 1)
    out["rhs_dilation"] = kw.pop("rd", None)
    if kw.pop("nchw", False):
        out["dimension_numbers"] = ("NCHW", "OIHW", "NCHW")
    elif kw.pop("one_d", False):
        out["dimension_numbers"] = ("NWC", "WIO", "NWC")
    else:
        out["dimension_numbers"] = NHWC
    return out


@pytest.mark.parametrize("case", range(len(CHUNKED_CASES)))
def test_chunked_kernel_gradient_matches_lax(case):
    """Forward, input gradient and batch-chunked kernel gradient equal XLA's, chunks or not."""
    xs, ws, kw = CHUNKED_CASES[case]
    x, w = _normal(*xs), _normal(*ws)
    kw = _chunked_kw(kw)
    per_example = 4 * x.size // x.shape[0]  # the batch axis is first in every layout here
    # Two examples per chunk (odd batches: one), and one chunk (the plain convolution).
    for chunk_bytes, chunked in ((2 * per_example, True), (10 * x.nbytes, False)):

        def conv(x, w, chunk_bytes=chunk_bytes):
            return conv_mod.chunked_conv_general_dilated(x, w, chunk_bytes=chunk_bytes, **kw)

        assert ("custom_vjp_call" in _prims(conv, x, w)) == chunked
        got = jax.jit(lambda x, w, conv=conv: _conv_and_vjp(conv, x, w))(x, w)
        ref = jax.jit(lambda x, w: _conv_and_vjp(lax.conv_general_dilated, x, w, **kw))(x, w)
        _close(got, ref)


def test_chunked_conv_under_vmap_and_in_resnet20(monkeypatch):
    """Vmapped (chunks inside each vmapped group) and in ResNet-20 with 'auto' on CPU."""
    x = _normal(3, 4, 6, 6, 3)  # 3 groups (vmapped) of 4 images (chunks of 2)
    w = _normal(3, 3, 3, 5)
    kw = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC}
    chunked = functools.partial(
        conv_mod.chunked_conv_general_dilated, chunk_bytes=2 * 6 * 6 * 3 * 4
    )

    def per_group(conv):
        loss = lambda w, xi: jnp.sum(jnp.sin(conv(xi, w, **kw)))  # noqa: E731
        assert ("custom_vjp_call" in _prims(loss, w, x[0])) == (conv is chunked)
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, x)

    _close(per_group(chunked), per_group(lax.conv_general_dilated))

    # Chunks of 2 images of 16x16x16 (the first stage); the other stages too (smaller images).
    monkeypatch.setattr(conv_mod, "KERNEL_GRAD_CHUNK_BYTES", 2 * 16 * 16 * 16 * 4)
    xb, yb = _normal(4, 16, 16, 3), jnp.array([0, 3, 5, 9])
    variables = _variables(CifarResNet(20), xb)

    def grads(kind):
        model = CifarResNet(20, conv=kind)

        def loss(p):
            logits = model.apply({**variables, "params": p}, xb)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

        assert ("custom_vjp_call" in _prims(loss, variables["params"])) == (kind == "auto")
        return jax.jit(jax.grad(loss))(variables["params"])

    _close(grads("auto"), grads("xla"), rtol=1e-4)


def test_kernel_gradient_chunks_are_bounded():
    """Cache-sized chunks, but not more than about MAX_KERNEL_GRAD_CHUNKS (compile time)."""
    per_example = 32 * 32 * 16 * 4  # ResNet-20's first stage: 64 KB per image
    assert conv_mod._chunk_size(64, per_example, 256 << 10) == 4  # 16 chunks
    assert conv_mod._chunk_size(1024, per_example, 256 << 10) == 16  # 64 chunks, not 256
    assert conv_mod._chunk_size(61, per_example, 256 << 10) == 61  # prime: no chunks
    assert conv_mod._chunk_size(8, per_example, 10 * per_example) == 8  # under the target
