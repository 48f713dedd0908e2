"""dpft.privacy.unfold: per-example convolution kernel gradients equal jax.vmap(jax.grad)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dpft.privacy import unfold
from dpft.privacy.ghost import _Call, _kernel_grad

RNG = np.random.default_rng(0)

# (per-example input shape [b, *spatial, C_in], kernel size, strides, dilation, pads, pad mode,
#  groups, C_out). b > 1: a model that applies the convolution to several images per example.
CASES = {
    "3x3 same": ((1, 9, 8, 4), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), "constant", 1, 5),
    "stride 2": ((1, 9, 9, 3), (3, 3), (2, 2), (1, 1), ((1, 1), (0, 2)), "constant", 1, 4),
    "dilated wrap": ((1, 7, 7, 2), (3, 3), (1, 1), (2, 2), ((2, 2), (2, 2)), "wrap", 1, 3),
    "reflect": ((1, 6, 7, 2), (3, 2), (1, 1), (1, 1), ((1, 1), (0, 1)), "reflect", 1, 3),
    "negative pad": ((1, 8, 8, 2), (3, 3), (1, 1), (1, 1), ((-1, 1), (2, -1)), "constant", 1, 3),
    "grouped": ((1, 6, 6, 4), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), "constant", 2, 6),
    "two images": ((2, 5, 6, 3), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), "constant", 1, 2),
    "1-d causal": ((1, 11, 3), (3,), (1,), (1,), ((2, 0),), "constant", 1, 4),
    "3-d": (
        (1, 4, 5, 4, 2),
        (2, 3, 2),
        (1,) * 3,
        (1,) * 3,
        ((0, 1), (1, 1), (1, 0)),
        "constant",
        1,
        3,
    ),
}


def _case(name, m):
    in_shape, ks, st, dil, pads, mode, groups, cout = CASES[name]
    n = len(ks)
    x = jnp.asarray(RNG.normal(size=(m, *in_shape)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(*ks, in_shape[-1] // groups, cout)), jnp.float32)

    def conv(xi, w):  # one example: [b, *spatial, C] -> [b, *out, C_out]
        if mode != "constant":
            xi = jnp.pad(xi, [(0, 0)] + list(pads) + [(0, 0)], mode=mode)
        spec = "N" + "DHW"[3 - n :] + "C"
        return lax.conv_general_dilated(
            xi,
            w,
            st,
            [(0, 0)] * n if mode != "constant" else pads,
            rhs_dilation=dil,
            dimension_numbers=(spec, "DHW"[3 - n :] + "IO", spec),
            feature_group_count=groups,
        )

    out_shape = jax.eval_shape(conv, x[0], w).shape
    call = _Call(
        index=0,
        path="conv",
        kind="conv",
        kernel=0,
        bias=None,
        in_shape=tuple(in_shape),
        out_shape=tuple(out_shape),
        out_dtype=jnp.float32,
        kernel_size=ks,
        strides=st,
        dilation=dil,
        pads=pads,
        pad_mode=mode,
        groups=groups,
    )
    g = jnp.asarray(RNG.normal(size=(m, *out_shape)), jnp.float32)
    expected = jax.vmap(lambda xi, gi: jax.vjp(lambda w: conv(xi, w), w)[1](gi)[0])(x, g)
    return call, x, g, w, expected


@pytest.mark.parametrize("name", list(CASES))
def test_per_example_kernel_grads(name, monkeypatch):
    m = 7  # prime: chunks of 1, or of 4 with one zero example padded
    call, x, g, w, expected = _case(name, m)
    assert unfold._unfolded_bytes(call, m, True) < unfold.CHUNK_ABOVE_BYTES

    def check(**kw):
        got = jax.jit(lambda x, g: unfold.conv_kernel_grads(call, x, g, **kw))(x, g)
        got = jax.vmap(lambda gw: _kernel_grad(gw, w.shape))(got)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(jnp.max(expected)))

    check()  # all examples at once
    monkeypatch.setattr(unfold, "CHUNK_ABOVE_BYTES", 0)
    wide = all(s == 1 for s in call.strides)
    per = unfold._unfolded_bytes(call, 1, wide)
    for size, chunks in ((1, 7), (4, 2)):  # 7 chunks of 1; 2 of 4, the last one padded
        check(chunk_bytes=size * per)
        fn = functools.partial(unfold.conv_kernel_grads, call, chunk_bytes=size * per)
        jaxpr = str(jax.make_jaxpr(fn)(x, g))
        assert f"length={chunks}" in jaxpr  # lax.map (a scan) over the chunks


def test_wide_rows_outside_the_image_get_zero_gradient():
    """The extra rows of the stride-1 unfolding read real pixels; their gradient rows are 0."""
    call, x, g, _, _ = _case("3x3 same", 2)
    gw = unfold._wide_grads(g, call)
    _, _, rows = unfold._wide_geometry(call, call.in_shape[1:-1])
    assert gw.shape == (2, rows, 1, g.shape[-1])
    lines = gw.reshape(2, 9, 10, -1)  # 9 output lines of 8 pixels in a padded width of 10
    assert float(jnp.max(jnp.abs(lines[:, :, 8:]))) == 0.0
    np.testing.assert_array_equal(lines[:, :, :8], g[:, 0])
    # and the wide unfolding, restricted to the real output pixels, is `patches`
    call, x, _, _, _ = _case("3x3 same", 2)
    wide = unfold._wide_patches(x, call).reshape(2, 1, 36, 9, 10)[..., :8]
    np.testing.assert_array_equal(wide.reshape(2, 1, 36, 72), unfold.patches(x, call))
