"""One non-finite example stays its own under `VmapNorms` with grouped convolutions.

The per-example kernel gradient of a grouped convolution under ``jax.vmap`` is one XLA
convolution with the examples folded into its batch groups, and XLA's rewrite of such a
convolution multiplies every group's output gradient by the zeros that stand for the other
groups: ``0 * NaN`` put one example's NaN into every example's gradient. Each case below is
checked against an independent reference: ``jax.grad`` of one example at a time, clipped and
summed in numpy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft.privacy import clipping as C
from dpft.privacy.ghost import GhostNorms

FAST_COMPILE = {"xla_backend_optimization_level": 0}
CLIP = 1.0


class Grouped(nn.Module):
    groups: int = 2  # 4 input channels: 2 = grouped, 4 = depthwise
    features: int = 4  # 8 with groups=4: depthwise with channel multiplier 2
    masked: bool = False  # a masked kernel: GhostNorms' per-example-gradient fallback

    @nn.compact
    def __call__(self, x):  # x [N, 5, 5, 4]
        mask = jnp.ones((3, 3, 4 // self.groups, self.features)) if self.masked else None
        x = nn.Conv(self.features, (3, 3), feature_group_count=self.groups, mask=mask)(x)
        x = nn.Conv(4, (1, 1))(nn.relu(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def make(model, b=4, seed=0):
    rng = np.random.default_rng(seed)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 5, 5, 4)))

    def loss(p, example, key):
        logits = model.apply(p, example["image"][None])[0]
        return -jax.nn.log_softmax(logits)[example["label"]], ()

    batch = {
        "image": jnp.asarray(rng.normal(size=(b, 5, 5, 4)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 3, size=b), jnp.int32),
    }
    return loss, params, batch


def reference(loss, params, batch, mask):
    """Per-example gradients one example at a time (no vmap), flat-clipped and summed."""
    grad = jax.jit(jax.grad(lambda p, e: loss(p, e, None)[0]))
    total = jax.tree_util.tree_map(lambda v: np.zeros(v.shape, np.float64), params)
    norms = []
    for i in range(mask.shape[0]):
        g = grad(params, jax.tree_util.tree_map(lambda v, i=i: v[i], batch))
        leaves = [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(g)]
        norm = np.sqrt(sum(np.sum(v * v) for v in leaves))
        # a norm past sqrt(float32 max) overflows the float32 sum of squares: non-finite there
        norm = norm if norm < np.sqrt(np.finfo(np.float32).max) else np.inf
        norms.append(norm)
        if mask[i] and np.isfinite(norm):
            f = min(1.0, CLIP / norm)
            total = jax.tree_util.tree_map(lambda t, v, f=f: t + f * np.asarray(v), total, g)
    return np.asarray(norms), total


def check(strategy, loss, params, batch, mask, bad, microbatch=None):
    fn = C.clipped_grad(loss, C.FlatClip(CLIP), microbatch_size=microbatch, norm_strategy=strategy)
    out = jax.jit(fn, compiler_options=FAST_COMPILE)(params, batch, mask, jax.random.PRNGKey(0))
    norms, total = reference(loss, params, batch, np.asarray(mask))
    assert not np.isfinite(norms[bad])  # the reference agrees that this example is non-finite
    assert int(out.num_nonfinite) == 1
    np.testing.assert_allclose(np.asarray(out.norms), norms, rtol=1e-5)
    for got, want in zip(
        jax.tree_util.tree_leaves(out.grad_sum), jax.tree_util.tree_leaves(total), strict=True
    ):
        assert np.all(np.isfinite(np.asarray(got)))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "groups,features,masked,poison",
    [
        (2, 4, False, "nan"),  # grouped
        (4, 8, False, "inf"),  # depthwise, channel multiplier 2
        (2, 4, False, "overflow"),  # finite input, non-finite activations inside the model
        (2, 4, True, "nan"),
    ],
)
def test_one_nonfinite_example_is_dropped_alone(groups, features, masked, poison):
    loss, params, batch = make(Grouped(groups, features, masked))
    image = np.array(batch["image"])
    image[1, 2, 2, 0] = {"nan": np.nan, "inf": np.inf, "overflow": 3e38}[poison]
    if poison == "overflow":
        image[1] = 3e38
    batch = {**batch, "image": jnp.asarray(image)}
    mask = jnp.ones(4)
    microbatch = 2 if poison == "inf" else None  # two microbatches, one of them recomputed
    check(C.VmapNorms(), loss, params, batch, mask, 1, microbatch)
    check(GhostNorms(), loss, params, batch, mask, 1, microbatch)


def test_only_grouped_convolutions_get_the_recompute():
    """Without a grouped convolution the vmapped gradients are used as they are (no cond)."""

    def prims(model):
        loss, params, batch = make(model, b=2)
        grad = jax.grad(lambda p, x: loss(p, x, None)[0])
        jaxpr = jax.make_jaxpr(
            lambda b: C.vmap_per_example(lambda x: grad(params, x), b, jnp.ones(2))
        )(batch)
        return {e.primitive.name for e in jaxpr.jaxpr.eqns}

    assert "cond" in prims(Grouped(2, 4))
    assert "cond" not in prims(Grouped(1, 4))
