"""The timed steps of ``bench.run``: its workloads, and each one's dpft, jax_privacy, PyTorch and
Opacus training steps, compiled and ready to call (`Step`), with the DP settings they share.

PyTorch and Opacus (`bench.peers_torch`), jax_privacy and dpft's ghost norms are imported only
when a step needs them, so importing this module imports no peer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft import optim
from dpft.models import count_params, get_model, model_kwargs
from dpft.privacy import clipping

CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LEARNING_RATE = 0.1
CLIPPERS = {
    "flat": clipping.FlatClip(CLIP_NORM),
    "per_layer": clipping.PerLayerClip(CLIP_NORM),
    "auto": clipping.AutoClip(),
    "global": clipping.GlobalClip(CLIP_NORM),
}
CONVS = ("xla", "auto", "im2col")  # values of a model's ``conv`` attribute, when it has one
VIT_IMAGE = 224  # side of the ViT workload's images (pixels; patch 16: 14 x 14 + 1 tokens)
VIT_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a slow workload times: only these dpft clippers and norm strategies (None: all that
    the command line asks for), these Opacus ``grad_sample_mode`` rows, and jax_privacy or not.
    """

    clippers: tuple[str, ...] | None = None
    norms: tuple[str, ...] | None = None
    opacus_modes: tuple[str, ...] = ("hooks", "ghost")
    jax_privacy: bool = True

    def apply(self, clippers: dict, norms: dict) -> tuple[dict, dict]:
        """The ``clippers`` and ``norms`` (name -> object) this workload times."""
        keep_c = {k: v for k, v in clippers.items() if self.clippers is None or k in self.clippers}
        keep_n = {k: v for k, v in norms.items() if self.norms is None or k in self.norms}
        return keep_c, keep_n

    def describe(self) -> str | None:
        """One line for the workload's notes, or None when nothing is restricted."""
        if self == Limits():
            return None
        return (
            f"restricted to dpft clippers {list(self.clippers or ['all'])}, norms "
            f"{list(self.norms or ['all'])}, Opacus modes {list(self.opacus_modes)}"
            + ("" if self.jax_privacy else ", no jax_privacy")
            + " (a slow workload on CPU)"
        )


#: Per-workload restrictions; a workload not listed times everything.
LIMITS: dict[str, Limits] = {
    "vit_ti16": Limits(
        clippers=("flat",), norms=("ghost", "vmap"), opacus_modes=("ghost",), jax_privacy=False
    ),
}


@dataclasses.dataclass
class Step:
    """One timed step: ``run()`` does one full training step and blocks until it is done."""

    run: Callable[[], object]
    framework: str  # 'dpft', 'jax_privacy', 'torch' or 'opacus'
    private: bool
    clipper: str | None = None
    norm: str | None = None
    conv: str | None = None
    flops: float = 0.0  # XLA's count for the compiled JAX step; 0 if unknown


def workloads():
    """name -> (model name, model kwargs, input batch in dpft's layout, classes)."""
    rng = np.random.default_rng(0)

    def images(b, shape):
        return rng.normal(size=(b, *shape)).astype(np.float32)

    return {
        "mnist_cnn": ("sample_convnet", {}, images(256, (28, 28, 1)), 10),
        "resnet20_frozen_bn": ("resnet20", {"norm": "frozen_bn"}, images(64, (32, 32, 3)), 10),
        "resnet20_group_norm": ("resnet20", {"norm": "group_norm"}, images(64, (32, 32, 3)), 10),
        "linear_head": ("linear", {}, images(4096, (64,)), 10),
        # erf GELU, as timm's vit_tiny_patch16_224 and its PyTorch twin (bench.peers_torch)
        "vit_ti16": (
            "vit_ti16",
            {"gelu": "exact"},
            images(VIT_BATCH, (VIT_IMAGE, VIT_IMAGE, 3)),
            10,
        ),
    }


def labels(n: int, classes: int) -> np.ndarray:
    return np.arange(n) % classes


def norm_strategies(notes: list[str]) -> dict[str, object]:
    """name -> dpft norm strategy: ``vmap`` always, ``ghost`` when dpft.privacy.ghost imports."""
    out: dict[str, object] = {"vmap": clipping.VmapNorms()}
    try:
        from dpft.privacy.ghost import GhostNorms
    except ImportError as e:
        notes.append(f"dpft ghost norms: skipped ({e})")
    else:
        out["ghost"] = GhostNorms()
    return out


def conv_options(model_name: str) -> tuple[str | None, ...]:
    """The ``conv`` backends to time if the model has a ``conv`` attribute, else ``(None,)``."""
    return CONVS if "conv" in model_kwargs(model_name) else (None,)


def _compile(fn, args, name: str, notes: list[str]):
    """``(run, flops)`` of ``jax.jit(fn)`` compiled once for ``args``; None if it fails."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # a configuration that does not compile is reported, not fatal
        notes.append(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best effort
        flops = 0.0
    return (lambda: jax.block_until_ready(compiled(*args))), flops


def _init_params(model, x):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype), variables
    )
    if "batch_stats" in variables:  # frozen BN statistics: a sane (positive) variance
        variables["batch_stats"] = jax.tree_util.tree_map(
            lambda v: jnp.abs(v) + 1.0, variables["batch_stats"]
        )
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    return params, rest


def _same_program(a, b, params, rest, x) -> bool:
    """Whether models ``a`` and ``b`` trace to the same forward program (jaxpr) on ``x``.

    The program includes the models' custom differentiation rules (`jax.custom_vjp`), so two
    convolutions that differ only in their gradient count as different.
    """
    variables = {"params": params, **rest}
    return str(jax.make_jaxpr(a.apply)(variables, x)) == str(jax.make_jaxpr(b.apply)(variables, x))


def jax_steps(
    name: str,
    kwargs: dict,
    x: np.ndarray,
    classes: int,
    clippers: dict,
    norms: dict,
    peers: bool,
    notes: list[str],
    info: dict,
) -> dict[str, Step]:
    """dpft's non-private and DP steps (and jax_privacy's, if ``peers``) for one workload."""
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(labels(len(x), classes))}
    mask = jnp.ones(len(x))
    steps: dict[str, Step] = {}
    for conv in conv_options(name):
        suffix = f"_{conv}" if conv else ""
        try:
            model = get_model(name, classes, **kwargs, **({"conv": conv} if conv else {}))
        except ValueError as e:
            notes.append(f"conv={conv}: skipped ({e})")
            continue
        params, rest = _init_params(model, x)
        info["dpft_params"] = count_params(params)
        # DP steps run the model on one example at a time, the non-private step on the batch.
        same_example = same_batch = False
        if conv == "auto":
            xla = model.clone(conv="xla")
            same_example = _same_program(model, xla, params, rest, x[:1])
            same_batch = _same_program(model, xla, params, rest, x)
            if same_example and same_batch:
                notes.append("conv=auto: the same program as conv=xla for this model, not timed")
                continue
            if same_example:
                notes.append(
                    "conv=auto: per example the same program as conv=xla (DP rows not timed "
                    "twice); on the batch its own (the non-private row)"
                )

        def loss_one(p, example, key, model=model, rest=rest):
            logits = model.apply({"params": p, **rest}, example["x"][None])[0]
            return -jax.nn.log_softmax(logits)[example["y"]], ()

        def mean_loss(p, b, model=model, rest=rest):
            logits = model.apply({"params": p, **rest}, b["x"])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], 1))

        sgd = optax.sgd(LEARNING_RATE)

        def plain(p, s, b, mean_loss=mean_loss, sgd=sgd):
            u, s = sgd.update(jax.grad(mean_loss)(p, b), s, p)
            return optax.apply_updates(p, u), s

        built = _compile(plain, (params, sgd.init(params), batch), f"non_private{suffix}", notes)
        if built:
            steps[f"non_private{suffix}"] = Step(built[0], "dpft", False, conv=conv, flops=built[1])
        for cname, clipper in clippers.items():
            if same_example:
                break
            tx = optim.dp_sgd(
                LEARNING_RATE,
                noise_multiplier=NOISE_MULTIPLIER,
                l2_sensitivity=clipper.sensitivity(params),
                expected_batch_size=float(len(x)),
                key=0,
            )
            for nname, strategy in norms.items():
                grad_fn = clipping.clipped_grad(loss_one, clipper, norm_strategy=strategy)

                def dp(p, s, b, grad_fn=grad_fn, tx=tx):
                    g = grad_fn(p, b, mask, jax.random.PRNGKey(0)).grad_sum
                    u, s = tx.update(g, s, p)
                    return optax.apply_updates(p, u), s

                row = f"dp_{cname}_{nname}{suffix}"
                built = _compile(dp, (params, tx.init(params), batch), row, notes)
                if built:
                    steps[row] = Step(built[0], "dpft", True, cname, nname, conv, built[1])
        if peers and conv in (None, CONVS[0]):
            step = jax_privacy_step(model, params, rest, batch, notes)
            if step:
                steps["jax_privacy"] = step
    return steps


def jax_privacy_step(model, params, rest, batch, notes: list[str]) -> Step | None:
    """jax_privacy 2.x: ``clipped_grad`` (flat clip, vmap per example) + privatizer + SGD."""
    try:
        import jax_privacy
        from jax_privacy import noise_addition
    except ImportError as e:
        notes.append(f"jax_privacy: skipped (not importable: {e})")
        return None
    n = batch["x"].shape[0]

    def loss(p, x, y):  # x, y: one example with a leading axis of 1 (keep_batch_dim=True)
        logp = jax.nn.log_softmax(model.apply({"params": p, **rest}, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

    grad_fn = jax_privacy.clipped_grad(loss, l2_clip_norm=CLIP_NORM, batch_argnums=(1, 2))
    tx = optax.chain(
        noise_addition.gaussian_privatizer(
            stddev=NOISE_MULTIPLIER * CLIP_NORM, prng_key=jax.random.key(0)
        ),
        optax.scale(1.0 / n),
        optax.sgd(LEARNING_RATE),
    )

    def dp(p, s, b):
        u, s = tx.update(grad_fn(p, b["x"], b["y"]), s, p)
        return optax.apply_updates(p, u), s

    built = _compile(dp, (params, tx.init(params), batch), "jax_privacy", notes)
    if not built:
        return None
    return Step(built[0], "jax_privacy", True, "flat", "vmap", flops=built[1])


def torch_steps(
    name: str,
    kwargs: dict,
    x: np.ndarray,
    classes: int,
    notes: list[str],
    info: dict,
    opacus_modes: tuple[str, ...] = ("hooks", "ghost"),
) -> dict[str, Step]:
    """PyTorch's non-private step and Opacus' DP steps (``opacus_modes``), if torch imports."""
    try:
        from bench import peers_torch
    except ImportError as e:
        notes.append(f"PyTorch/Opacus: skipped (not importable: {e})")
        return {}
    fns, tinfo = peers_torch.build_steps(
        name, kwargs, x, labels(len(x), classes), classes, opacus_modes
    )
    info["torch_params"] = tinfo["torch_params"]
    notes.extend(tinfo.get("notes", []))
    for row, why in tinfo["skipped"].items():
        notes.append(f"{row}: skipped ({why[:200]})")
    out = {}
    for row, fn in fns.items():
        private = row.startswith("opacus")
        out[row] = Step(
            fn,
            "opacus" if private else "torch",
            private,
            "flat" if private else None,
            row.removeprefix("opacus_") if private else None,
        )
    return out
