"""User-level DP (``config.dp.unit='user'``, `dpft.privacy.users`): sensitivity with adversarial
users, the user sampler, the user-level accounting, the per-user gradient and the trainer."""

import json
import math

import dp_accounting as dpa
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import crash_at_metrics, latest_checkpoint, needs_data, tiny_mnist_config
from dp_accounting.pld import pld_privacy_accountant as pld
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from scipy import stats

from dpft.__main__ import train_and_evaluate
from dpft.config import base_config
from dpft.privacy import accounting, users
from dpft.privacy import clipping as C
from dpft.privacy.ghost import GhostNorms
from dpft.train import build
from dpft.train.step import flatten, stacked_cross_entropy

CLIP = 1.0
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # compiling dominates; running is quick


class Tiny(nn.Module):
    """A conv and a Dense on 6x6x2 images: both layer kinds of the ghost norms."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), name="conv")(x))
        return nn.Dense(4, name="linear")(x.reshape(x.shape[0], -1))


def tiny_model():
    model = Tiny()
    params = flatten(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2))))
    return model, params


def data(sizes, seed=0):
    """Images, labels and user ids of users holding ``sizes[u]`` examples each."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(len(sizes)), sizes)
    n = len(ids)
    images = rng.normal(size=(n, 6, 6, 2)).astype(np.float32)
    return {"image": images, "label": rng.integers(0, 4, n).astype(np.int32)}, ids


def gathered(arrays, batch):
    """The step's batch of a `users.UserBatch`, as `BatchLoader` and the step build it."""
    out = {k: jnp.asarray(np.take(v, batch.indices, axis=0)) for k, v in arrays.items()}
    return users.split_user_mask({**out, "mask": batch.mask.astype(np.float32)})


def user_clipped_sum(model, params, arrays, ids, k, strategy=None, clip=CLIP):
    """The noiseless user-level clipped sum with every user sampled (q = 1)."""
    sampler = users.UserPoissonSampler(ids, 1.0, k, seed=0)
    batch = gathered(arrays, sampler.batch_at(0))
    mask = batch.pop("mask")
    loss = users.per_user_loss(stacked_cross_entropy(model.apply))
    fn = C.clipped_grad(
        lambda p, ex, key: loss(p, {}, ex, key), C.FlatClip(clip), norm_strategy=strategy
    )
    return jax.jit(fn, compiler_options=FAST_COMPILE)(params, batch, mask, jax.random.PRNGKey(1))


def example_clipped_sum(model, params, arrays, clip=CLIP):
    """The noiseless example-level clipped sum of the same data (one unit per example)."""

    def loss(p, ex, key):
        one = {k: v[None] for k, v in ex.items()}
        losses, aux = stacked_cross_entropy(model.apply)(p, {}, one, key)
        return losses[0], aux

    fn = jax.jit(C.clipped_grad(loss, C.FlatClip(clip)), compiler_options=FAST_COMPILE)
    mask = jnp.ones(len(arrays["label"]))
    return fn(params, {k: jnp.asarray(v) for k, v in arrays.items()}, mask, jax.random.PRNGKey(1))


def tree_norm(a, b):
    return math.sqrt(sum(float(jnp.sum((a[k] - b[k]) ** 2)) for k in a))


# ------------------------------------------------------------------ sensitivity


@pytest.mark.parametrize("strategy", [None, GhostNorms()], ids=["vmap", "ghost"])
def test_adversarial_user_with_many_examples_moves_the_sum_by_at_most_c(strategy):
    """One user holds 50 copies of an example with huge inputs and a wrong label: with it or
    without it, the user-level clipped sum differs by C (attained), while example-level
    clipping of the same data differs by 50 C."""
    model, params = tiny_model()
    honest, ids = data([3, 2], seed=1)
    rng = np.random.default_rng(2)
    bad = {
        "image": np.repeat(1e3 * rng.normal(size=(1, 6, 6, 2)), 50, 0).astype(np.float32),
        "label": np.full(50, 3, np.int32),
    }
    both = {k: np.concatenate([honest[k], bad[k]]) for k in honest}
    both_ids = np.concatenate([ids, np.full(50, 99)])
    k = 50
    with_user = user_clipped_sum(model, params, both, both_ids, k, strategy)
    without = user_clipped_sum(model, params, honest, ids, k, strategy)
    diff = tree_norm(with_user.grad_sum, without.grad_sum)
    assert diff <= CLIP * (1 + 1e-4)
    assert diff >= 0.99 * CLIP  # the bound is attained: the user's unit is clipped to C
    ex_with = example_clipped_sum(model, params, both)
    ex_without = example_clipped_sum(model, params, honest)
    assert tree_norm(ex_with.grad_sum, ex_without.grad_sum) > 45 * CLIP


def test_per_user_gradient_is_the_mean_of_its_examples_and_ghost_equals_vmap():
    model, params = tiny_model()
    arrays, ids = data([1, 4, 7, 2], seed=3)  # user 2 has more than k = 5 examples
    k = 5
    sampler = users.UserPoissonSampler(ids, 1.0, k, seed=0)  # as `user_clipped_sum`'s
    ub = sampler.batch_at(0)
    big = 1e6  # no clipping: the sum of the users' mean gradients
    out = user_clipped_sum(model, params, arrays, ids, k, clip=big)
    per_example = stacked_cross_entropy(model.apply)

    def one(p, ex):
        return per_example(p, {}, ex, None)[0][0]

    grad = jax.jit(jax.grad(one), compiler_options=FAST_COMPILE)
    expected = {key: np.zeros(v.shape, np.float32) for key, v in params.items()}
    for row, m in zip(ub.indices, ub.mask, strict=True):
        chosen = row[m]
        for i in chosen:
            g = grad(params, {key: jnp.asarray(v[i : i + 1]) for key, v in arrays.items()})
            for key in expected:
                expected[key] += np.asarray(g[key]) / len(chosen)
    for key in expected:
        np.testing.assert_allclose(out.grad_sum[key], expected[key], rtol=2e-4, atol=1e-6)
    # ghost norms: the same norms and clipped sum (all users clipped at a small C)
    vmap = user_clipped_sum(model, params, arrays, ids, k, clip=1e-3)
    ghost = user_clipped_sum(model, params, arrays, ids, k, GhostNorms(), clip=1e-3)
    assert int(vmap.num_clipped) == int(ghost.num_clipped) == 4
    np.testing.assert_allclose(ghost.norms, vmap.norms, rtol=1e-4)
    for key in params:
        np.testing.assert_allclose(ghost.grad_sum[key], vmap.grad_sum[key], rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------ sampler


def test_sampled_examples_belong_to_their_user_and_padding_has_zero_weight():
    sizes = [1, 3, 12, 5, 8, 2]
    ids = np.repeat(np.arange(len(sizes)), sizes)
    ids = np.random.default_rng(0).permutation(ids)  # users' examples interleaved
    k = 5
    s = users.UserPoissonSampler(ids, 0.5, k, seed=1, max_users=6)
    seen = {u: set() for u in range(len(sizes))}
    for t in range(200):
        b = s.batch_at(t)
        assert b.indices.shape == b.mask.shape == (6, k)
        for row, m in zip(b.indices, b.mask, strict=True):
            if not m.any():
                assert np.all(row == 0)  # a padding row: no example, zero weight
                continue
            owner = ids[row[m]]
            assert len(set(owner)) == 1 and len(set(row[m])) == m.sum()  # one user, distinct
            u = int(owner[0])
            assert m.sum() == min(sizes[u], k)
            assert np.all(m[: m.sum()]) and np.all(row[~m] == 0)  # padding slots at the end
            seen[u].update(row[m].tolist())
        split = gathered({"x": np.arange(len(ids))}, b)
        np.testing.assert_array_equal(split["mask"], b.user_mask.astype(np.float32))
        np.testing.assert_array_equal(split["weight"], b.mask.astype(np.float32))
    # a user with more than k examples: every one of them gets sampled at some step
    assert seen[2] == set(np.flatnonzero(ids == 2).tolist())


def test_user_inclusion_frequency_matches_q():
    ids = np.repeat(np.arange(40), 3)
    q, steps = 0.25, 300
    s = users.UserPoissonSampler(ids, q, 2, seed=5)
    counts = np.zeros(40)
    for t in range(steps):
        b = s.batch_at(t)
        counts[np.unique(ids[b.indices[b.mask]])] += 1
    total = counts.sum()  # Binomial(40 * steps, q)
    lo, hi = stats.binom.interval(1 - 1e-6, 40 * steps, q)
    assert lo <= total <= hi
    lo, hi = stats.binom.interval(1 - 1e-6 / 40, steps, q)  # each user, Bonferroni
    assert np.all((lo <= counts) & (counts <= hi))


def test_resume_continues_the_same_sequence_and_truncation_keeps_the_cap():
    ids = np.repeat(np.arange(10), 2)
    a = users.UserPoissonSampler(ids, 0.3, 2, seed=7)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    b = users.UserPoissonSampler(ids, 0.3, 2, seed=7)
    b.load_state_dict(state)
    for _ in range(5):
        x, y = a.next(), b.next()
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_array_equal(x.mask, y.mask)
    with pytest.raises(ValueError, match="seed mismatch"):
        users.UserPoissonSampler(ids, 0.3, 2, seed=8).load_state_dict(state)
    capped = users.UserPoissonSampler(ids, 1.0, 2, seed=7, max_users=3)
    picked = set()
    for t in range(30):
        batch = capped.batch_at(t)
        assert batch.size == 3  # 10 users drawn, 3 kept
        picked.add(tuple(np.unique(ids[batch.indices[batch.mask]])))
    assert len(picked) > 5  # a random subset of the users, not always the same


def test_synthetic_users_are_public_and_balanced():
    ids = users.synthetic_user_ids(103, 10, seed=0)
    np.testing.assert_array_equal(ids, users.synthetic_user_ids(103, 10, seed=0))
    assert sorted(np.bincount(ids).tolist()) == [10] * 7 + [11] * 3
    assert not np.array_equal(ids, users.synthetic_user_ids(103, 10, seed=1))
    with pytest.raises(ValueError, match="config.dp.num_users must be an int in"):
        users.synthetic_user_ids(10, 11, seed=0)


def test_the_datas_own_user_array_is_used_and_removed_from_the_arrays():
    c = base_config()
    c.dp.unit, c.dp.examples_per_user = "user", 2
    arrays = {"label": np.zeros(6, np.int32), "user": np.asarray([5, 5, 9, 1, 9, 9])}
    ids = build.user_ids(c, arrays)
    np.testing.assert_array_equal(ids, [5, 5, 9, 1, 9, 9])
    assert "user" not in arrays  # the step never sees it
    members = users.user_members(ids)  # users in sorted id order: 1, 5, 9
    assert [m.tolist() for m in members] == [[3], [0, 1], [2, 4, 5]]
    bad = {"label": np.zeros(6, np.int32), "user": np.zeros(5, np.int64)}
    with pytest.raises(ValueError, match="'user' array must hold one int id per example"):
        build.user_ids(c, bad)
    c.dp.unit = "example"
    assert build.user_ids(c, {"label": np.zeros(6)}) is None


# ------------------------------------------------------------------ accounting


# the users of the accounting and trainer tests: 30 of 10 examples each
THIRTY_USERS = {"unit": "user", "num_users": 30, "examples_per_user": 10}


def user_config(**kw):
    """`base_config` at the user level: `THIRTY_USERS` at (2, 1e-3)-DP, 6 users a batch for 2
    epochs; ``kw`` sets fields of ``config.train`` or else of ``config.dp``."""
    c = base_config()
    c.dp.update({**THIRTY_USERS, "epsilon": 2.0, "delta": 1e-3})
    c.train.update(batch_size=6, epochs=2.0)
    for key, v in kw.items():
        setattr(c.train if key in c.train else c.dp, key, v)
    return c


def direct_epsilon(q, steps, sigma, delta, accountant="pld"):
    """dp-accounting's Poisson-subsampled Gaussian, composed ``steps`` times (PLD or RDP)."""
    event = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
    kind = pld.PLDAccountant if accountant == "pld" else rdp.RdpAccountant
    acc = kind(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return acc.compose(dpa.SelfComposedDpEvent(event, steps)).get_epsilon(delta)


def test_plan_accounts_users_and_calibrates_to_the_target():
    """Calibrated with RDP here (fast); the trainer test checks a PLD epsilon the same way."""
    ids = users.synthetic_user_ids(300, 30, seed=0)
    c = user_config(max_batch_size=30, accountant="rdp")  # no truncation: plain Poisson event
    plan = build.plan_privacy(c, 300, user_ids=ids)
    assert (plan.unit, plan.num_users, plan.examples_per_user) == ("user", 30, 10)
    assert plan.sampling_rate == 6 / 30 and plan.expected_batch_size == 6
    assert plan.steps == math.ceil(2.0 * 30 / 6)  # epochs over users, not examples
    sigma = plan.noise_multiplier
    eps = accounting.compute_epsilon(plan.entry().with_count(plan.steps), plan.delta, "rdp")
    direct = direct_epsilon(6 / 30, plan.steps, sigma, plan.delta, "rdp")
    assert eps == pytest.approx(direct, rel=1e-4)
    assert eps <= 2.0 and direct <= 2.0 * (1 + 1e-6)
    assert direct_epsilon(6 / 30, plan.steps, sigma * 0.99, plan.delta, "rdp") > 2.0  # tight
    # the same data at the example level: another rate, steps and dataset size
    fixed = {"noise_multiplier": 1.0, "max_batch_size": 30}
    example = build.plan_privacy(user_config(unit="example", **fixed), 300)
    assert (example.sampling_rate, example.steps, example.unit) == (6 / 300, 100, "example")
    assert example.entry().dataset_size == 300 and plan.entry().dataset_size == 30
    # the default cap counts users
    capped = build.plan_privacy(user_config(noise_multiplier=1.0), 300, user_ids=ids)
    assert 6 < capped.max_batch_size <= 30
    assert capped.entry().max_batch_size == capped.max_batch_size


# ------------------------------------------------------------------ trainer


def tiny_user_config(**dp):
    """conftest's tiny MNIST run as 30 users of 10 examples: a linear model, 4 steps."""
    c = tiny_mnist_config(
        "tiny_user", **{**THIRTY_USERS, "noise_multiplier": 1.0, "delta": 1e-3, **dp}
    )
    c.plots, c.model.name = False, "linear"
    c.data.update(train_subset=300, eval_subset=100)
    # batch_size counts users; a cap of all 30: the accounting is the plain Poisson event
    c.train.update(batch_size=6, max_batch_size=30, steps=4, microbatch_size=10)
    c.train.update(eval_every=2, checkpoint_every=2)
    return c


@needs_data
def test_end_to_end_user_level_run_and_exact_resume(tmp_path, compilation_cache):
    summary = train_and_evaluate(tiny_user_config(), tmp_path / "a")
    assert summary["privacy_unit"] == "user"
    assert (summary["num_users"], summary["examples_per_user"]) == (30, 10)
    assert summary["steps"] == 4 and summary["sampling_rate"] == 6 / 30
    assert summary["epsilon"] == pytest.approx(direct_epsilon(0.2, 4, 1.0, 1e-3), rel=1e-4)
    written = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert written["privacy_unit"] == "user" and "user" in written["trained"]["train"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    with crash_at_metrics(2):
        train_and_evaluate(tiny_user_config(), tmp_path / "b")
    resumed = train_and_evaluate(tiny_user_config(), tmp_path / "b")
    assert resumed["epsilon"] == summary["epsilon"]
    arrays_a, _ = latest_checkpoint(tmp_path / "a")
    arrays_b, _ = latest_checkpoint(tmp_path / "b")
    leaves_a, leaves_b = jax.tree_util.tree_leaves(arrays_a), jax.tree_util.tree_leaves(arrays_b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


REFUSED = [
    ({"dp.unit": "users"}, "config.dp.unit must be example|user"),
    ({"dp.examples_per_user": 0}, "config.dp.examples_per_user must be an int >= 1"),
    ({"data.pipeline": "grain"}, "config.data.pipeline='grain'"),
    ({"train.host_chunk_size": 10}, "config.train.host_chunk_size > 0"),
    ({"train.microbatch_size": -1}, "config.train.microbatch_size=-1"),
    ({"dp.noise": "banded_mf", "dp.band": 2}, "config.dp.noise='banded_mf'"),
    ({"dp.adaptive_quantile": 0.5}, "config.dp.adaptive_quantile > 0"),
    ({"parallel.data": 2}, "config.parallel.data != 1"),
    ({"finetune.mode": "lp_ft"}, "config.finetune.mode='lp_ft'"),
    ({"data.augmult": 2}, "config.data.augmult > 1 or config.data.augment"),
]


BAD_KEYS = [  # checked once the data (its number of examples and users) is known
    ({"dp.num_users": 0}, "config.dp.num_users must be an int in [1, 300]"),
    ({"train.batch_size": 31}, "config.train.batch_size (expected users per step"),
    ({"dp.delta": 0.05}, "config.dp.delta must be in (0, 1/N = 0.0333)"),
]


@pytest.mark.parametrize(
    "changes,needle",
    REFUSED + [pytest.param(*r, marks=needs_data) for r in BAD_KEYS],
    ids=[r[1][:30] for r in REFUSED + BAD_KEYS],
)
def test_unsupported_combinations_and_bad_keys_are_one_line_errors(changes, needle, tmp_path):
    c = tiny_user_config()
    for key, v in changes.items():
        section, name = key.split(".")
        c[section][name] = v
    with pytest.raises(ValueError) as err:
        train_and_evaluate(c, tmp_path / "w")
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "w").exists()


def test_user_config_plans_at_the_user_level():
    from importlib import util

    spec = util.spec_from_file_location("fmnist_user", "configs/fmnist_user.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg in ("3", "1", "smoke"):
        c = module.get_config(arg)
        c.dp.noise_multiplier = 1.0  # no calibration: this checks the units only
        n = c.data.train_subset or 60000
        plan = build.plan_privacy(c, n, user_ids=users.synthetic_user_ids(n, c.dp.num_users, 0))
        assert plan.unit == "user" and plan.num_users == n // 10
