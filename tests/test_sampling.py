"""Poisson and shuffle samplers: distribution, padding, determinism and resumption."""

import numpy as np
import pytest
from scipy import stats

from dpft.privacy.sampling import (
    PoissonSampler,
    ShuffleSampler,
    overflow_probability,
    poisson_batch_cap,
)


def test_poisson_batch_sizes_follow_binomial():
    n, q = 5000, 0.02
    s = PoissonSampler(n, q, seed=0)
    sizes = np.array([s.next().size for _ in range(3000)])
    # chi-square goodness of fit on bins with enough expected mass
    lo, hi = int(stats.binom.ppf(0.01, n, q)), int(stats.binom.ppf(0.99, n, q))
    edges = np.arange(lo, hi + 2)
    observed = np.array(
        [np.sum(sizes < lo)] + [np.sum(sizes == k) for k in edges[:-1]] + [np.sum(sizes > hi)]
    )
    probs = np.concatenate(
        [
            [stats.binom.cdf(lo - 1, n, q)],
            stats.binom.pmf(edges[:-1], n, q),
            [stats.binom.sf(hi, n, q)],
        ]
    )
    assert stats.chisquare(observed, probs / probs.sum() * len(sizes)).pvalue > 0.001
    # and the test has power: the same sizes are rejected as Binomial(n, 1.1 q)
    q2 = 1.1 * q
    assert stats.kstest(sizes, stats.binom(n, q2).cdf).pvalue < 1e-6


def test_poisson_inclusion_is_uniform_over_examples():
    n, q, steps = 200, 0.1, 2000
    s = PoissonSampler(n, q, seed=1)
    counts = np.zeros(n)
    for _ in range(steps):
        b = s.next()
        np.add.at(counts, b.indices[b.mask], 1)
        assert len(set(b.indices[b.mask].tolist())) == b.size  # no duplicates in a batch
    # each example's count ~ Binomial(steps, q): compare the spread to the binomial variance
    z = (counts - steps * q) / np.sqrt(steps * q * (1 - q))
    assert stats.kstest(z, "norm").pvalue > 0.001


def test_padding_is_masked_and_shape_is_static():
    s = PoissonSampler(1000, 0.01, seed=2)
    shapes = set()
    for _ in range(50):
        b = s.next()
        shapes.add(b.indices.shape)
        assert np.all(b.mask[: b.size]) and not np.any(b.mask[b.size :])
        assert np.all(b.indices[~b.mask] == 0)
    assert shapes == {(s.max_batch_size,)}
    assert s.overflow_prob <= 1e-12


def test_cap_and_truncation():
    n, q = 10000, 0.05
    cap = poisson_batch_cap(n, q, 1e-9)
    assert overflow_probability(n, q, cap) <= 1e-9 < overflow_probability(n, q, cap - 1)
    s = PoissonSampler(n, q, seed=0, max_batch_size=480)  # below the mean of 500: truncates
    sizes = [s.next().size for _ in range(20)]
    assert max(sizes) == 480
    assert s.overflow_prob > 0.5


def test_state_save_and_restore_continue_the_same_sequence():
    a = PoissonSampler(3000, 0.03, seed=5)
    for _ in range(7):
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(5)]
    b = PoissonSampler(3000, 0.03, seed=5)
    b.load_state_dict(state)
    for e in expected:
        got = b.next()
        np.testing.assert_array_equal(got.indices, e.indices)
        np.testing.assert_array_equal(got.mask, e.mask)
    with pytest.raises(ValueError, match="seed"):
        PoissonSampler(3000, 0.03, seed=6).load_state_dict(state)


def test_shuffle_epochs_cover_distinct_examples():
    s = ShuffleSampler(100, 30, seed=0)
    assert s.steps_per_epoch == 3
    seen = np.concatenate([s.next().indices for _ in range(3)])
    assert len(set(seen.tolist())) == 90
    nxt = s.next()
    assert nxt.indices.shape == (30,) and nxt.mask.all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_examples": 0, "sampling_rate": 0.1}, "num_examples"),
        ({"num_examples": 10, "sampling_rate": 0.0}, "sampling_rate"),
        ({"num_examples": 10, "sampling_rate": 1.5}, "sampling_rate"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoissonSampler(seed=0, **kwargs)
