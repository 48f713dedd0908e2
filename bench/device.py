"""``make bench-device``: dpft's steps on one accelerator, as one JSON line (`bench/device.sh`).

For each model (ViT-B/16 and an ImageNet ResNet-50 at 224 px by default) it compiles and times,
in ONE process and interleaved round-robin after warm-up:

- ``non_private``: mean cross-entropy, ``jax.grad``, SGD;
- ``dp_ghost`` / ``dp_vmap``: the sum of flat-clipped per-example gradients
  (`dpft.privacy.clipping.clipped_grad` with `GhostNorms` / `VmapNorms`), then `dpft.optim.dp_sgd`
  (Gaussian noise once for the batch, division by the expected batch size, SGD);

activations in ``--dtype`` (bfloat16 by default) with float32 parameters, clipped sums and noise.
Then the huge-batch step: ``dp_lamb`` on a logical batch of ``--lamb-batch`` examples, summed
in microbatches of ``--microbatch`` inside the one jitted step (`clipped_grad`'s ``lax.scan``
accumulation) and privatised once, as the trainer does at batch 2^18-2^20 with host chunks on
top. With ``--peers`` and torch importable, PyTorch's non-private step and Opacus' ghost
clipping on the same architectures (timm's ``vit_base_patch16_224``, torchvision's
``resnet50``) are timed the same way.

The line holds ``examples_per_second`` per row (batch / median step time), the ratios DP /
non-private and DP / Opacus, the device, the versions and notes for anything skipped.
``--tiny`` runs the same code on a one-block ViT-Ti at 32 px so a CPU test covers it.

    python -m bench.device [--tiny] [--models vit_b16,resnet50] [--image-size 224]
                           [--batch 64] [--lamb-batch 4096] [--microbatch 128] [--peers]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft import optim
from dpft.models import ViT, count_params, get_model
from dpft.privacy import clipping
from dpft.privacy.ghost import GhostNorms

CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LEARNING_RATE = 0.1
NUM_CLASSES = 1000
#: model name -> keyword arguments of the registry entry (frozen BatchNorm for the ResNet, as a
#: fine-tuned ImageNet ResNet is trained under DP)
MODEL_KWARGS = {"resnet18": {"norm": "frozen_bn"}, "resnet50": {"norm": "frozen_bn"}}
#: --tiny: the same rows on inputs a CPU runs in seconds
TINY = {
    "models": "vit_ti16",
    "vit_depth": 1,
    "image_size": 32,
    "batch": 4,
    "lamb_batch": 8,
    "microbatch": 4,
}
#: dpft model -> the same architecture in PyTorch
TORCH_TWINS = {
    "vit_ti16": "timm:vit_tiny_patch16_224",
    "vit_s16": "timm:vit_small_patch16_224",
    "vit_b16": "timm:vit_base_patch16_224",
    "resnet50": "torchvision:resnet50",
}


def timed_rows(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each no-argument function, timed round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _init(model, x):
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def jax_rows(name: str, args, notes: list[str]) -> tuple[dict, dict]:
    """``({row: callable}, {row: batch})`` of dpft's steps for one model."""
    dtype = jnp.dtype(args.dtype)
    model = get_model(name, NUM_CLASSES, dtype=dtype, **MODEL_KWARGS.get(name, {}))
    if args.vit_depth and isinstance(model, ViT):
        model = model.clone(depth=args.vit_depth)
    rng = np.random.default_rng(0)
    shape = (args.image_size, args.image_size, 3)

    def batch_of(n):
        x = jnp.asarray(rng.normal(size=(n, *shape)), jnp.float32)
        return {"x": x, "y": jnp.asarray(np.arange(n) % NUM_CLASSES)}

    small, big = batch_of(args.batch), batch_of(args.lamb_batch)
    params, rest = _init(model, small["x"])
    notes.append(f"{name}: {count_params(params):,} parameters")

    def loss_one(p, example, key):
        logits = model.apply({"params": p, **rest}, example["x"][None])[0]
        return -jax.nn.log_softmax(logits.astype(jnp.float32))[example["y"]], ()

    def mean_loss(p, b):
        logits = model.apply({"params": p, **rest}, b["x"]).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][:, None], 1))

    clipper = clipping.FlatClip(CLIP_NORM)

    def dp_step(tx, norms, microbatch):
        grad_fn = clipping.clipped_grad(
            loss_one, clipper, norm_strategy=norms, microbatch_size=microbatch
        )

        def step(p, s, b):
            g = grad_fn(p, b, jnp.ones(b["y"].shape[0]), jax.random.PRNGKey(1)).grad_sum
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step

    def dp_tx(base, batch):
        return optim.dp_chain(
            base,
            noise_multiplier=NOISE_MULTIPLIER,
            l2_sensitivity=clipper.sensitivity(params),
            expected_batch_size=float(batch),
            key=0,
        )

    sgd = optax.sgd(LEARNING_RATE)

    def plain(p, s, b):
        u, s = sgd.update(jax.grad(mean_loss)(p, b), s, p)
        return optax.apply_updates(p, u), s

    micro = min(args.microbatch, args.batch)
    specs = {
        "non_private": (plain, sgd, small),
        "dp_ghost": (dp_step(dp_tx(sgd, args.batch), GhostNorms(), micro), None, small),
        "dp_vmap": (dp_step(dp_tx(sgd, args.batch), clipping.VmapNorms(), micro), None, small),
    }
    if args.lamb_batch:
        lamb = dp_tx(optax.lamb(1e-3), args.lamb_batch)
        specs["dp_lamb_huge_batch"] = (dp_step(lamb, GhostNorms(), args.microbatch), lamb, big)
    fns, batches = {}, {}
    for row, (fn, tx, b) in specs.items():
        tx = tx or dp_tx(sgd, args.batch)
        try:
            compiled = jax.jit(fn).lower(params, tx.init(params), b).compile()
        except Exception as e:  # a row that does not compile (e.g. out of memory) is reported
            notes.append(f"{name} {row}: skipped ({type(e).__name__}: {str(e)[:160]})")
            continue
        state = (params, tx.init(params), b)
        fns[row] = lambda c=compiled, s=state: jax.block_until_ready(c(*s))
        batches[row] = int(b["y"].shape[0])
    return fns, batches


def torch_rows(name: str, args, notes: list[str]) -> tuple[dict, dict]:
    """PyTorch's non-private step and Opacus ghost clipping on the twin of ``name``."""
    twin = TORCH_TWINS.get(name)
    if twin is None:
        return {}, {}
    try:
        import torch

        from bench import peers_torch
    except ImportError as e:
        notes.append(f"torch: skipped ({e})")
        return {}, {}
    lib, arch = twin.split(":")
    try:
        if lib == "timm":
            import timm

            base = timm.create_model(arch, img_size=args.image_size, num_classes=NUM_CLASSES)
        else:
            import torchvision

            base = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
    except Exception as e:
        notes.append(f"{name} torch twin {twin}: skipped ({type(e).__name__}: {e})")
        return {}, {}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    peers_torch.quiet_warnings()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=dev)
    y = torch.arange(args.batch, device=dev) % NUM_CLASSES
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    fns = {}
    for row, build in (
        ("torch_non_private", lambda m: peers_torch._plain_step(m, x, y)),
        ("opacus_ghost", lambda m: peers_torch._opacus_step(m, x, y, "ghost")),
    ):
        try:
            import copy

            fn = build(copy.deepcopy(base).to(dev))
        except Exception as e:
            notes.append(f"{name} {row}: skipped ({type(e).__name__}: {str(e)[:160]})")
            continue
        fns[row] = lambda fn=fn: (fn(), sync())
    return fns, {row: args.batch for row in fns}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small inputs, for a CPU test")
    p.add_argument("--models", default="vit_b16,resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--vit-depth", type=int, default=0, help="ViT blocks (0 = the model's own)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lamb-batch", type=int, default=4096, help="0 = no huge-batch row")
    p.add_argument("--microbatch", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
        args.repeats = min(args.repeats, 2)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    notes: list[str] = []
    out: dict = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "image_size": args.image_size,
        "batch": args.batch,
        "lamb_batch": args.lamb_batch,
        "microbatch": args.microbatch,
        "dtype": args.dtype,
        "jax": jax.__version__,
        "models": {},
    }
    for name in args.models.split(","):
        fns, batches = jax_rows(name, args, notes)
        if args.peers:
            tf, tb = torch_rows(name, args, notes)
            fns, batches = {**fns, **tf}, {**batches, **tb}
        seconds = timed_rows(fns, args.repeats)
        rate = {row: batches[row] / s for row, s in seconds.items()}
        entry: dict = {"examples_per_second": {k: round(v, 2) for k, v in rate.items()}}
        for dp in ("dp_ghost", "dp_vmap", "dp_lamb_huge_batch"):
            for base in ("non_private", "opacus_ghost"):
                if dp in rate and base in rate:
                    entry[f"{dp}/{base}"] = round(rate[dp] / rate[base], 3)
        out["models"][name] = entry
    out["notes"] = notes
    print(json.dumps(out), flush=True)
    rates = [v for m in out["models"].values() for v in m["examples_per_second"].values()]
    if not rates or not all(math.isfinite(v) and v > 0 for v in rates):
        sys.exit(1)  # the line is printed either way; a run that timed nothing fails
    return out


if __name__ == "__main__":
    main()
