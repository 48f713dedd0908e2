"""Bad inputs give a one-line error naming the key or file and leave the workdir as it was.

Every case of docs/bad_inputs.md is here. A few go through the CLI (stderr: one line, exit 2);
the rest call `train_and_evaluate` and check the exception's one-line message. Config and data
are validated before the workdir is claimed, so a fresh workdir is never created, and an
existing one keeps its file listing and contents byte for byte.
"""

import gzip
import hashlib
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dpft import data
from dpft.config import base_config
from dpft.paths import DataError
from dpft.train import train_and_evaluate
from dpft.train.trainer import ConfigMismatchError

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 64, 32


def write_mnist(root: pathlib.Path, **overrides) -> pathlib.Path:
    """A small MNIST-layout data dir; ``overrides`` maps a file name to an array or bytes."""
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        files[f"{prefix}-images-idx3-ubyte.gz"] = rng.integers(0, 256, (n, 28, 28), np.uint8)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = (np.arange(n) % 10).astype(np.uint8)
    files.update(overrides)
    for name, value in files.items():
        if value is None:
            continue
        if isinstance(value, bytes):
            (folder / name).write_bytes(value)
        else:
            data.write_idx(folder / name, value)
    return root


def config(data_dir: pathlib.Path, **kw):
    c = base_config()
    c.name = "bad"
    c.tensorboard = False
    c.data.name = "mnist"
    c.data.data_dir = str(data_dir)
    c.model.name = "sample_convnet"
    c.dp.noise_multiplier = 1.0
    c.dp.delta = 1e-3  # < 1 / 64
    c.train.batch_size = 16
    c.train.steps = 1
    c.train.log_every = 1
    c.train.checkpoint_every = 1
    c.eval_batch_size = 32
    for key, value in kw.items():
        section, name = key.split("__")
        setattr(getattr(c, section), name, value)
    return c


def snapshot(root: pathlib.Path) -> dict | None:
    """{relative path: sha256 (files) or 'dir'}; None if ``root`` does not exist."""
    if not root.exists():
        return None
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(root.rglob("*"))
    }


_preprocess = data.preprocess


def nan_images(images, kind):  # stands in for a preprocessing that produced NaN/Inf
    x = _preprocess(images, kind)
    x[0, 0, 0, 0] = np.nan
    x[-1, 1, 1, 0] = np.inf
    return x


def _corrupt_gzip() -> bytes:
    good = gzip.compress(np.zeros(100, np.uint8).tobytes())
    return good[: len(good) // 2]  # a truncated download


def _truncated_idx() -> bytes:
    header = bytes([0, 0, 8, 3]) + np.asarray([N_TRAIN, 28, 28], ">u4").tobytes()
    return gzip.compress(header + bytes(100))


# id -> (data-dir overrides, config overrides, exception type, substrings of the message)
CASES = {
    "epsilon_zero": ({}, {"dp__epsilon": 0.0}, ValueError, ["config.dp.epsilon", "> 0"]),
    "epsilon_negative": ({}, {"dp__epsilon": -1.0}, ValueError, ["config.dp.epsilon", "> 0"]),
    "delta_zero": ({}, {"dp__delta": 0.0}, ValueError, ["config.dp.delta", "(0, 1/N"]),
    "delta_at_least_1_over_n": (
        {},
        {"dp__delta": 1.0 / N_TRAIN},
        ValueError,
        ["config.dp.delta", "(0, 1/N = 0.0156)"],
    ),
    "clip_norm_zero": ({}, {"dp__clip_norm": 0.0}, ValueError, ["config.dp.clip_norm", "> 0"]),
    "clip_norm_negative": (
        {},
        {"dp__clip_norm": -1.0},
        ValueError,
        ["config.dp.clip_norm", "> 0"],
    ),
    "unknown_norm_strategy": (
        {},
        {"dp__norms": "fast"},
        ValueError,
        ["config.dp.norms", "vmap|ghost", "'fast'"],
    ),
    "unknown_conv": (
        {},
        {"model__conv": "fast"},
        ValueError,
        ["config.model.conv", "auto|xla|im2col", "'fast'"],
    ),
    "microbatch_unroll_negative": (
        {},
        {"train__microbatch_unroll": -1},
        ValueError,
        ["config.train.microbatch_unroll", "int >= 0 (0: automatic)", "-1"],
    ),
    "microbatch_larger_than_batch": (
        {},
        {"train__microbatch_size": 1000},
        ValueError,
        ["config.train.microbatch_size=1000", "larger than the padded batch"],
    ),
    "missing_data_dir": (
        "nowhere",
        {},
        DataError,
        ["nowhere", "does not exist", "config.data.data_dir"],
    ),
    "missing_data_file": (
        {"train-labels-idx1-ubyte.gz": None},
        {},
        DataError,
        ["missing data file", "train-labels-idx1-ubyte.gz", "DPFT_DATA_DIR"],
    ),
    "corrupt_idx_gzip": (
        {"train-images-idx3-ubyte.gz": _corrupt_gzip()},
        {},
        DataError,
        ["corrupt data file", "train-images-idx3-ubyte.gz", "complete gzip stream"],
    ),
    "corrupt_idx_magic": (
        {"train-images-idx3-ubyte.gz": gzip.compress(b"<html>not found</html>")},
        {},
        DataError,
        ["corrupt data file", "train-images-idx3-ubyte.gz", "expected an IDX magic"],
    ),
    "truncated_idx_payload": (
        {"train-images-idx3-ubyte.gz": _truncated_idx()},
        {},
        DataError,
        ["corrupt data file", "train-images-idx3-ubyte.gz", "payload bytes"],
    ),
    "wrong_image_shape_in_file": (
        {"train-images-idx3-ubyte.gz": np.zeros((N_TRAIN, 20, 20), np.uint8)},
        {},
        DataError,
        ["train-images-idx3-ubyte.gz", "expected 28x28 images", "20x20"],
    ),
    "labels_out_of_range": (
        {"train-labels-idx1-ubyte.gz": np.full(N_TRAIN, 10, np.uint8)},
        {},
        DataError,
        ["train-labels-idx1-ubyte.gz", "expected labels in [0, 10)", "found 10"],
    ),
    "float_nan_images_in_file": (
        {"train-images-idx3-ubyte.gz": np.full((N_TRAIN, 28, 28), np.nan, np.float32)},
        {},
        DataError,
        ["train-images-idx3-ubyte.gz", "expected IDX elements of type uint8", "float32"],
    ),
    "empty_dataset": (
        {
            "train-images-idx3-ubyte.gz": np.zeros((0, 28, 28), np.uint8),
            "train-labels-idx1-ubyte.gz": np.zeros(0, np.uint8),
        },
        {},
        DataError,
        ["train-labels-idx1-ubyte.gz", "expected at least one example"],
    ),
    "image_shape_wrong_for_model": (
        {},
        {
            "model__name": "resnet20",
            "model__norm": "frozen_bn",
            "model__pretrained": "resnet20",
            "finetune__head_init": "zero",
            "data__preprocessing": "mnist",  # 28x28x1; the pretrained weights need 3 channels
        },
        ValueError,
        ["config.model.name=resnet20", "(28, 28, 1)", "config.data.preprocessing"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_workdir", "used_workdir"])
def test_bad_input_is_one_line_and_leaves_workdir(tmp_path, case, fresh):
    files, overrides, exc, expected = CASES[case]
    data_dir = tmp_path / "nowhere" if files == "nowhere" else write_mnist(tmp_path / "d", **files)
    workdir = tmp_path / "work"
    if not fresh:  # a workdir already holding files: they must stay as they were
        (workdir / "checkpoints").mkdir(parents=True)
        (workdir / "notes.txt").write_text("keep me\n")
    before = snapshot(workdir)
    with pytest.raises(exc) as info:
        train_and_evaluate(config(data_dir, **overrides), workdir)
    msg = str(info.value)
    assert "\n" not in msg.strip(), msg
    for part in expected:
        assert part in msg, msg
    assert snapshot(workdir) == before


def test_nan_or_inf_model_inputs_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "preprocess", nan_images)
    workdir = tmp_path / "work"
    with pytest.raises(DataError) as info:
        train_and_evaluate(config(write_mnist(tmp_path / "d")), workdir)
    msg = str(info.value)
    assert "\n" not in msg and "mnist train" in msg and "2 NaN/Inf values" in msg, msg
    assert not workdir.exists()


def test_corrupt_safetensors(tmp_path):
    weights = tmp_path / "resnet20.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(64))
    c = config(
        write_mnist(tmp_path / "d"),
        model__name="resnet20",
        model__norm="frozen_bn",
        model__pretrained="resnet20",
        model__pretrained_path=str(weights),
        finetune__head_init="zero",
    )
    workdir = tmp_path / "work"
    with pytest.raises(DataError) as info:
        train_and_evaluate(c, workdir)
    msg = str(info.value)
    assert "\n" not in msg and str(weights) in msg and "expected a safetensors file" in msg, msg
    assert not workdir.exists()


def test_workdir_of_another_config_is_left_as_it_was(tmp_path):
    """A workdir claimed by another config, holding its checkpoint, is refused untouched.

    (tests/test_crash.py also refuses the CLI a really trained workdir of another config.)
    """
    from dpft.train import trainer
    from dpft.train.checkpoint import Checkpointer

    data_dir = write_mnist(tmp_path / "d")
    workdir = tmp_path / "work"
    old = config(data_dir, dp__clip_norm=2.0)
    old_json = trainer._config_json(old)
    workdir.mkdir()
    (workdir / "config.json").write_text(old_json)
    ck = Checkpointer(workdir)
    meta = {"step": 1, "fingerprint": trainer.config_fingerprint(old_json)}
    ck.save(1, {"w": np.ones((3, 3), np.float32)}, meta)
    ck.close()
    (workdir / "metrics.jsonl").write_text('{"step": 1, "epsilon": 0.5}\n')
    before = snapshot(workdir)
    assert "checkpoints/1" in before
    with pytest.raises(ConfigMismatchError) as info:  # config.json of another config
        train_and_evaluate(config(data_dir), workdir)
    msg = str(info.value)
    assert "\n" not in msg and "config.json" in msg and "--workdir" in msg, msg
    assert snapshot(workdir) == before
    # config.json edited to the new config: the checkpoint is still of the old one
    (workdir / "config.json").write_text(trainer._config_json(config(data_dir)))
    before = snapshot(workdir)
    with pytest.raises(ValueError) as info:
        train_and_evaluate(config(data_dir), workdir)
    msg = str(info.value)
    assert "\n" not in msg and "checkpoints/1 is of another config" in msg, msg
    assert snapshot(workdir) == before


# ----------------------------------------------------------------------------------- the CLI

CLI_CASES = {
    "unknown_config_key": ([], ["--config.dp.epsilonn=3"], ["unknown config key", "epsilonn"]),
    "epsilon_zero": ([], ["--config.dp.epsilon=0"], ["config.dp.epsilon must be > 0"]),
    "corrupt_idx": (
        {"t10k-labels-idx1-ubyte.gz": b"\x1f\x8bgarbage"},
        [],
        ["corrupt data file", "t10k-labels-idx1-ubyte.gz"],
    ),
    "missing_config_file": ([], ["--config=no/such/config.py"], ["no/such/config.py"]),
}


def test_cli_bad_inputs_one_line_exit_2(tmp_path):
    """All CLI cases at once (concurrent processes: the interpreter start dominates)."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "from dpft.config import base_config\n\n\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.tensorboard = False\n"
        "    c.data.name = 'mnist'\n"
        "    c.dp.delta = 1e-3\n"
        "    c.train.batch_size = 16\n"
        "    c.train.steps = 1\n"
        "    return c\n"
    )
    procs = {}
    for case, (files, args, _) in CLI_CASES.items():
        data_dir = write_mnist(tmp_path / case / "d", **(files or {}))
        workdir = tmp_path / case / "work"
        cmd = [sys.executable, "-m", "dpft", "--config", str(cfg), "--workdir", str(workdir)]
        cmd += [f"--config.data.data_dir={data_dir}", *args]
        procs[case] = (
            subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
            workdir,
        )
    for case, (proc, workdir) in procs.items():
        _, err = proc.communicate(timeout=600)
        lines = [ln for ln in err.decode().splitlines() if ln.strip()]
        assert proc.returncode == 2, (case, err.decode()[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, lines)
        for part in CLI_CASES[case][2]:
            assert part in lines[0], (case, lines[0])
        assert not workdir.exists(), case
