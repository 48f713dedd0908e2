"""The tensor layouts of ViT checkpoints, read into `dpft.models.vit.ViT`'s parameter tree.

Used by `dpft.models.vit_import` (the entry point); `CONVERTERS` maps a layout (`LAYOUTS`) to a
function ``(reader, num_heads) -> (Arch, params, table name, class-token name)`` that infers the
architecture from the shapes and returns every parameter but ``pos_embedding``, ``cls`` and a
missing head. Names (``p`` patch, ``C`` input channels, ``D`` width, ``H`` heads, ``M`` MLP width,
``K`` classes, ``i`` the block; PyTorch weights are ``[out, in]``):

``'big_vision'``, the ``.npz`` files of google-research/vision_transformer (ViT, AugReg) and of
big_vision: flax names joined by '/', possibly under ``params/`` or ``opt/target/``::

    embedding/kernel [p, p, C, D], embedding/bias       -> embedding/*
    cls [1, 1, D]                                       -> cls (class-token models)
    Transformer/posembed_input/pos_embedding [1, T, D]  -> pos_embedding (`dpft.models.vit_import`)
      (big_vision: pos_embedding or Transformer/pos_embedding)
    Transformer/encoderblock_{i}/
      LayerNorm_0/{scale, bias}                         -> encoderblock_{i}/norm1/{scale, bias}
      MultiHeadDotProductAttention_1/{query, key, value}/kernel [D, H, D/H], bias [H, D/H]
                                                        -> .../qkv (concatenated, heads by reshape)
      MultiHeadDotProductAttention_1/out/kernel [H, D/H, D], out/bias  -> .../out
      LayerNorm_2/*                                     -> .../norm2/*
      MlpBlock_3/Dense_0/* [D, M], MlpBlock_3/Dense_1/* [M, D]  -> .../mlp1/*, .../mlp2/*
    Transformer/encoder_norm/{scale, bias}              -> encoder_norm/*
    head/kernel [D, K], head/bias                       -> linear/*

  big_vision numbers the block's modules per type (``MultiHeadDotProductAttention_0``,
  ``LayerNorm_1``, ``MlpBlock_0``); a scanned big_vision model stores all blocks under
  ``Transformer/encoderblock/`` stacked on a leading axis of length ``depth``. Both are read.
  GELU 'tanh', LayerNorm epsilon 1e-6; H from the query kernel.

``'timm'`` (timm's ``VisionTransformer`` state dict; PyTorch ``[out, in]`` weights)::

    patch_embed.proj.weight [D, C, p, p], .bias         -> embedding/*
    cls_token [1, 1, D], pos_embed [1, T, D]            -> cls, pos_embedding
    blocks.{i}.norm1.*, blocks.{i}.norm2.*              -> encoderblock_{i}/norm1/*, norm2/*
    blocks.{i}.attn.qkv.weight [3D, D], .bias [3D]      -> encoderblock_{i}/qkv/*
    blocks.{i}.attn.proj.*, mlp.fc1.* [M, D], mlp.fc2.* -> .../out/*, mlp1/*, mlp2/*
    norm.* (or fc_norm.*: LayerNorm after average pooling, `ViT.fc_norm`) -> encoder_norm/*
    head.weight [K, D], head.bias                       -> linear/*

  GELU 'exact', epsilon 1e-6. Without ``cls_token`` the model averages the tokens ('gap').

``'hf'`` (Hugging Face ``ViTForImageClassification`` / ``ViTModel``; names under ``vit.`` or
bare): ``embeddings.patch_embeddings.projection.*``, ``embeddings.cls_token``,
``embeddings.position_embeddings``, ``encoder.layer.{i}.layernorm_before.*``,
``attention.attention.{query, key, value}.*`` ``[D, D]``, ``attention.output.dense.*``,
``layernorm_after.*``, ``intermediate.dense.*``, ``output.dense.*``, ``layernorm.*`` and
``classifier.*``; ``pooler.*`` (not part of the classifier) is ignored. GELU 'exact', epsilon
1e-12 (``ViTConfig.layer_norm_eps``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dpft.models.vit import HEADS_BY_WIDTH
from dpft.paths import DataError

LAYOUTS: tuple[str, ...] = ("big_vision", "timm", "hf")
_BV_PREFIXES = ("", "params/", "opt/target/")
_HF_PREFIXES = ("vit.", "")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class Reader:
    """Checked access to a checkpoint's tensors; records which were used."""

    def __init__(self, tensors: Mapping[str, Any], file: str):
        self.tensors, self.file, self.used = tensors, file, set()
        self._cache: dict[str, np.ndarray] = {}

    def error(self, what: str, kind: str = "corrupt") -> DataError:
        return DataError(one_line(f"{kind} ViT checkpoint {self.file}: {what}"))

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str, ndim: int) -> tuple[int, ...]:
        if name not in self.tensors:
            raise self.error(f"missing tensor {name!r}")
        shape = tuple(int(s) for s in np.shape(self.tensors[name]))
        if len(shape) != ndim:
            raise self.error(f"tensor {name!r} has shape {list(shape)}, expected {ndim} dims")
        return shape

    def get(self, name: str, shape: Sequence[int | None]) -> np.ndarray:
        """The float32 tensor ``name``; ``None`` in ``shape`` matches any size."""
        if name not in self.tensors:
            want = ", ".join("?" if s is None else str(s) for s in shape)
            raise self.error(f"missing tensor {name!r} (expected shape [{want}])")
        if name in self._cache:
            return self._cache[name]
        a = np.asarray(self.tensors[name])
        fits = a.ndim == len(shape) and all(
            w is None or w == s for w, s in zip(shape, a.shape, strict=True)
        )
        if not fits:
            want = ", ".join("?" if s is None else str(s) for s in shape)
            raise self.error(f"tensor {name!r} has shape {list(a.shape)}, expected [{want}]")
        if not np.issubdtype(a.dtype, np.floating):
            raise self.error(f"tensor {name!r} has dtype {a.dtype}, expected floating point")
        a = a.astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise self.error(f"tensor {name!r} has non-finite values, expected finite floats")
        self.used.add(name)
        self._cache[name] = a
        return a

    def count(self, pattern: str) -> int:
        """Blocks 0, 1, ... present: the first i with no tensor ``pattern.format(i)``."""
        i = 0
        while pattern.format(i) in self.tensors:
            i += 1
        return i


@dataclasses.dataclass
class Arch:
    """The architecture read from a checkpoint (`dpft.models.vit.ViT`'s fields)."""

    patch: int
    channels: int
    width: int
    depth: int
    mlp_dim: int
    heads: int | None
    tok: bool
    classes: int
    gelu: str
    eps: float
    fc_norm: bool = False


def detect_layout(tensors: Mapping[str, Any]) -> str | None:
    """'big_vision', 'timm', 'hf' (`LAYOUTS`) from the tensor names, or None."""
    if any(f"{p}embedding/kernel" in tensors for p in _BV_PREFIXES):
        return "big_vision"
    if "patch_embed.proj.weight" in tensors:
        return "timm"
    if any(f"{p}embeddings.patch_embeddings.projection.weight" in tensors for p in _HF_PREFIXES):
        return "hf"
    return None


def _square_patch(r: Reader, name: str, shape: tuple[int, ...], axes: tuple[int, int]) -> int:
    ph, pw = shape[axes[0]], shape[axes[1]]
    if ph != pw:
        raise r.error(f"tensor {name!r} has shape {list(shape)}: expected square patches")
    return ph


def _heads(r: Reader, width: int, num_heads: int | None) -> int:
    if num_heads is not None:
        return int(num_heads)
    if width not in HEADS_BY_WIDTH:
        raise r.error(
            f"the number of heads is not stored and width {width} is not a standard ViT width "
            f"({'/'.join(map(str, HEADS_BY_WIDTH))}): pass num_heads=",
            kind="ambiguous",
        )
    return HEADS_BY_WIDTH[width]


def _ln(r: Reader, scale: str, bias: str, d: int) -> dict[str, np.ndarray]:
    return {"scale": r.get(scale, (d,)), "bias": r.get(bias, (d,))}


def _torch_linear(r: Reader, prefix: str, dout: int, din: int) -> dict[str, np.ndarray]:
    """A PyTorch ``Linear`` ``prefix.weight [out, in]``, ``prefix.bias`` as a flax Dense."""
    return {
        "kernel": r.get(f"{prefix}.weight", (dout, din)).T,
        "bias": r.get(f"{prefix}.bias", (dout,)),
    }


def _big_vision(r: Reader, num_heads: int | None):
    """(architecture, params but pos_embedding / cls, position table name, class token name).

    One piece because it reads one checkpoint layout top to bottom (embedding, encoder blocks
    stacked or not, head, pooling), each name mapped next to the shape check that refuses it.
    """
    pre = next(p for p in _BV_PREFIXES if r.has(f"{p}embedding/kernel"))
    name = f"{pre}embedding/kernel"
    shape = r.shape(name, 4)
    patch, (c, d) = _square_patch(r, name, shape, (0, 1)), shape[2:]
    stacked = f"{pre}Transformer/encoderblock/"
    scan = r.has(f"{stacked}LayerNorm_0/scale")
    if scan:
        depth = r.shape(f"{stacked}LayerNorm_0/scale", 2)[0]
        first = stacked
    else:
        depth = r.count(f"{pre}Transformer/encoderblock_{{}}/LayerNorm_0/scale")
        first = f"{pre}Transformer/encoderblock_0/"
    if depth == 0:
        raise r.error(f"missing tensor '{first}LayerNorm_0/scale' (no encoder blocks)")
    # google-research/vision_transformer numbers all submodules, big_vision each type
    old = r.has(f"{first}MultiHeadDotProductAttention_1/query/kernel")
    mha, ln2, mlp = (
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
        if old
        else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    )
    query = f"{first}{mha}/query/kernel"
    heads, hd = r.shape(query, 3 + scan)[-2:]
    if heads * hd != d:
        raise r.error(f"tensor {query!r} has {heads} heads of {hd}: expected H heads of {d}/H")
    if num_heads is not None and num_heads != heads:
        raise r.error(f"tensor {query!r} has {heads} heads, but num_heads={num_heads} was given")
    mlp_dim = r.shape(f"{first}{mlp}/Dense_0/kernel", 2 + scan)[-1]
    head = f"{pre}head/kernel"
    arch = Arch(
        patch=patch,
        channels=c,
        width=d,
        depth=depth,
        mlp_dim=mlp_dim,
        heads=heads,
        tok=r.has(f"{pre}cls"),
        classes=r.shape(head, 2)[1] if r.has(head) else 0,
        gelu="tanh",
        eps=1e-6,
    )

    def get(i: int, sub: str, shape: tuple[int, ...]) -> np.ndarray:
        if scan:
            return r.get(f"{stacked}{sub}", (depth, *shape))[i]
        return r.get(f"{pre}Transformer/encoderblock_{i}/{sub}", shape)

    def ln(i: int, sub: str) -> dict[str, np.ndarray]:
        return {"scale": get(i, f"{sub}/scale", (d,)), "bias": get(i, f"{sub}/bias", (d,))}

    params: dict[str, Any] = {
        "embedding": {"kernel": r.get(name, shape), "bias": r.get(f"{pre}embedding/bias", (d,))}
    }
    for i in range(depth):
        qkv = ("query", "key", "value")
        params[f"encoderblock_{i}"] = {
            "norm1": ln(i, "LayerNorm_0"),
            "qkv": {
                "kernel": np.concatenate(
                    [get(i, f"{mha}/{n}/kernel", (d, heads, hd)).reshape(d, d) for n in qkv], 1
                ),
                "bias": np.concatenate(
                    [get(i, f"{mha}/{n}/bias", (heads, hd)).reshape(d) for n in qkv]
                ),
            },
            "out": {
                "kernel": get(i, f"{mha}/out/kernel", (heads, hd, d)).reshape(d, d),
                "bias": get(i, f"{mha}/out/bias", (d,)),
            },
            "norm2": ln(i, ln2),
            "mlp1": {
                "kernel": get(i, f"{mlp}/Dense_0/kernel", (d, mlp_dim)),
                "bias": get(i, f"{mlp}/Dense_0/bias", (mlp_dim,)),
            },
            "mlp2": {
                "kernel": get(i, f"{mlp}/Dense_1/kernel", (mlp_dim, d)),
                "bias": get(i, f"{mlp}/Dense_1/bias", (d,)),
            },
        }
    enc = f"{pre}Transformer/encoder_norm/"
    params["encoder_norm"] = _ln(r, f"{enc}scale", f"{enc}bias", d)
    if arch.classes:
        params["linear"] = {
            "kernel": r.get(head, (d, arch.classes)),
            "bias": r.get(f"{pre}head/bias", (arch.classes,)),
        }
    tables = [
        f"{pre}Transformer/posembed_input/pos_embedding",
        f"{pre}Transformer/pos_embedding",
        f"{pre}pos_embedding",
    ]
    table = next((t for t in tables if r.has(t)), tables[0])
    return arch, params, table, f"{pre}cls"


def _timm(r: Reader, num_heads: int | None):
    """`_big_vision`'s result for timm's names."""
    name = "patch_embed.proj.weight"
    shape = r.shape(name, 4)
    (d, c), patch = shape[:2], _square_patch(r, name, shape, (2, 3))
    depth = r.count("blocks.{}.norm1.weight")
    if depth == 0:
        raise r.error("missing tensor 'blocks.0.norm1.weight' (no encoder blocks)")
    tok, fc_norm = r.has("cls_token"), r.has("fc_norm.weight")
    if tok and fc_norm:
        raise r.error(
            "a class token with fc_norm (timm's average pooling over the patch tokens only) is "
            "not supported: expected cls_token with norm.*, or fc_norm.* without cls_token",
            kind="unsupported",
        )
    arch = Arch(
        patch=patch,
        channels=c,
        width=d,
        depth=depth,
        mlp_dim=r.shape("blocks.0.mlp.fc1.weight", 2)[0],
        heads=_heads(r, d, num_heads),
        tok=tok,
        classes=r.shape("head.weight", 2)[0] if r.has("head.weight") else 0,
        gelu="exact",
        eps=1e-6,
        fc_norm=fc_norm,
    )
    m = arch.mlp_dim
    params: dict[str, Any] = {
        "embedding": {
            "kernel": r.get(name, (d, c, patch, patch)).transpose(2, 3, 1, 0),
            "bias": r.get("patch_embed.proj.bias", (d,)),
        }
    }
    for i in range(depth):
        b = f"blocks.{i}."
        params[f"encoderblock_{i}"] = {
            "norm1": _ln(r, f"{b}norm1.weight", f"{b}norm1.bias", d),
            "qkv": _torch_linear(r, f"{b}attn.qkv", 3 * d, d),
            "out": _torch_linear(r, f"{b}attn.proj", d, d),
            "norm2": _ln(r, f"{b}norm2.weight", f"{b}norm2.bias", d),
            "mlp1": _torch_linear(r, f"{b}mlp.fc1", m, d),
            "mlp2": _torch_linear(r, f"{b}mlp.fc2", d, m),
        }
    norm = "fc_norm" if fc_norm else "norm"
    params["encoder_norm"] = _ln(r, f"{norm}.weight", f"{norm}.bias", d)
    if arch.classes:
        params["linear"] = _torch_linear(r, "head", arch.classes, d)
    return arch, params, "pos_embed", "cls_token"


def _hf(r: Reader, num_heads: int | None):
    """`_big_vision`'s result for Hugging Face's names."""
    pre = next(
        p for p in _HF_PREFIXES if r.has(f"{p}embeddings.patch_embeddings.projection.weight")
    )
    emb = f"{pre}embeddings."
    name = f"{emb}patch_embeddings.projection.weight"
    shape = r.shape(name, 4)
    (d, c), patch = shape[:2], _square_patch(r, name, shape, (2, 3))
    layer = f"{pre}encoder.layer."
    depth = r.count(layer + "{}.layernorm_before.weight")
    if depth == 0:
        raise r.error(f"missing tensor '{layer}0.layernorm_before.weight' (no encoder blocks)")
    arch = Arch(
        patch=patch,
        channels=c,
        width=d,
        depth=depth,
        mlp_dim=r.shape(f"{layer}0.intermediate.dense.weight", 2)[0],
        heads=_heads(r, d, num_heads),
        tok=True,
        classes=r.shape("classifier.weight", 2)[0] if r.has("classifier.weight") else 0,
        gelu="exact",
        eps=1e-12,
    )
    m = arch.mlp_dim
    params: dict[str, Any] = {
        "embedding": {
            "kernel": r.get(name, (d, c, patch, patch)).transpose(2, 3, 1, 0),
            "bias": r.get(f"{emb}patch_embeddings.projection.bias", (d,)),
        }
    }
    for i in range(depth):
        b = f"{layer}{i}."
        att = [
            _torch_linear(r, f"{b}attention.attention.{n}", d, d) for n in ("query", "key", "value")
        ]
        params[f"encoderblock_{i}"] = {
            "norm1": _ln(r, f"{b}layernorm_before.weight", f"{b}layernorm_before.bias", d),
            "qkv": {k: np.concatenate([a[k] for a in att], axis=-1) for k in ("kernel", "bias")},
            "out": _torch_linear(r, f"{b}attention.output.dense", d, d),
            "norm2": _ln(r, f"{b}layernorm_after.weight", f"{b}layernorm_after.bias", d),
            "mlp1": _torch_linear(r, f"{b}intermediate.dense", m, d),
            "mlp2": _torch_linear(r, f"{b}output.dense", d, m),
        }
    params["encoder_norm"] = _ln(r, f"{pre}layernorm.weight", f"{pre}layernorm.bias", d)
    if arch.classes:
        params["linear"] = _torch_linear(r, "classifier", arch.classes, d)
    r.used.update(k for k in r.tensors if k.startswith(f"{pre}pooler."))  # ignored
    return arch, params, f"{emb}position_embeddings", f"{emb}cls_token"


CONVERTERS = {"big_vision": _big_vision, "timm": _timm, "hf": _hf}
