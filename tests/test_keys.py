"""Key derivation from disjoint domains, the root key of a secret, and the trainer's key scheme."""

import itertools

import jax
import numpy as np
import pytest

from dpft.privacy import keys, noise
from dpft.train import trainer


def _as_tuple(key) -> tuple:
    return tuple(int(w) for w in np.asarray(jax.random.key_data(key) if _typed(key) else key))


def _typed(key) -> bool:
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def test_purpose_tags_are_distinct_and_unknown_purposes_refused():
    tags = [keys.purpose_tag(p) for p in keys.PURPOSES]
    assert len(set(tags)) == len(tags)
    with pytest.raises(ValueError, match="unknown key purpose"):
        keys.derive(keys.root_key(0), "nosie", 1)


def test_no_two_purposes_share_a_key():
    root = keys.root_key(0)
    seen: dict[tuple, tuple] = {}
    for purpose in keys.PURPOSES:
        for idx in [(), *((i,) for i in range(12)), *itertools.product(range(4), range(4))]:
            k = _as_tuple(keys.derive(root, purpose, *idx))
            assert k not in seen, f"{(purpose, idx)} shares a key with {seen[k]}"
            seen[k] = (purpose, idx)
    # and no derived key equals the root or the root's plain index folds
    for i in range(12):
        assert _as_tuple(jax.random.fold_in(root, i)) not in seen
    assert _as_tuple(root) not in seen


def _trainer_keys(noise_key, examples_key, step_key, phases=3, steps=40) -> dict:
    """Every key a multi-phase run derives from one root, named by its use."""
    root = keys.root_key(0)
    out = {}
    for p in range(phases):
        k = noise_key(root, p)
        out[("phase", p)] = k
        for t in range(steps):
            out[("noise step", p, t)] = step_key(k, t)
    for t in range(steps):
        out[("examples", t)] = examples_key(root, t)
    return out


def _assert_distinct(named: dict) -> None:
    seen: dict[tuple, object] = {}
    for name, k in named.items():
        k = _as_tuple(k)
        assert k not in seen, f"{name} and {seen[k]} share a key"
        seen[k] = name


def test_trainer_phase_step_and_example_keys_are_disjoint():
    _assert_distinct(_trainer_keys(trainer.noise_key, trainer.examples_key, noise.step_key))


def test_plain_fold_in_chains_would_collide():
    # The scheme the test above rules out: phase i's key fold_in(K0, i) under the noise root K0
    # equals step i's key fold_in(K0, i) of phase 0.
    def phase_key(root, p):
        k = jax.random.fold_in(root, 1)
        return jax.random.fold_in(k, p) if p else k

    def examples(root, t):
        return jax.random.fold_in(jax.random.fold_in(root, 2), t)

    with pytest.raises(AssertionError, match="share a key"):
        _assert_distinct(_trainer_keys(phase_key, examples, jax.random.fold_in))


def test_root_key_fills_both_words_of_a_secret_and_keeps_small_seeds():
    assert _as_tuple(keys.root_key(7)) == _as_tuple(jax.random.PRNGKey(7))
    secrets = [keys.run_seed(0, True) for _ in range(16)]
    assert len(set(secrets)) == 16 and all(0 <= s < 1 << 64 for s in secrets)
    words = np.asarray([_as_tuple(keys.root_key(s)) for s in secrets])
    assert len(set(words[:, 0])) > 1 and len(set(words[:, 1])) > 1  # both words vary
    assert max(s.bit_length() for s in secrets) > 60
    assert keys.run_seed(5, False) == 5 and keys.run_seed(5, True, saved=123) == 123
    with pytest.raises(ValueError, match="seed"):
        keys.root_key(1 << 64)


def test_secret_file_is_saved_before_use_and_reused(tmp_path):
    f = keys.SecretFile(tmp_path / "ck" / "secret.json")
    first = f.seed(0, secure=True)
    assert f.path.exists() and (f.path.stat().st_mode & 0o077) == 0
    assert f.seed(0, secure=True) == first  # resume: the same secret
    assert keys.SecretFile(tmp_path / "other.json").seed(3, secure=False) == 3
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="secure_seed"):
        keys.SecretFile(tmp_path / "bad.json").load()
