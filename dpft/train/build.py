"""From a config to the pieces of a run: data arrays, model, clipper, optimizer, privacy plan."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft import data as dpdata
from dpft import models, optim
from dpft.data import augment as augment_lib
from dpft.models.conv import CONV_IMPLS
from dpft.paths import DataError
from dpft.privacy import correlated
from dpft.train.privacy_plan import PrivacyPlan, check_noise, check_unit

# The privacy plan's pieces, also reachable from here (drivers build a run from this module):
from dpft.train.privacy_plan import build_budget as build_budget
from dpft.train.privacy_plan import build_clipper as build_clipper
from dpft.train.privacy_plan import build_norm_strategy as build_norm_strategy
from dpft.train.privacy_plan import build_sampler as build_sampler
from dpft.train.privacy_plan import plan_privacy as plan_privacy
from dpft.train.privacy_plan import user_ids as user_ids


def load_data(config) -> tuple[dict, dict, int]:
    """(train arrays, eval arrays, num_classes); arrays are {'image': f32 NHWC, 'label': i32}.

    The augmentation settings (`build_augment`) are checked first, and against the images.
    With ``config.data.pipeline='grain'`` both splits are `dpft.data.StreamSplit`s instead,
    read by index while training (`dpft.data.stream_splits`, docs/data.md).
    """
    check_noise(config)
    check_unit(config)  # config.dp.unit='user': refuse what it does not run with, before loading
    c = config.data
    augment = build_augment(config)
    pipeline = c.get("pipeline", "memory")
    if pipeline == "grain":
        return dpdata.stream_splits(config)
    if pipeline != "memory":
        raise ValueError(f"config.data.pipeline must be memory|grain, got {pipeline!r}")
    kw = {"data_dir": c.data_dir or None, "tfds_data_dir": c.tfds_data_dir or None}
    train = dpdata.load(c.name, "train", **kw)
    if c.validation_fraction > 0:
        train, evaluation = dpdata.split_validation(train, c.validation_fraction, config.seed)
    else:
        evaluation = dpdata.load(c.name, c.eval_split, **kw)
    if c.train_subset:
        idx = np.random.default_rng([config.seed, 7]).permutation(len(train.labels))
        idx = np.sort(idx[: c.train_subset])
        train = dataclasses.replace(train, images=train.images[idx], labels=train.labels[idx])
    if c.eval_subset:
        evaluation = dataclasses.replace(
            evaluation,
            images=evaluation.images[: c.eval_subset],
            labels=evaluation.labels[: c.eval_subset],
        )
    kind = c.preprocessing or dpdata.default_preprocessing(c.name, config.model.name)

    def arrays(ds, split):
        image = dpdata.preprocess(ds.images, kind)
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if bad:
            raise DataError(
                f"{c.name} {split}: expected finite model inputs, found {bad} NaN/Inf values "
                f"after preprocessing {kind!r} (config.data.preprocessing)"
            )
        return {"image": image, "label": ds.labels.astype(np.int32)}

    train_arrays = arrays(train, "train")
    augment.check_image(train_arrays["image"].shape[1:])
    return train_arrays, arrays(evaluation, "eval"), train.num_classes


def build_augment(config, features: bool = False) -> augment_lib.AugmentSpec | None:
    """``config.data.augmult`` / ``augment`` / ``augment_pad`` / ``augment_pad_mode``: the views
    the per-example loss averages over (`dpft.data.augment`, docs/augmult.md).

    None for a phase trained on cached backbone ``features``: those are fixed vectors, one per
    example, so such a phase trains on the example itself (one view, no augmentation).
    """
    spec = augment_lib.from_config(config.data)
    if features and not spec.identity:
        logging.getLogger("dpft").warning(
            "config.data.augmult=%d / augment=%r: not applied to a phase on cached features",
            spec.augmult,
            spec.augment,
        )
    return None if features else spec


def build_model(config, num_classes: int, example_image: np.ndarray):
    """(model, variables): pretrained weights if ``config.model.pretrained``, else fresh init.

    The head (submodule ``linear``) is re-initialised per ``config.finetune.head_init``
    ('keep' | 'zero' | 'random'); a pretrained head with another number of classes is never kept.
    With ``config.finetune.lora_rank > 0`` the model is a `dpft.models.lora.LoRAModel` and the
    variables hold its zero-initialised adapters too (the same function as without them).
    """
    from dpft.models import lora

    spec = lora.from_config(config.finetune)
    model, variables = _base_model(config, num_classes, example_image)
    if spec is None:
        return model, variables
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
    return lora.attach(model, variables, spec, jnp.asarray(example_image[None]), key)


def _base_model(config, num_classes: int, example_image: np.ndarray):
    from dpft.models.init import reinit

    m = config.model
    if m.pretrained == "vit":
        return _pretrained_vit(config, num_classes, example_image)
    if m.pretrained and (m.pretrained != m.name or m.norm not in ("", "frozen_bn")):
        raise ValueError(
            f"config.model.pretrained={m.pretrained!r} loads that model with frozen BatchNorm: "
            f"expected config.model.name={m.pretrained!r} and config.model.norm='frozen_bn', "
            f"got {m.name!r} and {m.norm!r}"
        )
    norm = "frozen_bn" if m.pretrained else m.norm  # pretrained: frozen BatchNorm statistics
    kwargs = {"norm": norm} if norm else {}
    dtype = m.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype must be float32|bfloat16, got {dtype!r}")
    if dtype != "float32":  # activations in bf16; parameters, clipped sums and noise stay fp32
        kwargs["dtype"] = jnp.bfloat16
    conv = m.get("conv", "auto")
    if conv not in CONV_IMPLS:
        raise ValueError(f"config.model.conv must be {'|'.join(CONV_IMPLS)}, got {conv!r}")
    if "conv" in models.model_kwargs(m.name):  # models without convolutions ignore it
        kwargs["conv"] = conv
    fresh = models.get_model(m.name, num_classes, **kwargs)
    key = jax.random.PRNGKey(config.seed)
    x = jnp.asarray(example_image[None])
    with _shape_errors(m.name, example_image.shape):
        jax.eval_shape(fresh.init, key, x)  # shapes only: cheap, before any real work
    if m.pretrained:
        from dpft.models import pretrained

        model, variables = pretrained.load(m.pretrained, path=m.pretrained_path or None)
        model = model.clone(**{k: kwargs[k] for k in ("dtype", "conv") if k in kwargs})
        with _shape_errors(f"{m.name} (pretrained {m.pretrained})", example_image.shape):
            jax.eval_shape(model.apply, variables, x)  # the weights fit these images
    fresh_vars = jax.jit(fresh.init)(key, x)  # one compilation, not one per op
    fresh_vars = reinit(fresh_vars, m.get("init", "default"), jax.random.fold_in(key, 1))
    if not m.pretrained:
        return fresh, fresh_vars
    head_init = config.finetune.head_init
    old_head = variables["params"]["linear"]["kernel"]
    if head_init == "keep" and old_head.shape[-1] != num_classes:
        raise ValueError(
            f"config.finetune.head_init='keep' but the pretrained head has {old_head.shape[-1]} "
            f"classes and the data {num_classes}: use 'zero' or 'random'"
        )
    if head_init != "keep":
        head = fresh_vars["params"]["linear"]
        if head_init == "zero":
            head = jax.tree_util.tree_map(jnp.zeros_like, head)
        elif head_init != "random":
            raise ValueError(
                f"config.finetune.head_init must be keep|zero|random, got {head_init!r}"
            )
        params = dict(variables["params"])
        params["linear"] = head
        variables = {**variables, "params": params}
        model = fresh if type(fresh) is type(model) else model
    return model, variables


VIT_ARCH = ("patch_size", "width", "depth", "mlp_dim", "num_heads")


def _pretrained_vit(config, num_classes: int, example_image: np.ndarray):
    """``config.model.pretrained='vit'``: the ViT checkpoint ``config.model.pretrained_path``.

    ``config.model.name`` is ``'vit'`` (any architecture the file holds) or a registry ViT
    (``vit_ti16`` ...), which the file's architecture must then match. The position embeddings
    are interpolated to the images' side (``config.data.image_size`` when streamed: the example
    image's shape). The head becomes ``num_classes`` wide per ``config.finetune.head_init``
    (`dpft.models.pretrained.replace_head`); the inputs must be normalised as the checkpoint's
    source expects (`dpft.models.vit_import`: ``config.data.preprocessing='standard'`` for
    big_vision / AugReg, ``'imagenet'`` for timm models trained in PyTorch).
    """
    from dpft.models import pretrained

    m = config.model
    vit_names = [k for k in models.MODEL_NAMES if k.startswith("vit_")]
    if m.name != "vit" and m.name not in vit_names:
        raise ValueError(
            f"config.model.pretrained='vit' loads a ViT checkpoint: expected config.model.name "
            f"'vit' or one of {vit_names}, got {m.name!r}"
        )
    if m.norm:
        raise ValueError(f"config.model.norm must be '' for a ViT (LayerNorm), got {m.norm!r}")
    dtype = m.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype must be float32|bfloat16, got {dtype!r}")
    shape = tuple(example_image.shape)
    model, variables = pretrained.load("vit", m.pretrained_path or None, image_size=shape[:2])
    if m.name != "vit":
        want = models.get_model(m.name, num_classes)
        got = {k: getattr(model, k) for k in VIT_ARCH}
        if got != {k: getattr(want, k) for k in VIT_ARCH}:
            raise ValueError(
                f"config.model.name={m.name!r} but {m.pretrained_path} holds a ViT with "
                f"{got}: set config.model.name='vit' or give a {m.name} checkpoint"
            )
    head_init = config.finetune.head_init
    head = variables["params"]["linear"]["kernel"].shape[-1]
    if head_init == "keep" and head != num_classes:
        raise ValueError(
            f"config.finetune.head_init='keep' but the pretrained head has {head} classes and "
            f"the data {num_classes}: use 'zero' or 'random'"
        )
    if head_init not in pretrained.HEAD_INITS:
        raise ValueError(f"config.finetune.head_init must be keep|zero|random, got {head_init!r}")
    variables = pretrained.replace_head(variables, num_classes, head_init, config.seed)
    model = model.clone(num_classes=num_classes)
    if dtype != "float32":  # activations in bf16; parameters, clipped sums and noise stay fp32
        model = model.clone(dtype=jnp.bfloat16)
    with _shape_errors(f"{m.name} (pretrained vit)", shape):
        jax.eval_shape(model.apply, variables, jnp.asarray(example_image[None]))
    return model, variables


@contextlib.contextmanager
def _shape_errors(name: str, shape: tuple):
    """Turns a model's shape failure on the data's images into a one-line ValueError."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - flax/XLA raise many types for a shape mismatch
        detail = " ".join(str(e).split())[:300]
        raise ValueError(
            f"config.model.name={name} cannot take images of shape {tuple(shape)} (H, W, C) "
            f"from config.data / config.data.preprocessing: {detail}"
        ) from None


def make_mesh(num_devices: int):
    """A 1-D ('data',) mesh over the first ``num_devices`` devices (0 = all); None for one.

    In a multi-process run ``jax.devices()`` holds every process's devices and the mesh must
    span all of them (each process feeds its own devices).
    """
    devices = jax.devices()
    n = num_devices or len(devices)
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"config.parallel.data must be in [0, {len(devices)}] (0 = all devices), "
            f"got {num_devices}"
        )
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(
            f"config.parallel.data must be 0 or {len(devices)} (every device of the "
            f"{jax.process_count()} processes) in a multi-process run, got {num_devices}"
        )
    if n == 1:
        return None
    return jax.sharding.Mesh(np.asarray(devices[:n]), ("data",))


def build_optimizer(
    config, plan: PrivacyPlan, sensitivity: float, noise_key, *, steps=None, learning_rate=None
):
    """The DP optimizer chain; ``steps``/``learning_rate`` override the plan's for one phase."""
    tr = config.train
    schedule = optim.make_schedule(
        learning_rate or tr.learning_rate,
        steps or plan.steps,
        tr.schedule,
        tr.warmup_steps,
        tr.end_lr_fraction,
    )
    kwargs = {}
    if tr.optimizer == "sgd":
        kwargs = {"momentum": tr.momentum or None, "nesterov": tr.nesterov}
    elif tr.optimizer in ("adamw", "lamb"):
        kwargs = {"weight_decay": tr.weight_decay}
    private = {  # what the independent-noise chains take besides the clip norm
        "noise_multiplier": plan.noise_multiplier,
        "expected_batch_size": plan.expected_batch_size,
        "key": noise_key,
        **kwargs,
    }
    if optim.check_adaptive(config):  # adaptive quantile clipping, docs/adaptive_clipping.md
        dp = config.dp
        return optim.dp_adaptive_optimizer(
            tr.optimizer,
            schedule,
            initial_clip_norm=sensitivity,
            target_quantile=dp.adaptive_quantile,
            clip_learning_rate=dp.adaptive_lr,
            count_noise=dp.adaptive_count_noise,
            **private,
        )
    if plan.noise == "banded_mf":  # the correlated privatizer in place of the independent one
        sigma = plan.noise_multiplier
        return optax.chain(
            correlated.banded_mf_privatizer(sigma, sensitivity, plan.coefs, noise_key),
            optim.normalize_by_expected_batch(plan.expected_batch_size),
            optim.base_optimizer(tr.optimizer, schedule, **kwargs),
        )
    return optim.dp_optimizer(tr.optimizer, schedule, l2_sensitivity=sensitivity, **private)
