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
    tx = optim.dp_sgd(
        0.5,
        noise_multiplier=1.0,
        l2_sensitivity=1.0,
        expected_batch_size=12.0,
        key=jax.random.PRNGKey(7),
    )
    state = TrainState(jnp.zeros([], jnp.int32), params, tx.init(params), {})
    step = jax.jit(make_train_step(loss, clipping.FlatClip(1.0), tx, mesh=mesh))
    if global_arrays:
        state = distributed.replicated(mesh, state)
        batch = distributed.global_batch(mesh, batch)
    for i in range(3):
        state, _ = step(state, batch, jax.random.PRNGKey(100 + i))
    return distributed.to_host(state.params) if global_arrays else jax.device_get(state.params)
