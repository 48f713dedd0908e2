"""`dpft.models.pool.max_pool` equals ``flax.linen.max_pool`` in value and gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft.models.pool import max_pool

CASES = [
    ((3, 14, 14, 16), (2, 2), (1, 1), "VALID"),  # SampleConvNet's first pool
    ((2, 9, 9, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),  # the ImageNet ResNet stem
    ((9, 9, 4), (3, 3), (2, 2), "SAME"),  # no batch axis
    ((2, 3, 8, 7, 2), (2, 3), (2, 1), "SAME"),  # two leading axes, odd sizes
    ((2, 10, 3), (4,), (3,), "VALID"),  # one spatial axis
]


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_value_and_gradient_match_flax(shape, window, strides, padding):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    ours = max_pool(x, window, strides, padding)
    ref = nn.max_pool(x, window, strides=strides, padding=padding)
    np.testing.assert_array_equal(ours, ref)

    def loss(pool):
        return lambda x: jnp.sum(jnp.sin(pool(x)) * jnp.arange(ref.size).reshape(ref.shape))

    g_ours = jax.grad(loss(lambda x: max_pool(x, window, strides, padding)))(x)
    g_ref = jax.grad(loss(lambda x: nn.max_pool(x, window, strides=strides, padding=padding)))(x)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-6, atol=1e-6)


def test_ties_split_the_gradient_and_keep_its_sum():
    x = jnp.zeros((1, 2, 2, 1))
    g = jax.grad(lambda x: max_pool(x, (2, 2)).sum())(x)
    assert float(g.sum()) == pytest.approx(1.0)
    assert float(g.min()) >= 0.0


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="strides"):
        max_pool(jnp.zeros((1, 4, 4, 1)), (2, 2), (1,))
    with pytest.raises(ValueError, match="feature axis"):
        max_pool(jnp.zeros((4, 4)), (2, 2))
