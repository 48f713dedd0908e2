"""The trainer: end to end on real MNIST, resume == uninterrupted, no retrace, budget stop.

The tiny MNIST runs of this module share one uninterrupted reference run (`reference`) and,
through the ``compilation_cache`` fixture, the programs compiled for it: a run of the same
config on another path (resumed, on 8 devices, in host chunks, with ghost norms) compiles only
what differs. Their noise multiplier is 2: what is checked does not depend on it, and the PLD
epsilon logged every other step is much cheaper to compute than at 1.
"""

import json
import logging
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import crash_at_metrics, latest_checkpoint, needs_data, tiny_mnist_config

from dpft.privacy import accounting, clipping, ledger, sampling
from dpft.train import accumulate, train_and_evaluate
from dpft.train import step as step_lib

pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_config(**dp):
    return tiny_mnist_config("tiny", **dp)  # 6 microbatches of 16 (2 per host chunk of 32)


def reference_config():
    c = tiny_config()
    c.tensorboard = True
    return c


@pytest.fixture
def reference(shared_run):
    """(summary, workdir) of the uninterrupted `reference_config` run, trained once."""
    return shared_run("reference", reference_config())


final_arrays = latest_checkpoint


@needs_data
def test_end_to_end_outputs(reference):
    summary, workdir = reference
    for key in (
        "test_accuracy",
        "epsilon",
        "delta",
        "steps",
        "wall_seconds",
        "examples_per_second",
    ):
        assert key in summary
    assert summary["steps"] == 6 and summary["delta"] == 1e-4
    assert 0 < summary["epsilon"] < summary["epsilon_rdp"] * 1.05
    # throughput outside debug/ comes from the public expected batch size, not realised sizes
    public = summary["steps"] * summary["expected_batch_size"] / summary["train_seconds"]
    assert summary["examples_per_second"] == pytest.approx(public, rel=1e-9)
    saved = json.loads((workdir / "summary.json").read_text())
    assert saved["test_accuracy"] == summary["test_accuracy"]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert all("epsilon" in r and "debug/train_loss" in r for r in lines)
    assert lines[0]["epsilon"] < lines[-1]["epsilon"]
    assert "test_accuracy" in lines[-1]
    assert json.loads((workdir / "config.json").read_text())["name"] == "tiny"
    assert (workdir / "training_curves.png").stat().st_size > 1000
    assert list(workdir.glob("events.out.tfevents*"))


@needs_data
def test_resume_equals_uninterrupted(tmp_path, reference):
    full_summary, full_dir = reference
    c = reference_config()
    with crash_at_metrics(4):
        train_and_evaluate(c, tmp_path / "resumed")
    partial, meta = final_arrays(tmp_path / "resumed")
    assert meta["step"] == 3
    summary = train_and_evaluate(c, tmp_path / "resumed")
    full, full_meta = final_arrays(full_dir)
    resumed, resumed_meta = final_arrays(tmp_path / "resumed")
    assert resumed_meta["step"] == 6 and resumed_meta["ledger"] == full_meta["ledger"]
    assert len(full) == len(resumed)
    for a, b in zip(full, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert summary["epsilon"] == full_summary["epsilon"]
    assert summary["test_accuracy"] == full_summary["test_accuracy"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert steps == [2, 4, 6]


@needs_data
def test_budget_stops_before_exceeding_target(tmp_path):
    c = tiny_config(epsilon=0.2)  # the reference's program; its 6 steps spend epsilon 0.25
    c.train.steps = 200
    summary = train_and_evaluate(c, tmp_path)
    assert summary["stop_reason"] == "budget"
    assert 0 < summary["steps"] < 200
    assert summary["epsilon"] <= 0.2
    # it stopped at the last step within the target: one more would have exceeded it
    _, meta = final_arrays(tmp_path)
    spent = ledger.PrivacyLedger.from_dict(meta["ledger"])
    assert meta["step"] == spent.steps == summary["steps"]
    spent.record(spent.entries[-1], 1)
    assert accounting.compute_epsilon(spent.entries, 1e-4) > 0.2


@needs_data
def test_other_config_in_workdir_is_refused(tmp_path, reference):
    shutil.copytree(reference[1], tmp_path / "run")
    workdir = tmp_path / "run"
    before = sorted(p.name for p in workdir.iterdir())
    other = reference_config()
    other.dp.clip_norm = 2.0
    with pytest.raises(ValueError, match="different config") as info:
        train_and_evaluate(other, workdir)
    assert sorted(p.name for p in workdir.iterdir()) == before
    # the message names what differs and how to resume the run that is there
    msg = str(info.value)
    assert "\n" not in msg and "dp.clip_norm: 1.0 there, 2.0 now" in msg, msg
    assert "to resume it pass --config.dp.clip_norm=1.0" in msg, msg


def test_step_is_traced_once_for_every_poisson_batch():
    def apply_fn(variables, x):
        return x.reshape(x.shape[0], -1) @ variables["params"]["linear"]["kernel"]

    variables = {"params": {"linear": {"kernel": jnp.zeros((12, 3))}}}
    trainable, frozen = step_lib.partition(variables, (".*",))
    from dpft import optim

    clipper = clipping.FlatClip(1.0)
    l2 = clipper.sensitivity(trainable)
    tx = optim.dp_sgd(0.1, noise_multiplier=1.0, l2_sensitivity=l2, expected_batch_size=8, key=0)
    traces = []
    inner = step_lib.make_train_step(
        step_lib.cross_entropy_loss(apply_fn), clipper, tx, microbatch_size=8
    )

    def counted(state, batch, rng):
        traces.append(1)
        return inner(state, batch, rng)

    fn = jax.jit(counted, donate_argnums=0)
    state = step_lib.TrainState(jnp.zeros([], jnp.int32), trainable, tx.init(trainable), frozen)
    data = np.random.default_rng(0).normal(size=(100, 2, 2, 3)).astype(np.float32)
    labels = np.arange(100) % 3
    sampler = sampling.PoissonSampler(100, 0.08, seed=0)
    sizes = set()
    for t in range(25):
        idx, mask = sampler.batch_at(t)
        sizes.add(int(mask.sum()))
        batch = {"image": data[idx], "label": labels[idx], "mask": mask.astype(np.float32)}
        state, _ = fn(state, batch, jax.random.PRNGKey(t))
    empty = {
        "image": data[:1].repeat(len(idx), 0),
        "label": labels[: len(idx)] * 0,
        "mask": np.zeros(len(idx), np.float32),
    }
    state, metrics = fn(state, empty, jax.random.PRNGKey(99))  # an empty Poisson batch
    assert min(sizes) < max(sizes)
    assert len(traces) == 1
    assert int(state.step) == 26 and np.isfinite(float(metrics["debug/train_loss"]))


def run_cli(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "dpft", *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_unknown_config_key_is_one_line_error(tmp_path, cli_env):
    out = run_cli(
        cli_env,
        "--config",
        "configs/mnist_cnn.py:smoke",
        "--workdir",
        str(tmp_path),
        "--config.dp.epsilonn=3",
    )
    assert out.returncode != 0
    err = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1 and "epsilonn" in err[0]
    assert not any(tmp_path.iterdir())


@needs_data
def test_cli_smoke_config(tmp_path, cli_env):
    out = run_cli(
        cli_env,
        "--config",
        "configs/mnist_cnn.py:smoke",
        "--workdir",
        str(tmp_path),
        "--config.tensorboard=False",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test_accuracy=" in out.stdout
    assert (tmp_path / "summary.json").exists()


@needs_data
def test_eight_devices_equal_one(tmp_path, reference):
    assert jax.device_count() >= 8, "conftest sets 8 host devices"
    s1, one_dir = reference
    eight = tiny_config()
    eight.train.microbatch_size = 0
    eight.parallel.data = 8
    s8 = train_and_evaluate(eight, tmp_path / "eight")
    a, meta_a = final_arrays(one_dir)
    b, meta_b = final_arrays(tmp_path / "eight")
    assert meta_a["ledger"] == meta_b["ledger"] and s1["epsilon"] == s8["epsilon"]
    assert len(a) == len(b)
    # Same examples, keys and single noise draw for the logical batch; only the order of float
    # additions differs. Noise drawn per device (or per shard and summed) would move every
    # parameter by about the noise of a step, lr * sigma * C / expected batch = 0.5 * 2 / 32 =
    # 3.1e-2, far above this tolerance.
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert s1["test_accuracy"] == pytest.approx(s8["test_accuracy"], abs=1 / 200 + 1e-9)


@needs_data
def test_host_chunked_steps_equal_one_array_steps(tmp_path, monkeypatch, caplog):
    """A logical batch accumulated over host chunks is the same step (bounded memory path), and
    so is the microbatch loop unrolled (``train.microbatch_unroll``), by hand or automatically
    (0, the default: on CPU all 6 microbatches of a step, or both of a host chunk), as the step
    of the microbatch loop. An unroll that leaves a loop on CPU is warned about."""
    unrolls = []
    scan = jax.lax.scan

    def recording(*args, **kwargs):
        unrolls.append(kwargs.get("unroll", 1))
        return scan(*args, **kwargs)

    monkeypatch.setattr(jax.lax, "scan", recording)
    runs = {}
    cases = (("one", 0, 1, 1), ("chunked", 32, 0, 2), ("unrolled", 0, 2, 2), ("auto", 0, 0, 6))
    for name, chunk, unroll, expected in cases:
        c = tiny_config()  # 6 microbatches of 16 (2 per host chunk)
        c.train.host_chunk_size = chunk
        c.train.microbatch_unroll = unroll
        unrolls.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dpft"):
            s = train_and_evaluate(c, tmp_path / name)
        warned = [r.getMessage() for r in caplog.records if "microbatch_unroll" in r.getMessage()]
        assert warned == ([] if unroll != 2 else [warned[0]])
        if unroll == 2:
            assert "leaves 6 microbatches per step in a loop" in warned[0]
        assert expected in unrolls  # the resolved unroll reached the microbatch loop
        runs[name] = (s["epsilon"], *final_arrays(tmp_path / name))
    eps, a, meta_a = runs["one"]
    for name in ("chunked", "unrolled", "auto"):
        eps_b, b, meta_b = runs[name]
        assert meta_a["ledger"] == meta_b["ledger"] and eps == eps_b
        # Same step up to summation order, amplified over 6 steps; a different step (a chunk
        # lost or counted twice, noise drawn per chunk) moves parameters by the noise scale,
        # lr * sigma * C / expected batch = 0.5 * 2 / 32 = 3.1e-2, far above this tolerance.
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4, err_msg=name)


def test_automatic_microbatch_unroll():
    """``train.microbatch_unroll=0`` unrolls every microbatch of a step call on CPU up to
    `AUTO_UNROLL_MAX` of them, keeps the loop beyond that and on accelerators, and an explicit
    value is kept."""
    resolve, top = accumulate.microbatch_unroll, accumulate.AUTO_UNROLL_MAX
    assert resolve(0, 96, 16, "cpu") == 6
    assert resolve(0, 100, 16, "cpu") == 7  # the last microbatch is partly padding
    assert resolve(0, 32, 16, "cpu") == 2  # a host chunk of 32 rows
    assert resolve(0, 16 * top, 16, "cpu") == top
    assert resolve(0, 16 * top + 1, 16, "cpu") == 1
    assert resolve(0, 96, 16, "gpu") == resolve(0, 96, 16, "tpu") == 1
    assert resolve(0, 96, None, "cpu") == resolve(0, 96, 96, "cpu") == 1  # no loop
    assert resolve(3, 96, 16, "cpu") == resolve(3, 96, 16, "gpu") == 3


def test_unrolled_microbatches_keep_the_memory_of_one():
    """XLA:CPU's default schedule keeps every unrolled microbatch's temporaries alive (about
    4x the loop's memory for 4 microbatches); with `accumulate.compiler_options` the unrolled
    step needs about the memory of the loop, so unrolling keeps microbatching's memory bound."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(512)(x)))

    model = MLP()
    batch = {"x": jnp.ones((128, 256)), "y": jnp.zeros(128, jnp.int32)}
    params = model.init(jax.random.PRNGKey(0), batch["x"][:1])["params"]

    def loss(p, ex, key):
        return -jax.nn.log_softmax(model.apply({"params": p}, ex["x"]))[ex["y"]], ()

    def step_bytes(unroll, backend):
        g = clipping.clipped_grad(loss, clipping.FlatClip(1.0), microbatch_size=32, unroll=unroll)
        fn = lambda p, b: g(p, b, jnp.ones(128), jax.random.PRNGKey(0)).grad_sum  # noqa: E731
        options = accumulate.compiler_options(unroll, backend)
        return accumulate.compiled_bytes(fn, params, batch, options=options)

    assert accumulate.compiler_options(1, "cpu") == accumulate.compiler_options(4, "gpu") == {}
    assert step_bytes(4, "cpu") <= 1.25 * step_bytes(1, "cpu")


@needs_data
def test_ghost_norms_train_the_same_model_as_vmap_norms(tmp_path, ghost_traces):
    """``config.dp.norms='ghost'`` reaches every step path (one array, host chunks) and gives the
    run of the per-example-gradient norms, up to float rounding. (The vmap runs are the configs
    of host_chunked's "one" and "chunked": their programs are compiled already; the one-array
    runs keep the microbatch loop rolled, a sixth of the unrolled step to compile.)"""
    traced = ghost_traces
    runs = {}
    for norms in ("vmap", "ghost"):
        for chunk in (0, 32):
            c = tiny_config(norms=norms)
            c.train.host_chunk_size = chunk
            c.train.microbatch_unroll = 1 if chunk == 0 else 0
            before = len(traced)
            s = train_and_evaluate(c, tmp_path / f"{norms}{chunk}")
            assert (len(traced) > before) == (norms == "ghost")
            runs[norms, chunk] = (s["epsilon"], final_arrays(tmp_path / f"{norms}{chunk}")[0])
    for chunk in (0, 32):
        (eps_v, a), (eps_g, b) = runs["vmap", chunk], runs["ghost", chunk]
        assert eps_v == eps_g
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"config\.dp\.norms must be vmap\|ghost"):
        train_and_evaluate(tiny_config(norms="fast"), tmp_path / "bad")


def test_choose_microbatch_from_compiled_memory():
    from dpft.train import accumulate

    clipper = clipping.FlatClip(1.0)

    def loss(w, example, key):
        return jnp.sum(jnp.tanh(example @ w)), ()

    def build(m):  # per-example gradients [m, 256, 64] are materialised: memory grows with m
        fn = clipping.clipped_grad(loss, clipper, microbatch_size=m)
        w = jax.ShapeDtypeStruct((256, 64), jnp.float32)
        x = jax.ShapeDtypeStruct((1024, 256), jnp.float32)
        mask = jax.ShapeDtypeStruct((1024,), jnp.float32)
        return (lambda *a: fn(*a).grad_sum), (w, x, mask, jax.random.PRNGKey(0))

    def size(m):
        fn, args = build(m)
        return accumulate.compiled_bytes(fn, *args)

    full, small = size(1024), size(8)
    assert small < full
    m, tried = accumulate.choose_microbatch(build, 1024, budget_bytes=(small + full) // 2)
    assert 8 <= m < 1024 and tried[m] <= (small + full) // 2
    assert all(size <= m or b > (small + full) // 2 for size, b in tried.items())
    with pytest.raises(ValueError, match="microbatch of 1"):
        accumulate.choose_microbatch(build, 1024, budget_bytes=1)


@needs_data
def test_bf16_activations_train_with_fp32_params(tmp_path):
    """(The microbatch loop stays rolled, as in host_chunked's "one": the fp32 run's program is
    compiled already, and the bf16 one is a sixth of the unrolled step to compile.)"""
    c = tiny_config()
    c.model.dtype = "bfloat16"
    c.train.steps = 3
    c.train.microbatch_unroll = 1
    summary = train_and_evaluate(c, tmp_path / "bf16")
    arrays, _ = final_arrays(tmp_path / "bf16")
    params = [a for a in arrays if a.ndim >= 1 and a.dtype != np.uint32]
    assert params and all(a.dtype == np.float32 and np.isfinite(a).all() for a in params)
    c32 = tiny_config()
    c32.train.steps = 3
    c32.train.microbatch_unroll = 1
    reference = train_and_evaluate(c32, tmp_path / "fp32")
    ref_arrays, _ = final_arrays(tmp_path / "fp32")
    # same keys and batches: bf16 rounding moves the result only slightly
    assert summary["test_loss"] == pytest.approx(reference["test_loss"], rel=0.1)
    ref = [x for x in ref_arrays if x.ndim >= 1 and x.dtype != np.uint32]
    for a, b in zip(params, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=0.02)
