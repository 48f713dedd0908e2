"""Released clipped sums stay within their bound when the default matmul precision is low.

XLA:CPU computes every float32 matmul in float32 whatever precision is asked for, so the test
forces the low precision itself: it evaluates the traced clipped-gradient function with an
interpreter that rounds both operands of every ``dot_general`` left at the default precision to
bfloat16 (one bf16 pass, the default on TPUs) and leaves ``Precision.HIGHEST`` ones exact. One
real example with adversarial magnitudes must then contribute at most C to the clipped sum.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from dpft.privacy import clipping as C
from dpft.privacy.ghost import GhostNorms

_DEFAULT = (None, jax.lax.Precision.DEFAULT)


def _low_precision(precision) -> bool:
    if precision is None:
        return True
    if isinstance(precision, tuple):
        return any(p in _DEFAULT for p in precision)
    return precision in _DEFAULT


def _bf16(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.bfloat16).astype(x.dtype)
    return x


def _eval(jaxpr, consts, *args):
    """Evaluates ``jaxpr`` with default-precision dot_generals in one bf16 pass."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if name == "dot_general" and _low_precision(eqn.params.get("precision")):
            out = eqn.primitive.bind(*[_bf16(x) for x in vals], **eqn.params)
        elif name in ("pjit", "jit", "closed_call", "custom_jvp_call", "remat", "checkpoint") and (
            inner is not None
        ):
            closed = inner if hasattr(inner, "jaxpr") else None
            sub, sub_consts = (closed.jaxpr, closed.consts) if closed else (inner, [])
            out = _eval(sub, sub_consts, *vals)
            out = out if eqn.primitive.multiple_results else out[0]
        else:
            out = eqn.primitive.bind(*vals, **eqn.params)
        outs = out if eqn.primitive.multiple_results else [out]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def emulated(fn, *args):
    closed = jax.make_jaxpr(fn)(*args)
    flat = jax.tree_util.tree_leaves(args)
    out = _eval(closed.jaxpr, closed.consts, *flat)
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(jax.eval_shape(fn, *args)), out
    )


class Tiny(nn.Module):
    """A Dense layer on one input feature and a 1x1 Conv: scalar per-example gradients."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(1)(x[..., :1])
        c = nn.Conv(1, (1, 1))(x[None, None, :, None][..., :1, :])
        return jnp.concatenate([h, c.reshape(-1)])


def _setup():
    model = Tiny()
    params = model.init(jax.random.PRNGKey(0), jnp.ones((2,)))["params"]

    def loss(p, example, rng):
        del rng
        out = model.apply({"params": p}, example["x"])
        return jnp.sum(out * example["w"]), ()

    return params, loss


def test_the_emulation_rounds_default_precision_only():
    a = jnp.asarray([[1.0 + 2.0**-12]], jnp.float32)
    b = jnp.ones((1, 1), jnp.float32)
    assert float(emulated(lambda a, b: a @ b, a, b)[0, 0]) == 1.0
    hi = jax.lax.Precision.HIGHEST
    assert float(emulated(lambda a, b: jnp.matmul(a, b, precision=hi), a, b)[0, 0]) > 1.0


@pytest.mark.parametrize("strategy", ["vmap", "ghost"])
def test_one_example_contributes_at_most_c_at_low_default_precision(strategy):
    params, loss = _setup()
    clip = 1.0
    norms = GhostNorms() if strategy == "ghost" else None
    fn = C.clipped_grad(loss, C.FlatClip(clip), norm_strategy=norms)
    rng = np.random.default_rng(0)
    worst = 0.0
    mask = jnp.asarray([1.0, 0.0])
    for _ in range(40):  # adversarial magnitudes: the scale factor and terms far from 1
        x = jnp.asarray(rng.uniform(1, 50, (2, 2)) * np.exp(rng.uniform(-3, 3)), jnp.float32)
        w = jnp.asarray(rng.uniform(0.5, 20, (2, 2)), jnp.float32)
        out = emulated(
            lambda p, b: fn(p, b, mask, jax.random.PRNGKey(0)).grad_sum, params, {"x": x, "w": w}
        )
        sq = sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(out))
        worst = max(worst, np.sqrt(sq) / clip)
    assert 0.99 < worst <= 1 + 1e-5, f"one clipped example contributed {worst:.6f} C"
