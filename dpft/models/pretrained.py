"""Pretrained ResNets and MobileNetV2 from PyTorch state dicts (safetensors), as flax variables.

Three families (`load`):

* CIFAR-10-pretrained ResNet-20/32/44/56 (`NAMES`) from the data directory: the weights
  (Idelbayev's pytorch_resnet_cifar10, BSD 2-Clause) are safetensors files with PyTorch names
  and layouts under ``pretrained/resnet-cifar10/{name}.safetensors`` (``$DPFT_DATA_DIR``, see
  `dpft.paths`), loaded into `CifarResNet`.
* ResNet-18/34/50 in torchvision's layout (`TORCHVISION_NAMES`), e.g. ImageNet or Places365
  weights, from a file you give (``path``; ``config.model.pretrained_path``), loaded into
  `dpft.models.imagenet_resnet.ImageNetResNet`; the head's width is read from ``fc.weight``.
  dpft ships no such weights; torchvision's are written as safetensors by
  ``safetensors.torch.save_file(torchvision.models.resnet18(weights="DEFAULT").state_dict(),
  "resnet18.safetensors")``.
* ImageNet MobileNetV2 (``'mobilenet_v2'``, `MOBILENET_NAMES`) in torchvision's layout, from
  ``pretrained/imagenet/mobilenet_v2.safetensors`` in the data directory (or ``path``), loaded
  into `dpft.models.mobilenet.MobileNetV2`. Its BatchNorm is folded into the convolutions
  (gamma 1, mean 0, var 1 - eps, beta = the folded bias), so it only works frozen.

ViTs (``'vit'``, `VIT_NAMES`) from big_vision / AugReg ``.npz`` or timm / Hugging Face
safetensors files are read by `dpft.models.vit_import` (``load('vit', path, image_size=S)``).

The ResNets and MobileNetV2 are converted for ``norm='frozen_bn'``::

    conv weight [out, in, kh, kw]   -> params  .../kernel [kh, kw, in, out]
    linear.weight [out, in]         -> params  linear/kernel [in, out]; linear.bias -> linear/bias
    bn weight, bias                 -> params  .../scale, .../bias
    bn running_mean, running_var    -> batch_stats .../mean, .../var
    bn num_batches_tracked          -> ignored
    layer{s}.{i}.<name>             -> layer{s}_{i}/<name>
    torchvision only: fc.*          -> linear/*;
                      layer{s}.{i}.downsample.0 / .1 -> layer{s}_{i}/downsample_conv / _bn
    mobilenet_v2:     classifier.1.* -> linear/*; other names with '.' written '_'
                      (features.3.conv.1.0 -> features_3/conv_1_0)
    grouped (depthwise) conv weight [out, in/groups, kh, kw] -> kernel [kh, kw, in/groups, out]

The expected tensors and shapes are derived from the flax model itself, so every tensor the model
needs must be in the file with the right shape, and the file must hold nothing else. Problems
(missing or unreadable file, missing/unexpected tensor, wrong shape or dtype, non-finite values)
raise `dpft.paths.DataError` with a one-line message naming the file.

Inputs: NHWC float32 RGB in [0, 1], normalized with mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225) (`MEAN`, `STD`).
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpft.models.imagenet_resnet import LAYOUTS, ImageNetResNet
from dpft.models.mobilenet import MobileNetV2
from dpft.models.resnet import BLOCKS_PER_STAGE, CifarResNet
from dpft.models.vit import ViT
from dpft.paths import DataError, data_file

#: CIFAR-10 ResNets in the data directory: resnet20, resnet32, resnet44, resnet56.
NAMES: tuple[str, ...] = tuple(f"resnet{d}" for d in sorted(BLOCKS_PER_STAGE))
#: ResNets in torchvision's layout, loaded from a file given to `load` (``path``).
TORCHVISION_NAMES: tuple[str, ...] = tuple(f"resnet{d}" for d in sorted(LAYOUTS))
#: MobileNetV2 in torchvision's layout; ImageNet weights in the data directory (`MOBILENET_FILE`).
MOBILENET_NAMES: tuple[str, ...] = ("mobilenet_v2",)
MOBILENET_FILE = "pretrained/imagenet/mobilenet_v2.safetensors"
#: Vision Transformers from a checkpoint file given to `load` (`dpft.models.vit_import`).
VIT_NAMES: tuple[str, ...] = ("vit",)
#: Folder of the weights inside the data directory.
SUBDIR = "pretrained/resnet-cifar10"
#: Number of classes of the pretrained heads (CIFAR-10).
NUM_CLASSES = 10
#: Input normalization the weights were trained with (per RGB channel, inputs in [0, 1]).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
HEAD_INITS = ("keep", "zero", "random")

_IGNORED_SUFFIXES = (".num_batches_tracked",)
_BLOCK = re.compile(r"^(layer\d+)_(\d+)$")
# torchvision's module names where they differ from dpft's
_TORCHVISION_MODULES = {
    "downsample_conv": ("downsample", "0"),
    "downsample_bn": ("downsample", "1"),
    "linear": ("fc",),
}


def _check_name(name: str) -> int:
    """The ResNet depth of ``name`` (0 for MobileNetV2); `ValueError` for an unknown name."""
    valid = NAMES + TORCHVISION_NAMES + MOBILENET_NAMES
    if name not in valid:
        raise ValueError(f"pretrained model must be one of {list(valid)}, got {name!r}")
    return 0 if name in MOBILENET_NAMES else int(name.removeprefix("resnet"))


def _describe(model: nn.Module) -> str:
    depth = getattr(model, "depth", None)
    return type(model).__name__ + (f"-{depth}" if depth is not None else "")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def weights_path(name: str, path: str | os.PathLike | None = None) -> pathlib.Path:
    """The safetensors file of ``name``.

    ``path`` may be the file itself or a directory holding ``{name}.safetensors``; without it
    the file is ``pretrained/resnet-cifar10/{name}.safetensors`` (CIFAR ResNets) or
    `MOBILENET_FILE` in the data directory (a `TORCHVISION_NAMES` model needs ``path``).
    Raises `DataError` (one line) if the file does not exist.
    """
    _check_name(name)
    if (path is None or str(path) == "") and name in TORCHVISION_NAMES:
        raise DataError(
            f"no pretrained {name} weights in the data directory: give the file "
            f"(config.model.pretrained_path), a safetensors file of torchvision's {name} "
            "state dict"
        )
    if path is None or str(path) == "":
        if name in MOBILENET_NAMES:
            return data_file(MOBILENET_FILE)
        return data_file(f"{SUBDIR}/{name}.safetensors")
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        p = p / f"{name}.safetensors"
    if not p.is_file():
        raise DataError(
            _one_line(f"missing pretrained weights {p}: expected the {name} safetensors file")
        )
    return p


def read_safetensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays; `DataError` (one line) if unreadable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(os.fspath(file))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        reason = _one_line(str(e)) or type(e).__name__
        raise DataError(
            _one_line(
                f"unreadable pretrained weights {file}: {reason} "
                "(expected a safetensors file of PyTorch tensors)"
            )
        ) from None


def _torch_name(
    flax_path: tuple[str, ...], torchvision: bool = False, mobilenet: bool = False
) -> str:
    """('layer1_0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight' (kind-specific leaf names)."""
    *modules, leaf = flax_path
    parts: list[str] = []
    for m in modules:
        match = _BLOCK.match(m)
        if mobilenet:
            parts.extend(("classifier", "1") if m == "linear" else m.split("_"))
        elif match:
            parts.extend(match.groups())
        elif torchvision and m in _TORCHVISION_MODULES:
            parts.extend(_TORCHVISION_MODULES[m])
        else:
            parts.append(m)
    torch_leaf = {
        "kernel": "weight",
        "scale": "weight",
        "bias": "bias",
        "mean": "running_mean",
        "var": "running_var",
    }[leaf]
    return ".".join((*parts, torch_leaf))


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # conv [kh, kw, in, out] <- [out, in, kh, kw]
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    if len(flax_shape) == 2:  # dense [in, out] <- [out, in]
        return flax_shape[::-1]
    return flax_shape


def _to_flax(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def convert_state_dict(
    tensors: Mapping[str, np.ndarray],
    model: CifarResNet | ImageNetResNet | MobileNetV2,
    file: str | os.PathLike = "<memory>",
) -> dict[str, Any]:
    """Flax variables ``{'params', 'batch_stats'}`` of ``model`` from a PyTorch state dict.

    ``tensors`` maps PyTorch names to numpy arrays (torchvision's names for an
    `ImageNetResNet` or a `MobileNetV2`); ``file`` is only used in error messages.
    Raises `DataError` (one line naming ``file``) on a missing or unexpected tensor, a wrong
    shape, a non-float dtype or non-finite values.
    """
    if model.norm != "frozen_bn":
        raise ValueError(f"pretrained weights need norm='frozen_bn', got {model.norm!r}")
    torchvision = isinstance(model, ImageNetResNet)
    mobilenet = isinstance(model, MobileNetV2)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    flat_shapes = {path: leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    variables: dict[str, Any] = {}
    used: set[str] = set()
    for key_path, shape in flat_shapes.items():
        collection, *flax_path = (k.key for k in key_path)
        name = _torch_name(tuple(flax_path), torchvision, mobilenet)
        want = _torch_shape(tuple(shape))
        if name not in tensors:
            raise DataError(
                _one_line(
                    f"corrupt pretrained weights {file}: missing tensor {name!r} "
                    f"(expected shape {list(want)} for {_describe(model)})"
                )
            )
        array = np.asarray(tensors[name])
        if tuple(array.shape) != want:
            raise DataError(
                _one_line(
                    f"corrupt pretrained weights {file}: tensor {name!r} has shape "
                    f"{list(array.shape)}, expected {list(want)}"
                )
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise DataError(
                _one_line(
                    f"corrupt pretrained weights {file}: tensor {name!r} has dtype "
                    f"{array.dtype}, expected a floating-point type"
                )
            )
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise DataError(
                _one_line(
                    f"corrupt pretrained weights {file}: tensor {name!r} has non-finite "
                    "values, expected finite floats"
                )
            )
        used.add(name)
        node = variables.setdefault(collection, {})
        for part in flax_path[:-1]:
            node = node.setdefault(part, {})
        node[flax_path[-1]] = jnp.asarray(np.ascontiguousarray(_to_flax(array)))
    unexpected = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise DataError(
            _one_line(
                f"unexpected tensors in pretrained weights {file}: {shown} "
                f"(expected exactly the tensors of {_describe(model)})"
            )
        )
    return variables


def load(
    name: str, path: str | os.PathLike | None = None, image_size: int | None = None
) -> tuple[CifarResNet | ImageNetResNet | MobileNetV2 | ViT, dict[str, Any]]:
    """``(model, variables)`` of a pretrained ResNet or MobileNetV2 with frozen BatchNorm, or ViT.

    Args:
      name: 'resnet20', 'resnet32', 'resnet44' or 'resnet56' (CIFAR-10 weights, `NAMES`), or
        'resnet18', 'resnet34' or 'resnet50' (torchvision's layout, `TORCHVISION_NAMES`), or
        'mobilenet_v2' (torchvision's layout, ImageNet weights in the data directory).
      path: the safetensors file, or a directory holding ``{name}.safetensors``; default the
        data directory's ``pretrained/resnet-cifar10/`` or `MOBILENET_FILE` (required for
        the torchvision ResNets).
      image_size: 'vit' only: the images' side; the position embeddings are interpolated to
        it (default the checkpoint's). ``name='vit'`` returns `dpft.models.vit_import.load`'s
        ``(ViT, {'params': ...})``; its inputs are normalised as `dpft.models.vit_import`
        says (mean = std = 0.5 for big_vision / AugReg weights).

    Returns:
      ``CifarResNet(depth, 10, norm='frozen_bn')`` (or ``ImageNetResNet(depth, K,
      norm='frozen_bn')`` with the K classes of the file's ``fc``, or ``MobileNetV2(K)`` with
      the K classes of ``classifier.1``) and ``{'params': ...,
      'batch_stats': ...}`` (float32 jax arrays). ``model.apply(variables, x)`` gives logits
      and ``model.apply(variables, x, method=model.features)`` the pooled features for
      normalized NHWC inputs (see `MEAN`, `STD`; torchvision's ImageNet weights use the same).

    Raises:
      ValueError: unknown ``name``.
      DataError: missing, unreadable or mismatching weights file (one-line message).
    """
    if name in VIT_NAMES:
        from dpft.models import vit_import

        return vit_import.load(path, image_size=image_size)
    if image_size is not None:
        raise ValueError(f"image_size is only for {list(VIT_NAMES)}, not {name!r}")
    depth = _check_name(name)
    file = weights_path(name, path)
    tensors = read_safetensors(file)
    if name in NAMES:
        model = CifarResNet(depth=depth, num_classes=NUM_CLASSES, norm="frozen_bn")
    elif name in MOBILENET_NAMES:
        head = tensors.get("classifier.1.weight")
        classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
        model = MobileNetV2(num_classes=classes, norm="frozen_bn")
    else:
        head = tensors.get("fc.weight")
        classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
        model = ImageNetResNet(depth=depth, num_classes=classes, norm="frozen_bn")
    return model, convert_state_dict(tensors, model, file)


def replace_head(
    variables: Mapping[str, Any], num_classes: int, head_init: str = "zero", seed: int = 0
) -> dict[str, Any]:
    """``variables`` with a new head ``params/linear`` of ``num_classes`` outputs.

    ``head_init``: 'zero' (zero kernel and bias, the usual choice for DP fine-tuning),
    'random' (flax Dense default: LeCun-normal kernel from ``seed``, zero bias) or 'keep'
    (unchanged; only if the head already has ``num_classes`` outputs).
    Other collections (e.g. 'batch_stats') and parameters are shared, not copied.
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {list(HEAD_INITS)}, got {head_init!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    old = variables["params"]["linear"]["kernel"]
    in_features, old_classes = old.shape
    if head_init == "keep":
        if old_classes != num_classes:
            raise ValueError(
                f"head_init='keep' but the head has {old_classes} classes, not {num_classes}: "
                "use 'zero' or 'random'"
            )
        return dict(variables)
    if head_init == "zero":
        head = {
            "kernel": jnp.zeros((in_features, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32),
        }
    else:
        dense = nn.Dense(num_classes)
        head = dense.init(jax.random.PRNGKey(seed), jnp.zeros((1, in_features)))["params"]
    params = {**variables["params"], "linear": head}
    return {**variables, "params": params}


def load_head_reinit(
    name: str,
    num_classes: int,
    head_init: str = "zero",
    seed: int = 0,
    path: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> tuple[CifarResNet | ImageNetResNet | MobileNetV2 | ViT, dict[str, Any]]:
    """`load` with the head replaced by a fresh ``num_classes``-way ``linear`` (`replace_head`).

    The returned model is ``load``'s with ``num_classes`` outputs.
    """
    model, variables = load(name, path, image_size)
    variables = replace_head(variables, num_classes, head_init, seed)
    return model.clone(num_classes=num_classes), variables
