"""configs/imagenet_vit.py: its full variants' settings, and every smoke variant end to end on
``tfds.testing.mock_data`` ImageNet with a tiny generated ViT checkpoint (in-process, on CPU)."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest
from vit_checkpoints import canonical, write_big_vision

from dpft.__main__ import train_and_evaluate
from dpft.paths import DataError
from dpft.train import build

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _config(arg):
    spec = importlib.util.spec_from_file_location("imagenet_vit", ROOT / "configs/imagenet_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_full_variants():
    lamb = _config("")
    assert lamb.name == "imagenet_vit_lamb" and lamb.train.optimizer == "lamb"
    assert (
        lamb.train.batch_size == 2**18 and lamb.train.batch_size % lamb.train.host_chunk_size == 0
    )
    assert lamb.train.host_chunk_size % lamb.train.microbatch_size == 0
    assert (lamb.data.name, lamb.data.pipeline, lamb.data.image_size) == (
        "imagenet2012",
        "grain",
        224,
    )
    assert lamb.dp.epsilon == 8 and 0 < lamb.dp.delta < 1 / 1_281_167
    assert _config("last_layer").linear.method == "single_step"
    assert _config("dp_fc,smoke").linear.method == "dp_fc"
    with pytest.raises(ValueError, match="expected one of lamb|last_layer|dp_fc"):
        _config("lamb,dp_fc")
    with pytest.raises(DataError, match="config.model.pretrained_path"):  # no default file
        build.build_model(lamb, 1000, np.zeros((224, 224, 3), np.float32))


@pytest.fixture(scope="module")
def mock_imagenet(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    root = tmp_path_factory.mktemp("imagenet_vit")
    path = write_big_vision(canonical(0), str(root / "vit.npz"))
    policy = tfds.testing.MockPolicy.USE_CODE
    with tfds.testing.mock_data(num_examples=24, policy=policy, data_dir=str(root / "tfds")):
        yield root, path


@pytest.mark.parametrize("variant", ["lamb", "last_layer", "dp_fc"])
def test_smoke_runs_on_mock_data(mock_imagenet, variant):
    root, path = mock_imagenet
    c = _config(f"{variant},smoke")
    c.model.pretrained_path = path
    c.data.tfds_data_dir = str(root / "tfds")
    workdir = root / variant
    summary = train_and_evaluate(c, workdir)
    assert 0 < summary["epsilon"] <= 8 and math.isfinite(summary["test_loss"])
    assert json.loads((workdir / "summary.json").read_text())["epsilon"] == summary["epsilon"]
    if variant == "lamb":
        assert summary["steps"] == 2
    else:  # the features were streamed into the sharded cache, the method read them
        assert summary["feature_dim"] == 32 and summary["num_train_examples"] == 24
        assert list((workdir / "features").glob("features-*/manifest-p00000.json"))
