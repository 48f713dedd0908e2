"""Pieces the studies share: the CIFAR-10 ResNet-20 cut into a frozen prefix and a trainable last
block, the cached arrays of Fashion-MNIST through it, and what a cache of ImageNet MobileNetV2
features depends on.

The prefix (stem and every block before ``RESNET20_FT_BLOCKS``) has no trainable parameter, so
its output is a fixed function of each image: training the last block and the head on cached
prefix activations is training the whole network with that prefix frozen.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESNET20_CACHE = ROOT / "runs" / "resnet20_prefix_cache"
RESNET20_FT_BLOCKS = ("layer3_2",)  # the trainable blocks (+ the linear head)
SPLIT_SEED = 0
VAL_FRACTION = 0.1


def _blocks(m):
    return [*m.layer1, *m.layer2, *m.layer3]


def _names(m):
    return [f"layer{s}_{i}" for s in (1, 2, 3) for i in range(len(m.layer1))]


def resnet20_prefix(m, x):
    """The frozen prefix: the stem and every block before ``RESNET20_FT_BLOCKS[0]``."""
    x = jax.nn.relu(m.bn1(m.conv1(jnp.asarray(x, jnp.float32))))
    for name, block in zip(_names(m), _blocks(m), strict=True):
        if name == RESNET20_FT_BLOCKS[0]:
            break
        x = block(x)
    return x


def resnet20_pooled_suffix(m, a):
    """The trainable blocks on prefix activations, then global average pooling -> [N, 64]."""
    for name, block in zip(_names(m), _blocks(m), strict=True):
        if name in RESNET20_FT_BLOCKS:
            a = block(a)
    return jnp.mean(a, axis=(1, 2))


def resnet20_logits_suffix(m, a):
    """Logits from prefix activations: the trainable blocks, pooling and the linear head."""
    return m.linear(resnet20_pooled_suffix(m, a))


def resnet20_arrays(train_subset: int) -> tuple[dict, object, dict]:
    """``({'train','val','test'}: {'act': prefix activations, 'feat': pooled features, 'y'},
    model, variables)`` of Fashion-MNIST through the pretrained ResNet-20, cached in runs/.

    The validation split is carved from a ``train_subset``-example subset of the training split
    (fraction ``VAL_FRACTION``, seed ``SPLIT_SEED``); the test split is the whole test set.
    """
    from dpft.config import base_config
    from dpft.models import pretrained
    from dpft.train.build import load_data
    from dpft.train.features import cached_features, file_identity

    model, variables = pretrained.load("resnet20")

    def cfg(val_fraction, subset):
        c = base_config()
        c.seed = SPLIT_SEED
        c.data.name = "fashion_mnist"
        c.model.name = "resnet20"
        c.data.validation_fraction = val_fraction
        c.data.train_subset = subset
        return c

    train, val, _ = load_data(cfg(VAL_FRACTION, train_subset))
    _, test, _ = load_data(cfg(0.0, 0))
    images = {"train": train["image"], "val": val["image"], "test": test["image"]}
    desc = {
        "backbone": "resnet20",
        "weights": file_identity(pretrained.weights_path("resnet20", None)),
        "dataset": "fashion_mnist",
        "validation_fraction": VAL_FRACTION,
        "split_seed": SPLIT_SEED,
        "train_subset": train_subset,
        "prefix_until": RESNET20_FT_BLOCKS[0],
        "jax": jax.__version__,
    }
    acts = cached_features(
        RESNET20_CACHE,
        desc,
        lambda x: model.apply(variables, x, method=resnet20_prefix),
        images,
        250,
    )
    suffix_fn = jax.jit(lambda a: model.apply(variables, a, method=resnet20_pooled_suffix))
    out = {}
    for k, lab in (("train", train), ("val", val), ("test", test)):
        feat = np.concatenate([np.asarray(suffix_fn(a)) for a in np.array_split(acts[k], 20)])
        out[k] = {"act": acts[k], "feat": feat, "y": lab["label"].astype(np.int32)}
    return out, model, variables


def mobilenet_description(size: int, dataset: str, **extra) -> dict:
    """What cached ImageNet MobileNetV2 features of ``dataset`` at ``size`` px depend on (the
    `dpft.train.features.cached_features` key): the weights file, the preprocessing of
    `dpft.models.pretrained` (unit range, bilinear resize, grey to RGB, ImageNet mean/std), the
    jax version and ``extra`` (e.g. where the network is cut)."""
    from dpft.models import pretrained
    from dpft.train.features import file_identity

    return {
        "backbone": "mobilenet_v2",
        "weights": file_identity(pretrained.weights_path("mobilenet_v2")),
        "size": size,
        "dataset": dataset,
        "preprocessing": "unit, bilinear resize, grey to RGB, ImageNet mean/std",
        "jax": jax.__version__,
        **extra,
    }
