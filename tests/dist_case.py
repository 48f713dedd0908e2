"""A small DP step shared by the multi-process worker and the single-process reference."""

import jax
import jax.numpy as jnp
import numpy as np

from dpft import optim
from dpft.privacy import clipping
from dpft.train import distributed
from dpft.train.step import TrainState, make_train_step


def loss(params, frozen, example, rng):
    del frozen, rng
    logits = example["x"] @ params["w"] + params["b"]
    logp = jax.nn.log_softmax(logits)
    return -logp[example["y"]], {"correct": jnp.argmax(logits) == example["y"]}


def run_case(mesh, global_arrays: bool) -> dict:
    rng = np.random.default_rng(0)
    batch = {
        "x": (3 * rng.normal(size=(16, 5))).astype(np.float32),
        "y": rng.integers(0, 3, 16).astype(np.int32),
        "mask": (np.arange(16) < 13).astype(np.float32),
    }
    params = {"w": np.zeros((5, 3), np.float32), "b": np.zeros(3, np.float32)}
    clipper = clipping.FlatClip(1.0)
    tx = optim.dp_sgd(
        0.5,
        noise_multiplier=1.0,
        l2_sensitivity=clipper.sensitivity(params),
        expected_batch_size=12.0,
        key=jax.random.PRNGKey(7),
    )
    state = TrainState(jnp.zeros([], jnp.int32), params, tx.init(params), {})
    step = jax.jit(make_train_step(loss, clipper, tx, mesh=mesh))
    if global_arrays:
        state = distributed.replicated(mesh, state)
        batch = distributed.global_batch(mesh, batch)
    for i in range(3):
        state, _ = step(state, batch, jax.random.PRNGKey(100 + i))
    return distributed.to_host(state.params) if global_arrays else jax.device_get(state.params)


def write_tiny_mnist(data_dir, n_train: int = 256, n_test: int = 64) -> None:
    """Random 28x28 'MNIST' IDX files (with a learnable signal) under ``data_dir/mnist``."""
    from dpft import data

    rng = np.random.default_rng(3)
    folder = data_dir / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 64, (n, 28, 28)).astype(np.uint8)
        images[np.arange(n), 2 * labels + 4, 4:24] = 255  # a bright row per class
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def tiny_train_config(data_dir, num_devices: int = 0):
    """A run of seconds: 4 DP steps of a linear model on `write_tiny_mnist` data."""
    from dpft.config import base_config

    c = base_config()
    c.name = "tiny_mh"
    c.data.name = "mnist"
    c.data.data_dir = str(data_dir)
    c.model.name = "linear"  # cheap to compile: the test is about the processes, not the model
    c.dp.noise_multiplier = 1.0
    c.dp.delta = 1e-3
    c.train.batch_size = 32
    c.train.max_batch_size = 64  # a multiple of the 4 devices
    c.train.steps = 4
    c.train.learning_rate = 0.5
    c.train.log_every = 2
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval_batch_size = 64
    c.parallel.data = num_devices
    return c
