"""The Gaussian privatizer: noise scale by statistical test, independence, once per call."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from dpft.privacy.noise import gaussian_privatizer, noise_std

SIGMA, CLIP = 1.3, 2.0
STD = SIGMA * CLIP


def noise_sample(shape_tree, key=0, steps=1, dtype=jnp.float32):
    tx = gaussian_privatizer(SIGMA, CLIP, key)
    zeros = {k: jnp.zeros(s, dtype) for k, s in shape_tree.items()}
    state = tx.init(zeros)
    outs = []
    for _ in range(steps):
        out, state = tx.update(zeros, state)
        outs.append(out)
    return outs, state


def test_ks_accepts_true_scale_and_rejects_wrong_scales():
    (out,), _ = noise_sample({"w": (200, 100), "b": (5000,)}, key=7)
    x = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(out)])
    assert stats.kstest(x, "norm", args=(0, STD)).pvalue > 0.01
    assert stats.kstest(x, "norm", args=(0, 0.8 * STD)).pvalue < 1e-6
    assert stats.kstest(x, "norm", args=(0, 1.25 * STD)).pvalue < 1e-6


def test_bf16_updates_get_fp32_noise_of_the_same_scale():
    (out,), _ = noise_sample({"w": (20000,)}, key=3, dtype=jnp.bfloat16)
    assert out["w"].dtype == jnp.float32
    assert stats.kstest(np.asarray(out["w"]), "norm", args=(0, STD)).pvalue > 0.01


def _max_abs_corr(a, b):
    return abs(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_leaves_steps_and_rows_are_uncorrelated():
    outs, state = noise_sample({"u": (4000,), "v": (4000,), "m": (50, 400)}, steps=2)
    n_bound = 5 / np.sqrt(4000)  # ~5 standard errors of a correlation
    assert _max_abs_corr(outs[0]["u"], outs[0]["v"]) < n_bound  # across leaves
    assert _max_abs_corr(outs[0]["u"], outs[1]["u"]) < n_bound  # across steps
    rows = np.asarray(outs[0]["m"])  # across rows of one leaf (e.g. class rows of a head)
    corr = np.corrcoef(rows)
    off = corr[~np.eye(50, dtype=bool)]
    assert np.max(np.abs(off)) < 5 / np.sqrt(400)
    assert int(state.count) == 2


def test_noise_depends_on_key_and_is_reproducible():
    a, _ = noise_sample({"w": (100,)}, key=1)
    b, _ = noise_sample({"w": (100,)}, key=1)
    c, _ = noise_sample({"w": (100,)}, key=2)
    np.testing.assert_array_equal(a[0]["w"], b[0]["w"])
    assert not np.allclose(a[0]["w"], c[0]["w"])


def test_adds_noise_to_the_sum_once():
    tx = gaussian_privatizer(SIGMA, CLIP, 0)
    g = {"w": jnp.arange(4.0)}
    state = tx.init(g)
    out, _ = tx.update(g, state)
    zero_out, _ = tx.update({"w": jnp.zeros(4)}, state)
    np.testing.assert_allclose(out["w"] - g["w"], zero_out["w"], rtol=1e-6)


def test_jit_and_chain():
    tx = optax.chain(gaussian_privatizer(SIGMA, CLIP, jax.random.PRNGKey(0)), optax.sgd(1.0))
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    upd, state = jax.jit(tx.update)(params, state)
    assert upd["w"].shape == (3,)


def test_noise_std_edge_cases():
    assert noise_std(0.0, float("inf")) == 0.0
    assert noise_std(2.0, 3.0) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        noise_std(-1.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        noise_std(1.0, float("inf"))
