"""flax.linen models by name.

`get_model` builds an (uninitialised) model from its registry name:

=====================  ==============================================================
name                   model
=====================  ==============================================================
``sample_convnet``     `SampleConvNet` (Opacus MNIST CNN, ReLU, 26,010 parameters)
``tramer_boneh_cnn``   `TramerBonehCNN` (the same layers with tanh, Tramer & Boneh 2021)
``resnet20`` .. ``56`` `CifarResNet` (option-A CIFAR ResNet; kwargs ``norm``, ``groups``)
``wrn16_4``            `WideResNet` WRN-16-4, GroupNorm + weight standardization
``resnet18/34/50``     `ImageNetResNet` (torchvision layout; GroupNorm; kwargs ``norm``, ``stem``)
``mobilenet_v2``       `MobileNetV2` (torchvision layout; frozen BatchNorm; kwarg ``norm``)
``linear``             `LinearHead`: one Dense on flattened inputs (training on features)
``vit_ti16/s16/b16``   `ViT` ViT-Ti/S/B/16 (kwargs ``pool_type`` tok|gap, ``gelu``, ...)
``vit_l16``            `ViT` ViT-L/16
``scatternet``         `ScatterNetLinear`: fixed scattering transform + GroupNorm + Dense
``scatternet_mob...``  ``scatternet_mobilenet``: `ScatterNetMobileNet`, those features beside
                       an ImageNet MobileNetV2's (frozen weights from the data directory)
=====================  ==============================================================

Every model's output layer is a submodule named ``linear`` (parameters ``linear/kernel``,
``linear/bias``), so a trainer can select or re-initialise the head by name. Pretrained CIFAR-10
ResNets and the ImageNet MobileNetV2 are in `dpft.models.pretrained` (imported on first use: it
needs safetensors), which also reads ViT checkpoints (`dpft.models.vit_import`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpft.models.cnn import SampleConvNet, TramerBonehCNN
from dpft.models.imagenet_resnet import ImageNetResNet
from dpft.models.mobilenet import MobileNetV2
from dpft.models.resnet import (
    CifarResNet,
    WideResNet,
    resnet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    wrn16_4,
)
from dpft.models.scatternet import ScatterNetLinear, ScatterNetMobileNet
from dpft.models.vit import ViT, vit


class LinearHead(nn.Module):
    """A linear classifier on flattened inputs: one Dense named ``linear``.

    For training on precomputed features (e.g. the 64-d features of a pretrained ResNet):
    ``[N, ...]`` -> ``[N, num_classes]``. ``features`` is the flattened input.
    """

    num_classes: int = 10
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.linear = nn.Dense(self.num_classes, dtype=self.dtype)

    def features(self, x: jax.Array) -> jax.Array:
        """The flattened input ``[N, D]``."""
        return jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[N, num_classes]``."""
        return self.linear(self.features(x))


def _resnet(depth: int) -> Callable[..., nn.Module]:
    return lambda num_classes, **kw: CifarResNet(depth=depth, num_classes=num_classes, **kw)


def _imagenet_resnet(depth: int) -> Callable[..., nn.Module]:
    return lambda num_classes, **kw: ImageNetResNet(depth=depth, num_classes=num_classes, **kw)


def _vit(size: str) -> Callable[..., nn.Module]:
    return lambda num_classes, **kw: vit(size, num_classes, **kw)


# name -> (class, constructor(num_classes, **kwargs), attributes fixed by the name)
_REGISTRY: dict[str, tuple[type[nn.Module], Callable[..., nn.Module], tuple[str, ...]]] = {
    "sample_convnet": (SampleConvNet, lambda k, **kw: SampleConvNet(num_classes=k, **kw), ()),
    "tramer_boneh_cnn": (TramerBonehCNN, lambda k, **kw: TramerBonehCNN(num_classes=k, **kw), ()),
    "resnet20": (CifarResNet, _resnet(20), ("depth",)),
    "resnet32": (CifarResNet, _resnet(32), ("depth",)),
    "resnet44": (CifarResNet, _resnet(44), ("depth",)),
    "resnet56": (CifarResNet, _resnet(56), ("depth",)),
    "wrn16_4": (
        WideResNet,
        lambda k, **kw: WideResNet(depth=16, width=4, num_classes=k, **kw),
        ("depth", "width"),
    ),
    "resnet18": (ImageNetResNet, _imagenet_resnet(18), ("depth",)),
    "resnet34": (ImageNetResNet, _imagenet_resnet(34), ("depth",)),
    "resnet50": (ImageNetResNet, _imagenet_resnet(50), ("depth",)),
    "mobilenet_v2": (MobileNetV2, lambda k, **kw: MobileNetV2(num_classes=k, **kw), ()),
    "linear": (LinearHead, lambda k, **kw: LinearHead(num_classes=k, **kw), ()),
    "scatternet": (ScatterNetLinear, lambda k, **kw: ScatterNetLinear(num_classes=k, **kw), ()),
    "scatternet_mobilenet": (
        ScatterNetMobileNet,
        lambda k, **kw: ScatterNetMobileNet(num_classes=k, **kw),
        (),
    ),
    **{
        f"vit_{size}16": (ViT, _vit(size), ("patch_size", "width", "depth", "mlp_dim", "num_heads"))
        for size in ("ti", "s", "b", "l")
    },
}

#: Models whose only parameters are the head ``linear``: their features are a fixed public
#: function (any weights it uses are constants the model loads itself), so
#: ``finetune.mode='head'`` trains them on cached features without ``model.pretrained``.
FIXED_FEATURES: tuple[str, ...] = ("scatternet", "scatternet_mobilenet")

#: Registry names accepted by `get_model`.
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def model_kwargs(name: str) -> tuple[str, ...]:
    """The keyword arguments `get_model` accepts for ``name`` (besides ``num_classes``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}: valid names are {', '.join(MODEL_NAMES)}")
    cls, _, fixed = _REGISTRY[name]
    skip = {"parent", "name", "num_classes", *fixed}
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip)


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """An uninitialised flax model by registry name (see the module docstring).

    Args:
      name: one of `MODEL_NAMES`.
      num_classes: width of the head ``linear``.
      **kwargs: model attributes, e.g. ``norm='group_norm'`` for the ResNets or
        ``activation='tanh'`` for the CNNs; `model_kwargs` lists them.

    Raises:
      ValueError: unknown name (the message lists the valid names) or keyword argument.
    """
    allowed = model_kwargs(name)
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ValueError(
            f"model {name!r} does not take {bad}: valid keyword arguments are {list(allowed)}"
        )
    return _REGISTRY[name][1](num_classes, **kwargs)


def count_params(variables: Any) -> int:
    """Number of scalars in ``variables['params']`` (or in a params tree itself)."""
    if isinstance(variables, dict) and "params" in variables:
        variables = variables["params"]
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables))


def __getattr__(name: str) -> Any:
    # ``dpft.models.pretrained`` without importing safetensors at package import.
    if name == "pretrained":
        return importlib.import_module("dpft.models.pretrained")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FIXED_FEATURES",
    "MODEL_NAMES",
    "CifarResNet",
    "ImageNetResNet",
    "LinearHead",
    "MobileNetV2",
    "SampleConvNet",
    "ScatterNetLinear",
    "ScatterNetMobileNet",
    "TramerBonehCNN",
    "ViT",
    "WideResNet",
    "count_params",
    "get_model",
    "model_kwargs",
    "resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "wrn16_4",
]
