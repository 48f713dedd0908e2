"""Random ViT checkpoints in the published layouts and an independent numpy forward (tests).

`canonical` draws the tensors of a small ViT in the ViT paper's form (per-head attention
kernels); `write_big_vision`, `timm_tensors` and `hf_tensors` write them with the tensor names and
layouts of the google-research/vision_transformer and big_vision ``.npz`` files, timm's state dict
and Hugging Face's ``ViTForImageClassification``; `reference` is the float64 numpy forward of the
canonical model (its own patchify, LayerNorm, attention and both GELUs).
"""

import numpy as np
from safetensors import numpy as st
from scipy.special import erf

P, D, DEPTH, H, M, K, C_IN = 8, 32, 2, 2, 64, 5, 3  # patch, width, depth, heads, mlp, classes
GRID = 4  # 32 px checkpoints


# ----------------------------------------------------------------------------- canonical model


def canonical(seed, tok=True, embed_class=True, grid=GRID, width=D, depth=DEPTH, heads=H):
    """Random tensors of a ViT; ``pos`` has a class row (zero unless ``embed_class``) if tok."""
    rng = np.random.default_rng(seed)
    hd = width // heads

    def w(*shape, fan_in):
        return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

    def b(*shape):
        return (0.1 * rng.normal(size=shape)).astype(np.float32)

    def ln():
        return (1 + 0.2 * rng.normal(size=width)).astype(np.float32), b(width)

    c = {"patch": w(P, P, C_IN, width, fan_in=P * P * C_IN), "patch_b": b(width)}
    c["cls"] = rng.normal(size=(1, 1, width)).astype(np.float32) if tok else None
    pos = (0.5 * rng.normal(size=(1, grid * grid + tok, width))).astype(np.float32)
    if tok and not embed_class:
        pos[:, 0] = 0
    c["pos"] = pos
    c["blocks"] = []
    for _ in range(depth):
        blk = {}
        blk["ln1_s"], blk["ln1_b"] = ln()
        for n in "qkv":
            blk[f"w{n}"] = w(width, heads, hd, fan_in=width)
            blk[f"b{n}"] = b(heads, hd)
        blk["wo"], blk["bo"] = w(heads, hd, width, fan_in=width), b(width)
        blk["ln2_s"], blk["ln2_b"] = ln()
        blk["w1"], blk["b1"] = w(width, M, fan_in=width), b(M)
        blk["w2"], blk["b2"] = w(M, width, fan_in=M), b(width)
        c["blocks"].append(blk)
    c["norm_s"], c["norm_b"] = ln()
    c["head_w"], c["head_b"] = w(width, K, fan_in=width), b(K)
    return c


def _layernorm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _gelu(x, kind):
    if kind == "exact":
        return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference(c, x, gelu, eps, fc_norm=False, pos=None):
    """(logits, features) of the canonical model on NHWC ``x``, float64 numpy."""
    c64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = c64(x)
    n, hh, ww, ch = x.shape
    gh, gw = hh // P, ww // P
    patches = x.reshape(n, gh, P, gw, P, ch).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, -1)
    t = patches @ c64(c["patch"]).reshape(-1, c["patch"].shape[-1]) + c["patch_b"]
    tok = c["cls"] is not None
    if tok:
        t = np.concatenate([np.broadcast_to(c64(c["cls"]), (n, 1, t.shape[-1])), t], axis=1)
    t = t + c64(c["pos"] if pos is None else pos)
    for blk in c["blocks"]:
        blk = {k: c64(v) for k, v in blk.items()}
        y = _layernorm(t, blk["ln1_s"], blk["ln1_b"], eps)
        q, k, v = (np.einsum("ntd,dhc->nthc", y, blk[f"w{s}"]) + blk[f"b{s}"] for s in "qkv")
        scores = np.einsum("nqhc,nkhc->nhqk", q, k) / np.sqrt(q.shape[-1])
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = scores / scores.sum(-1, keepdims=True)
        o = np.einsum("nhqk,nkhc->nqhc", attn, v)
        t = t + np.einsum("nqhc,hcd->nqd", o, blk["wo"]) + blk["bo"]
        y = _layernorm(t, blk["ln2_s"], blk["ln2_b"], eps)
        t = t + _gelu(y @ blk["w1"] + blk["b1"], gelu) @ blk["w2"] + blk["b2"]
    if fc_norm:
        f = _layernorm(t.mean(1), c["norm_s"], c["norm_b"], eps)
    else:
        t = _layernorm(t, c["norm_s"], c["norm_b"], eps)
        f = t[:, 0] if tok else t.mean(1)
    return f @ c64(c["head_w"]) + c["head_b"], f


# ----------------------------------------------------------------------------- layout writers


def write_big_vision(c, path, naming="vit", scan=False, prefix=""):
    """google-research/vision_transformer ('vit') or big_vision ('big_vision') npz names."""
    mha, ln2, mlp = ("1", "2", "3") if naming == "vit" else ("0", "1", "0")
    t = {"embedding/kernel": c["patch"], "embedding/bias": c["patch_b"]}
    if c["cls"] is not None:
        t["cls"] = c["cls"]
    if naming == "vit":
        t["Transformer/posembed_input/pos_embedding"] = c["pos"]
    else:  # big_vision adds the grid's table before the class token is prepended
        assert c["cls"] is None or not c["pos"][:, 0].any()
        t["pos_embedding"] = c["pos"][:, 1:] if c["cls"] is not None else c["pos"]
    blocks = []
    for blk in c["blocks"]:
        e = {"LayerNorm_0/scale": blk["ln1_s"], "LayerNorm_0/bias": blk["ln1_b"]}
        a = f"MultiHeadDotProductAttention_{mha}/"
        for n, s in zip(("query", "key", "value"), "qkv", strict=True):
            e[f"{a}{n}/kernel"], e[f"{a}{n}/bias"] = blk[f"w{s}"], blk[f"b{s}"]
        e[f"{a}out/kernel"], e[f"{a}out/bias"] = blk["wo"], blk["bo"]
        e[f"LayerNorm_{ln2}/scale"], e[f"LayerNorm_{ln2}/bias"] = blk["ln2_s"], blk["ln2_b"]
        e[f"MlpBlock_{mlp}/Dense_0/kernel"], e[f"MlpBlock_{mlp}/Dense_0/bias"] = (
            blk["w1"],
            blk["b1"],
        )
        e[f"MlpBlock_{mlp}/Dense_1/kernel"], e[f"MlpBlock_{mlp}/Dense_1/bias"] = (
            blk["w2"],
            blk["b2"],
        )
        blocks.append(e)
    if scan:
        for k in blocks[0]:
            t[f"Transformer/encoderblock/{k}"] = np.stack([e[k] for e in blocks])
    else:
        for i, e in enumerate(blocks):
            t.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in e.items()})
    t["Transformer/encoder_norm/scale"], t["Transformer/encoder_norm/bias"] = (
        c["norm_s"],
        c["norm_b"],
    )
    t["head/kernel"], t["head/bias"] = c["head_w"], c["head_b"]
    np.savez(path, **{prefix + k: v for k, v in t.items()})
    return path


def save_file(tensors, path):
    """safetensors writes an array's memory, not its logical order: make every one C-ordered."""
    st.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


def _torch(w):  # flax [in, out] -> torch [out, in]
    return np.ascontiguousarray(w.T)


def timm_tensors(c, fc_norm=False, embed_class=True):
    t = {
        "patch_embed.proj.weight": c["patch"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": c["patch_b"],
    }
    if c["cls"] is not None:
        t["cls_token"] = c["cls"]
    t["pos_embed"] = c["pos"] if embed_class or c["cls"] is None else c["pos"][:, 1:]
    for i, blk in enumerate(c["blocks"]):
        b = f"blocks.{i}."
        d = blk["wo"].shape[-1]
        t[b + "norm1.weight"], t[b + "norm1.bias"] = blk["ln1_s"], blk["ln1_b"]
        qkv = np.concatenate([blk[f"w{s}"].reshape(d, d) for s in "qkv"], axis=1)
        t[b + "attn.qkv.weight"] = _torch(qkv)
        t[b + "attn.qkv.bias"] = np.concatenate([blk[f"b{s}"].reshape(d) for s in "qkv"])
        t[b + "attn.proj.weight"], t[b + "attn.proj.bias"] = (
            _torch(blk["wo"].reshape(d, d)),
            blk["bo"],
        )
        t[b + "norm2.weight"], t[b + "norm2.bias"] = blk["ln2_s"], blk["ln2_b"]
        t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"] = _torch(blk["w1"]), blk["b1"]
        t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"] = _torch(blk["w2"]), blk["b2"]
    norm = "fc_norm" if fc_norm else "norm"
    t[f"{norm}.weight"], t[f"{norm}.bias"] = c["norm_s"], c["norm_b"]
    t["head.weight"], t["head.bias"] = _torch(c["head_w"]), c["head_b"]
    return t


def hf_tensors(c, prefix="vit."):
    e = prefix + "embeddings."
    t = {
        e + "patch_embeddings.projection.weight": c["patch"].transpose(3, 2, 0, 1),
        e + "patch_embeddings.projection.bias": c["patch_b"],
        e + "cls_token": c["cls"],
        e + "position_embeddings": c["pos"],
    }
    for i, blk in enumerate(c["blocks"]):
        b = f"{prefix}encoder.layer.{i}."
        d = blk["wo"].shape[-1]
        t[b + "layernorm_before.weight"], t[b + "layernorm_before.bias"] = (
            blk["ln1_s"],
            blk["ln1_b"],
        )
        for n, s in zip(("query", "key", "value"), "qkv", strict=True):
            t[f"{b}attention.attention.{n}.weight"] = _torch(blk[f"w{s}"].reshape(d, d))
            t[f"{b}attention.attention.{n}.bias"] = blk[f"b{s}"].reshape(d)
        t[b + "attention.output.dense.weight"] = _torch(blk["wo"].reshape(d, d))
        t[b + "attention.output.dense.bias"] = blk["bo"]
        t[b + "layernorm_after.weight"], t[b + "layernorm_after.bias"] = blk["ln2_s"], blk["ln2_b"]
        t[b + "intermediate.dense.weight"], t[b + "intermediate.dense.bias"] = (
            _torch(blk["w1"]),
            blk["b1"],
        )
        t[b + "output.dense.weight"], t[b + "output.dense.bias"] = _torch(blk["w2"]), blk["b2"]
    t[prefix + "layernorm.weight"], t[prefix + "layernorm.bias"] = c["norm_s"], c["norm_b"]
    t["classifier.weight"], t["classifier.bias"] = _torch(c["head_w"]), c["head_b"]
    d = c["norm_s"].shape[0]
    t[prefix + "pooler.dense.weight"] = np.zeros((d, d), np.float32)  # ViTModel's; ignored
    return t


def images(n, size, seed=0):
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).normal(size=(n, h, w, C_IN)).astype(np.float32)
