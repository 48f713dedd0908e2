"""CIFAR-10-pretrained ResNet-20/32/44/56 from the data directory, as flax variables.

The weights (Idelbayev's pytorch_resnet_cifar10, BSD 2-Clause) are safetensors files with
PyTorch names and layouts under ``pretrained/resnet-cifar10/{name}.safetensors`` in the data
directory (``$DPFT_DATA_DIR``, see `dpft.paths`). `load` converts them for `CifarResNet` with
``norm='frozen_bn'``::

    conv weight [out, in, kh, kw]   -> params  .../kernel [kh, kw, in, out]
    linear.weight [out, in]         -> params  linear/kernel [in, out]; linear.bias -> linear/bias
    bn weight, bias                 -> params  .../scale, .../bias
    bn running_mean, running_var    -> batch_stats .../mean, .../var
    bn num_batches_tracked          -> ignored
    layer{s}.{i}.<name>             -> layer{s}_{i}/<name>

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

from dpft.models.resnet import BLOCKS_PER_STAGE, CifarResNet
from dpft.paths import DataError, data_file

#: Names `load` accepts: resnet20, resnet32, resnet44, resnet56.
NAMES: tuple[str, ...] = tuple(f"resnet{d}" for d in sorted(BLOCKS_PER_STAGE))
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


def _check_name(name: str) -> int:
    if name not in NAMES:
        raise ValueError(f"pretrained model must be one of {list(NAMES)}, got {name!r}")
    return int(name.removeprefix("resnet"))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def weights_path(name: str, path: str | os.PathLike | None = None) -> pathlib.Path:
    """The safetensors file of ``name``.

    ``path`` may be the file itself or a directory holding ``{name}.safetensors``; without it
    the file is ``pretrained/resnet-cifar10/{name}.safetensors`` in the data directory.
    Raises `DataError` (one line) if the file does not exist.
    """
    _check_name(name)
    if path is None or str(path) == "":
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


def _torch_name(flax_path: tuple[str, ...]) -> str:
    """('layer1_0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight' (kind-specific leaf names)."""
    *modules, leaf = flax_path
    parts: list[str] = []
    for m in modules:
        match = _BLOCK.match(m)
        parts.extend(match.groups() if match else (m,))
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
    tensors: Mapping[str, np.ndarray], model: CifarResNet, file: str | os.PathLike = "<memory>"
) -> dict[str, Any]:
    """Flax variables ``{'params', 'batch_stats'}`` of ``model`` from a PyTorch state dict.

    ``tensors`` maps PyTorch names to numpy arrays; ``file`` is only used in error messages.
    Raises `DataError` (one line naming ``file``) on a missing or unexpected tensor, a wrong
    shape, a non-float dtype or non-finite values.
    """
    if model.norm != "frozen_bn":
        raise ValueError(f"pretrained weights need norm='frozen_bn', got {model.norm!r}")
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    flat_shapes = {path: leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    variables: dict[str, Any] = {}
    used: set[str] = set()
    for key_path, shape in flat_shapes.items():
        collection, *flax_path = (k.key for k in key_path)
        name = _torch_name(tuple(flax_path))
        want = _torch_shape(tuple(shape))
        if name not in tensors:
            raise DataError(
                _one_line(
                    f"corrupt pretrained weights {file}: missing tensor {name!r} "
                    f"(expected shape {list(want)} for {type(model).__name__}-{model.depth})"
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
                f"(expected exactly the tensors of {type(model).__name__}-{model.depth})"
            )
        )
    return variables


def load(name: str, path: str | os.PathLike | None = None) -> tuple[CifarResNet, dict[str, Any]]:
    """``(model, variables)`` of a CIFAR-10-pretrained ResNet with frozen BatchNorm.

    Args:
      name: 'resnet20', 'resnet32', 'resnet44' or 'resnet56'.
      path: the safetensors file, or a directory holding ``{name}.safetensors``; default the
        data directory's ``pretrained/resnet-cifar10/``.

    Returns:
      ``CifarResNet(depth, 10, norm='frozen_bn')`` and ``{'params': ..., 'batch_stats': ...}``
      (float32 jax arrays). ``model.apply(variables, x)`` gives logits and
      ``model.apply(variables, x, method=model.features)`` the 64-d pooled features for
      normalized NHWC inputs (see `MEAN`, `STD`).

    Raises:
      ValueError: unknown ``name``.
      DataError: missing, unreadable or mismatching weights file (one-line message).
    """
    depth = _check_name(name)
    file = weights_path(name, path)
    model = CifarResNet(depth=depth, num_classes=NUM_CLASSES, norm="frozen_bn")
    return model, convert_state_dict(read_safetensors(file), model, file)


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
) -> tuple[CifarResNet, dict[str, Any]]:
    """`load` with the head replaced by a fresh ``num_classes``-way ``linear`` (`replace_head`).

    The returned model is ``CifarResNet(depth, num_classes, norm='frozen_bn')``.
    """
    model, variables = load(name, path)
    variables = replace_head(variables, num_classes, head_init, seed)
    return model.clone(num_classes=num_classes), variables
