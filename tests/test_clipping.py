"""Privacy and exactness properties of per-example clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft.privacy import clipping as C
from dpft.privacy import keys as keys_lib

# A linear "loss" whose per-example gradient w.r.t. params is exactly the example's vectors:
# this lets a test feed any gradient it likes (huge, NaN, Inf, zero) straight into the clipper.
SHAPES = {"a": (3,), "b": (2, 2)}


def linear_loss(params, example, rng):
    del rng
    loss = sum(jnp.sum(params[k] * example[k]) for k in params)
    return loss, {"x0": example["a"][0]}


def zeros():
    return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}


def examples(rows):
    """rows: array [B, 7] -> example pytree with leaves a [B,3] and b [B,2,2]."""
    rows = jnp.asarray(rows, jnp.float32)
    return {"a": rows[:, :3], "b": rows[:, 3:].reshape(-1, 2, 2)}


def flat(tree):
    return np.concatenate([np.ravel(tree["a"]), np.ravel(tree["b"])])


CLIPPERS = {
    "flat": C.FlatClip(1.5),
    "per_layer": C.PerLayerClip({"a": 0.5, "b": 2.0}),
    "per_layer_uniform": C.PerLayerClip(0.7),
    "auto": C.AutoClip(gamma=0.01, scale=2.0),
    "global": C.GlobalClip(clip_norm=1.0, threshold=5.0),
}


def adversarial_rows(rng, b):
    rows = rng.normal(size=(b, 7)) * rng.choice([1e-3, 1.0, 1e3], size=(b, 1))
    rows[0] = 0.0
    rows[1, 2] = np.nan
    rows[2, 4] = np.inf
    rows[3] = 1e18  # finite but its squared norm overflows float32
    rows[4] = -1e4
    rows[5, :3] = 1e-30
    return rows


@pytest.mark.parametrize("name", sorted(CLIPPERS))
@pytest.mark.parametrize("microbatch", [None, 3])
def test_neighbouring_sums_within_sensitivity(name, microbatch):
    clipper = CLIPPERS[name]
    params = zeros()
    sens = clipper.sensitivity(params)
    fn = jax.jit(C.clipped_grad(linear_loss, clipper, microbatch_size=microbatch))
    rng = np.random.default_rng(0)
    key = jax.random.PRNGKey(1)
    worst = 0.0
    for trial in range(4):
        b = 12
        rows = adversarial_rows(rng, b)
        rng.shuffle(rows)
        mask = np.ones(b, np.float32)
        mask[-2:] = 0  # padding rows
        base = flat(fn(params, examples(rows), jnp.asarray(mask), key).grad_sum)
        assert np.all(np.isfinite(base))
        for i in range(b - 2):
            # remove example i (mask it out): add/remove-one neighbour
            m2 = mask.copy()
            m2[i] = 0
            removed = flat(fn(params, examples(rows), jnp.asarray(m2), key).grad_sum)
            worst = max(worst, np.linalg.norm(base - removed) / sens)
            # replace example i by an adversarial one: replace-one neighbour (2x sensitivity)
            r2 = rows.copy()
            r2[i] = rng.normal(size=7) * 10.0 ** rng.integers(-3, 6)
            replaced = flat(fn(params, examples(r2), jnp.asarray(mask), key).grad_sum)
            assert np.linalg.norm(base - replaced) <= 2 * sens * (1 + 1e-5)
        # add a new example in a padding slot
        m3 = mask.copy()
        m3[-1] = 1
        r3 = rows.copy()
        r3[-1] = 1e6 * rng.normal(size=7)
        added = flat(fn(params, examples(r3), jnp.asarray(m3), key).grad_sum)
        worst = max(worst, np.linalg.norm(base - added) / sens)
        del trial
    assert worst <= 1 + 1e-5, f"{name}: neighbour distance {worst} x sensitivity"
    assert worst > 0.3, "the test should exercise examples near the bound"


def test_padding_contributes_exactly_zero_and_nonfinite_counted():
    fn = jax.jit(C.clipped_grad(linear_loss, C.FlatClip(1.0), microbatch_size=2))
    rows = np.ones((5, 7))
    rows[1, 0] = np.nan
    rows[2, 0] = np.inf
    mask = jnp.asarray([1, 1, 1, 0, 0], jnp.float32)
    out = fn(zeros(), examples(rows), mask, jax.random.PRNGKey(0))
    single = C.clipped_grad(linear_loss, C.FlatClip(1.0))
    only_first = single(zeros(), examples(rows[:1]), jnp.ones(1), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(flat(out.grad_sum), flat(only_first.grad_sum))
    assert int(out.num_nonfinite) == 2
    assert int(out.num_clipped) == 1
    # garbage in padding rows changes nothing
    rows[3:] = np.nan
    out2 = fn(zeros(), examples(rows), mask, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(flat(out.grad_sum), flat(out2.grad_sum))
    assert int(out2.num_nonfinite) == 2


def test_flat_clip_values():
    fn = C.clipped_grad(linear_loss, C.FlatClip(1.0))
    rows = np.zeros((2, 7))
    rows[0, :2] = [3.0, 4.0]  # norm 5 -> scaled to 1
    rows[1, :2] = [0.3, 0.4]  # norm 0.5 -> unchanged
    out = fn(zeros(), examples(rows), jnp.ones(2), jax.random.PRNGKey(0))
    np.testing.assert_allclose(flat(out.grad_sum)[:2], [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)
    np.testing.assert_allclose(out.norms, [5.0, 0.5], rtol=1e-6)


def test_global_clip_scales_kept_and_drops_large():
    fn = C.clipped_grad(linear_loss, C.GlobalClip(clip_norm=2.0, threshold=4.0))
    rows = np.zeros((3, 7))
    rows[0, 0] = 3.0  # kept, scaled by R/Z = 0.5
    rows[1, 1] = 1.0  # kept, scaled by 0.5
    rows[2, 2] = 5.0  # above Z: dropped
    out = fn(zeros(), examples(rows), jnp.ones(3), jax.random.PRNGKey(0))
    np.testing.assert_allclose(flat(out.grad_sum)[:3], [1.5, 0.5, 0.0], rtol=1e-6)


def test_auto_clip_normalizes():
    fn = C.clipped_grad(linear_loss, C.AutoClip(gamma=0.0 + 1e-6))
    rows = np.zeros((1, 7))
    rows[0, :2] = [30.0, 40.0]
    out = fn(zeros(), examples(rows), jnp.ones(1), jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.linalg.norm(flat(out.grad_sum)), 1.0, rtol=1e-5)


def test_per_layer_groups_and_sensitivity():
    clip = C.PerLayerClip({"a": 3.0, "b": 4.0})
    assert clip.sensitivity(zeros()) == pytest.approx(5.0)
    fn = C.clipped_grad(linear_loss, clip)
    rows = np.full((1, 7), 100.0)
    out = fn(zeros(), examples(rows), jnp.ones(1), jax.random.PRNGKey(0))
    g = out.grad_sum
    np.testing.assert_allclose(np.linalg.norm(g["a"]), 3.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(g["b"]), 4.0, rtol=1e-5)
    grouped = C.PerLayerClip(1.0, group_fn=lambda path: "all")
    assert grouped.sensitivity(zeros()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no entry"):
        C.PerLayerClip({"a": 1.0}).sensitivity(zeros())


def mlp_loss(params, example, rng):
    h = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
    h = h * jax.random.bernoulli(rng, 0.9, h.shape)  # per-example randomness (dropout-like)
    logits = h @ params["w2"]
    loss = -jax.nn.log_softmax(logits)[example["y"]]
    return loss, {"correct": jnp.argmax(logits) == example["y"]}


def mlp_setup(b=23, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "w1": jax.random.normal(k[0], (5, 8)),
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k[1], (8, 3)),
    }
    batch = {"x": jax.random.normal(k[2], (b, 5)), "y": jax.random.randint(k[3], (b,), 0, 3)}
    return params, batch


@pytest.mark.parametrize("microbatch", [1, 4, 5, 7, 23])
@pytest.mark.parametrize("name", ["flat", "auto"])
def test_microbatched_equals_unmicrobatched(microbatch, name):
    clipper = {"flat": C.FlatClip(0.5), "auto": C.AutoClip()}[name]
    params, batch = mlp_setup()
    mask = jnp.asarray(np.random.default_rng(0).random(23) < 0.8, jnp.float32)
    key = jax.random.PRNGKey(3)
    ref = jax.jit(C.clipped_grad(mlp_loss, clipper))(params, batch, mask, key)
    got = jax.jit(C.clipped_grad(mlp_loss, clipper, microbatch_size=microbatch))(
        params, batch, mask, key
    )
    for k in params:
        np.testing.assert_allclose(got.grad_sum[k], ref.grad_sum[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.norms, ref.norms, rtol=1e-5)
    np.testing.assert_array_equal(got.aux["correct"], ref.aux["correct"])
    assert got.norms.shape == (23,)


@pytest.mark.parametrize("unroll", [2, True])
def test_unrolled_microbatch_loop_equals_the_loop(unroll):
    params, batch = mlp_setup()
    mask = jnp.asarray(np.random.default_rng(1).random(23) < 0.8, jnp.float32)
    key = jax.random.PRNGKey(5)
    clipper = C.FlatClip(0.5)
    loop = jax.jit(C.clipped_grad(mlp_loss, clipper, microbatch_size=4))
    fast = jax.jit(C.clipped_grad(mlp_loss, clipper, microbatch_size=4, unroll=unroll))
    ref, got = loop(params, batch, mask, key), fast(params, batch, mask, key)
    for k in params:
        np.testing.assert_allclose(got.grad_sum[k], ref.grad_sum[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.norms, ref.norms, rtol=1e-6)
    hlo = fast.lower(params, batch, mask, key).compile().as_text()
    # The microbatch loop carries float sums (the PRNG's own loops carry only u32 words).
    loops = [line for line in hlo.splitlines() if " while(" in line and "f32[" in line]
    assert bool(loops) == (unroll is not True)  # True: straight-line code, no loop


def test_no_clip_equals_sum_of_plain_gradients():
    params, batch = mlp_setup(b=9)
    key = jax.random.PRNGKey(0)
    out = C.clipped_grad(mlp_loss, C.FlatClip(float("inf")), microbatch_size=4)(
        params, batch, jnp.ones(9), key
    )

    def total(p):
        keys = [keys_lib.derive(key, "example", i) for i in range(9)]
        return sum(
            mlp_loss(p, jax.tree_util.tree_map(lambda a, i=i: a[i], batch), keys[i])[0]
            for i in range(9)
        )

    ref = jax.grad(total)(params)
    for k in params:
        np.testing.assert_allclose(out.grad_sum[k], ref[k], rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="clip_norm"):
        C.FlatClip(0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        C.FlatClip(-1.0)
    with pytest.raises(ValueError, match="microbatch_size"):
        C.clipped_grad(linear_loss, C.FlatClip(1.0), microbatch_size=0)
    fn = C.clipped_grad(linear_loss, C.FlatClip(1.0), microbatch_size=8)
    with pytest.raises(ValueError, match="microbatch_size=8 is larger than the batch size 4"):
        fn(zeros(), examples(np.ones((4, 7))), jnp.ones(4), jax.random.PRNGKey(0))


def test_grad_sum_is_float32_for_bf16_params():
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), zeros())
    fn = C.clipped_grad(linear_loss, C.FlatClip(1.0))
    out = fn(params, examples(np.ones((3, 7))), jnp.ones(3), jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(out.grad_sum))
