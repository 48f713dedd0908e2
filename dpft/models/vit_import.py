"""Pretrained ViTs from big_vision / AugReg ``.npz`` or timm / Hugging Face safetensors files.

`load` reads a checkpoint, recognises its layout (`LAYOUTS`) from the tensor names, infers the
architecture from the shapes and returns `dpft.models.vit.ViT` and its variables
(``pretrained.load('vit', path, image_size=S)`` calls it). The layouts and their tensor names
are in `dpft.models.vit_layouts`:

* ``'big_vision'``: the ``.npz`` files of google-research/vision_transformer (ViT, AugReg) and of
  big_vision (``embedding/kernel``, ``Transformer/encoderblock_{i}/...``); GELU 'tanh',
  LayerNorm epsilon 1e-6.
* ``'timm'``: timm's ``VisionTransformer`` state dict as safetensors (``patch_embed.proj.weight``,
  ``blocks.{i}...``); GELU 'exact', epsilon 1e-6.
* ``'hf'``: Hugging Face ``ViTForImageClassification`` / ``ViTModel`` safetensors
  (``vit.embeddings...``, ``vit.encoder.layer.{i}...``); GELU 'exact', epsilon 1e-12.

Heads: read from big_vision's query kernels; timm and Hugging Face files do not store them, so
they come from the width (`dpft.models.vit.HEADS_BY_WIDTH`: 192/384/768/1024/1280 -> 3/6/12/16/16)
or the ``num_heads`` argument. A file without a classifier gives ``num_classes=0``.

Position embeddings: the table of T rows is the grid's ``g x g`` rows, preceded by the class
token's row when the file has one (``g^2 + 1`` rows). big_vision and timm's ``no_embed_class``
models add no position embedding to the class token (``g^2`` rows with a class token): the class
row is then zero, which computes the same. With ``image_size`` giving another grid, the grid rows
are resized by half-pixel-centred bilinear interpolation (`resize_pos_embedding`; antialiased
when shrinking, as ``jax.image.resize``); the class row is kept. (big_vision's own resampling
aligns the corners instead, so its tables differ slightly.)

Inputs: NHWC RGB in [0, 1], normalised as the weights were trained: mean = std = 0.5 per
channel (`MEAN`, `STD`, inputs in [-1, 1]) for big_vision, the ViT / AugReg files, their timm and
Hugging Face ports (``google/vit-*``, timm's ``augreg`` / ``orig_in21k`` tags); ImageNet's
`IMAGENET_MEAN` / `IMAGENET_STD` for timm models trained in PyTorch (DeiT, ...); check the
model card. `normalize` applies either.

Problems (missing or unreadable file, unknown layout, missing or unexpected tensor, wrong shape or
dtype, non-finite values, uninferable heads) raise `dpft.paths.DataError`, one line naming the file.
"""

from __future__ import annotations

import math
import os
import pathlib
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpft.models.vit import ViT
from dpft.models.vit_layouts import CONVERTERS, LAYOUTS, Reader, detect_layout, one_line
from dpft.paths import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYOUTS",
    "MEAN",
    "STD",
    "convert",
    "detect_layout",
    "load",
    "normalize",
    "read_checkpoint",
    "resize_pos_embedding",
]

#: big_vision, ViT / AugReg and their ports: inputs in [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
#: timm models trained in PyTorch (DeiT, ...).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: Any, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> jax.Array:
    """``(images - mean) / std`` per channel, for NHWC images in [0, 1]."""
    x = jnp.asarray(images, jnp.float32)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an ``.npz`` or safetensors file; `DataError` (one line) if unreadable."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise DataError(
            f"missing ViT checkpoint {p}: expected a big_vision/AugReg .npz or a timm/Hugging "
            "Face safetensors file"
        )
    try:
        if zipfile.is_zipfile(p):
            with np.load(p, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        from safetensors.numpy import load_file

        return load_file(os.fspath(p))
    except Exception as e:  # noqa: BLE001 - numpy, zipfile and safetensors raise many types
        reason = one_line(str(e)) or type(e).__name__
        raise DataError(
            one_line(
                f"unreadable ViT checkpoint {p}: {reason} (expected a big_vision/AugReg .npz "
                "or a timm/Hugging Face safetensors file)"
            )
        ) from None


def _grid_size(image_size: int | Sequence[int], patch: int) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(int(s) != s or s < patch or s % patch for s in size):
        raise ValueError(
            f"image_size must be a side (or [height, width]) that is a positive multiple of the "
            f"patch size {patch}, got {image_size!r}"
        )
    return int(size[0]) // patch, int(size[1]) // patch


def resize_pos_embedding(
    grid: np.ndarray, old: tuple[int, int], new: tuple[int, int]
) -> np.ndarray:
    """Position embeddings ``[1, old_h * old_w, D]`` of a grid resized to ``[1, h * w, D]``.

    Half-pixel-centred bilinear interpolation (``jax.image.resize``, antialiased when shrinking),
    in float32 at the highest matmul precision.
    """
    d = grid.shape[-1]
    image = jnp.asarray(grid, jnp.float32).reshape(*old, d)
    out = jax.image.resize(image, (*new, d), "bilinear", precision=jax.lax.Precision.HIGHEST)
    return np.asarray(out, np.float32).reshape(1, new[0] * new[1], d)


def _pos_embedding(r, arch, table_name, image_size):
    """(pos_embedding table for the image size, image size (h, w))."""
    d = arch.width
    table = r.get(table_name, (1, None, d))
    rows = table.shape[1]
    if arch.tok and rows >= 2 and math.isqrt(rows - 1) ** 2 == rows - 1:
        cls_row, grid = table[:, :1], table[:, 1:]
    elif math.isqrt(rows) ** 2 == rows:
        cls_row, grid = np.zeros((1, 1, d), np.float32), table
    else:
        raise r.error(
            f"tensor {table_name!r} has {rows} rows: expected a square grid of g*g rows"
            + (" (plus one for the class token)" if arch.tok else "")
        )
    g = math.isqrt(grid.shape[1])
    new = (g, g) if image_size is None else _grid_size(image_size, arch.patch)
    if new != (g, g):
        grid = resize_pos_embedding(grid, (g, g), new)
    table = np.concatenate([cls_row, grid], axis=1) if arch.tok else grid
    return table, (new[0] * arch.patch, new[1] * arch.patch)


def convert(
    tensors: Mapping[str, Any],
    file: str | os.PathLike = "<memory>",
    image_size: int | Sequence[int] | None = None,
    num_heads: int | None = None,
) -> tuple[ViT, dict[str, Any]]:
    """``(ViT, {'params': ...})`` from a checkpoint's tensors (see the module docstring).

    Args:
      tensors: tensor name -> array, in one of `LAYOUTS`.
      file: named in error messages.
      image_size: side (or ``[height, width]``) of the images the model will see; the position
        embeddings are interpolated to its grid. Default: the checkpoint's own grid.
      num_heads: heads for a timm / Hugging Face file whose width is not a standard one.

    Raises:
      DataError: unknown layout or a bad tensor (one line naming ``file``).
      ValueError: ``image_size`` is not a multiple of the patch size.
    """
    r = Reader(tensors, os.fspath(file))
    layout = detect_layout(tensors)
    if layout is None:
        shown = ", ".join(sorted(tensors)[:3]) or "no tensors"
        raise DataError(
            one_line(
                f"not a ViT checkpoint {r.file}: found {shown}; expected 'embedding/kernel' "
                "(big_vision/AugReg), 'patch_embed.proj.weight' (timm) or "
                "'vit.embeddings.patch_embeddings.projection.weight' (Hugging Face)"
            )
        )
    arch, params, table_name, cls_name = CONVERTERS[layout](r, num_heads)
    d = arch.width
    params["pos_embedding"], size = _pos_embedding(r, arch, table_name, image_size)
    if arch.tok:
        params["cls"] = r.get(cls_name, (1, 1, d))
    if not arch.classes:
        params["linear"] = {
            "kernel": np.zeros((d, 0), np.float32),
            "bias": np.zeros((0,), np.float32),
        }
    unexpected = sorted(k for k in tensors if k not in r.used)
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise DataError(
            one_line(
                f"unexpected tensors in ViT checkpoint {r.file}: {shown} (expected exactly the "
                f"tensors of a {layout} ViT with width {d} and depth {arch.depth})"
            )
        )
    model = ViT(
        num_classes=arch.classes,
        patch_size=arch.patch,
        width=d,
        depth=arch.depth,
        mlp_dim=arch.mlp_dim,
        num_heads=arch.heads,
        pool_type="tok" if arch.tok else "gap",
        gelu=arch.gelu,
        layernorm_eps=arch.eps,
        fc_norm=arch.fc_norm,
    )
    spec = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *size, arch.channels)))
    want = jax.tree_util.tree_map(lambda s: tuple(s.shape), spec["params"])
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), params)
    if got != want:  # every tensor's shape was checked above: this is a bug, not bad data
        raise RuntimeError(f"ViT conversion of {r.file} built {got}, the model needs {want}")
    variables = {
        "params": jax.tree_util.tree_map(lambda a: jnp.asarray(np.ascontiguousarray(a)), params)
    }
    return model, variables


def load(
    path: str | os.PathLike | None,
    image_size: int | Sequence[int] | None = None,
    num_heads: int | None = None,
) -> tuple[ViT, dict[str, Any]]:
    """``(model, variables)`` of a ViT checkpoint file (`read_checkpoint`, then `convert`).

    ``model.apply(variables, x)`` gives logits (``[N, 0]`` for a file without a classifier)
    and ``model.apply(variables, x, method=model.features)`` the pooled representation for
    NHWC images of ``image_size`` (default: the checkpoint's) normalised as the source expects
    (`MEAN`, `STD`; see the module docstring).
    """
    if path is None or str(path) == "":
        raise DataError(
            "no ViT weights in the data directory: give the checkpoint file "
            "(config.model.pretrained_path), a big_vision/AugReg .npz or a timm/Hugging Face "
            "safetensors file"
        )
    tensors = read_checkpoint(path)
    return convert(tensors, pathlib.Path(path).expanduser(), image_size, num_heads)
