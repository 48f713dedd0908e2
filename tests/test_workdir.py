"""A run's identity (config.json) does not change when a key with its default is added."""

from dpft.config import base_config
from dpft.train.workdir import _LEFT_OUT_AT_DEFAULT, config_json


def test_keys_at_their_default_leave_the_identity_unchanged():
    import ml_collections

    config = base_config()
    older = config.to_dict()  # a config written before those keys existed
    for *parents, last in _LEFT_OUT_AT_DEFAULT:
        node = older
        for part in parents:
            node = node[part]
        node.pop(last)
    assert config_json(ml_collections.ConfigDict(older)) == config_json(config)


def test_a_key_off_its_default_is_part_of_the_identity():
    config = base_config()
    plain = config_json(config)
    for path, default in _LEFT_OUT_AT_DEFAULT.items():
        changed = base_config()
        *parents, last = path
        node = changed
        for part in parents:
            node = node[part]
        node[last] = (
            (not default)
            if isinstance(default, bool)
            else type(default)("banded_mf" if isinstance(default, str) else default + 2)
        )
        assert config_json(changed) != plain, path
