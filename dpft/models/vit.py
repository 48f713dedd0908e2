"""Vision Transformer (Dosovitskiy et al. 2021) in flax linen, NHWC, written for ghost norms.

The architecture of big_vision's ``vit.py`` and timm's ``VisionTransformer`` (pre-norm blocks):

* ``embedding``: a ``patch_size`` x ``patch_size`` convolution with stride ``patch_size``
  ('VALID') to ``width`` channels; the ``h x w`` grid is flattened to ``h * w`` tokens.
* ``pool_type='tok'``: a learned class token ``cls`` ``[1, 1, width]`` is put first;
  ``'gap'``: no class token.
* ``pos_embedding`` ``[1, T, width]`` is added to the T tokens (its first row belongs to the class
  token with ``'tok'``). Its length fixes the image size the variables fit
  (`dpft.models.vit_import` interpolates it to another size).
* ``depth`` blocks ``encoderblock_{i}``: ``x + out(attention(norm1(x)))`` then
  ``x + mlp2(gelu(mlp1(norm2(x))))``. Attention is written with plain ``nn.Dense`` layers over the
  token axis: ``qkv`` (width -> 3 width: queries, keys and values, each split into ``num_heads``
  heads of ``width / num_heads`` by a reshape), softmax of ``q k^T / sqrt(head_dim)`` per head,
  and the output projection ``out``.
* ``encoder_norm``: the final LayerNorm, on every token before pooling, or on the pooled vector
  with ``fc_norm=True`` (timm's ``fc_norm`` of its average-pooled models).
* pooling: the class token (``'tok'``) or the mean of all tokens (``'gap'``) -> ``[N, width]``
  (`ViT.features`), then the head ``linear``.

GELU is ``'tanh'`` (the tanh approximation, flax's ``nn.gelu`` default, as in big_vision and
the original ViT / AugReg code) or ``'exact'`` (erf, as in timm and Hugging Face). LayerNorm
epsilon is 1e-6 in big_vision and timm (``layernorm_eps``).

Ghost norms (`dpft.privacy.ghost.GhostNorms`): every Dense (``qkv``, ``out``, ``mlp1``,
``mlp2``, ``linear``) runs on ``[T, d]`` rows per example and the patch embedding is a strided
convolution, so all their kernels and biases get ghost / mixed norms; the LayerNorm scales and
biases, ``cls`` and ``pos_embedding`` are small leaves with exact per-example gradients.

There is no dropout or stochastic depth (DP fine-tuning runs them off); ``num_classes=0`` gives a
zero-width head (a checkpoint without a classifier; replace it before training).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

POOL_TYPES: tuple[str, ...] = ("tok", "gap")
GELUS: tuple[str, ...] = ("tanh", "exact")
#: name -> (width, depth, num_heads); the MLP is 4 x width, the patch 16 pixels.
SIZES: dict[str, tuple[int, int, int]] = {
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
}
#: Heads of the standard widths (Ti, S, B, L and H/14), for checkpoints that do not store them.
HEADS_BY_WIDTH: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

_xavier = nn.initializers.xavier_uniform()


class EncoderBlock(nn.Module):
    """One pre-norm Transformer block on ``[N, T, width]`` tokens."""

    mlp_dim: int
    num_heads: int
    gelu: str = "tanh"
    layernorm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, t, d = x.shape
        heads = self.num_heads
        hd = d // heads

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name=name)

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(features, dtype=self.dtype, kernel_init=_xavier, name=name)

        qkv = dense(3 * d, "qkv")(norm("norm1")(x)).reshape(n, t, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, heads, hd]
        logits = jnp.einsum("nqhc,nkhc->nhqk", q / jnp.sqrt(hd).astype(q.dtype), k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attended = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, t, d)
        x = x + dense(d, "out")(attended)
        y = dense(self.mlp_dim, "mlp1")(norm("norm2")(x))
        y = nn.gelu(y, approximate=self.gelu == "tanh")
        return x + dense(d, "mlp2")(y)


class ViT(nn.Module):
    """Vision Transformer for NHWC images whose sides are multiples of ``patch_size``.

    Attributes:
      num_classes: width of the head ``linear`` (0: an empty head, logits ``[N, 0]``).
      patch_size: side of the square patches (pixels).
      width: token dimension D.
      depth: number of encoder blocks.
      mlp_dim: hidden width of the MLPs (4 D in the standard sizes).
      num_heads: attention heads (must divide ``width``).
      pool_type: 'tok' (class token) or 'gap' (mean of the tokens, no class token).
      gelu: 'tanh' (approximate, big_vision / AugReg) or 'exact' (erf, timm / Hugging Face).
      layernorm_eps: LayerNorm epsilon (1e-6 in big_vision and timm).
      fc_norm: apply ``encoder_norm`` after pooling instead of before (timm's ``fc_norm``;
        'gap' only).
      dtype: computation dtype (parameters are always float32; softmax in float32).
    """

    num_classes: int = 1000
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    pool_type: str = "tok"
    gelu: str = "tanh"
    layernorm_eps: float = 1e-6
    fc_norm: bool = False
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {list(POOL_TYPES)}, got {self.pool_type!r}")
        if self.gelu not in GELUS:
            raise ValueError(f"gelu must be one of {list(GELUS)}, got {self.gelu!r}")
        if self.num_heads < 1 or self.width % self.num_heads:
            raise ValueError(
                f"num_heads must divide width: got width {self.width}, num_heads {self.num_heads}"
            )
        if self.fc_norm and self.pool_type != "gap":
            raise ValueError("fc_norm=True (norm after pooling) needs pool_type='gap'")
        super().__post_init__()

    def setup(self) -> None:
        # an empty head cannot use the default (fan-scaled) initialiser
        init = nn.initializers.zeros if self.num_classes == 0 else nn.linear.default_kernel_init
        self.linear = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init)

    @nn.compact
    def features(self, x: Array) -> Array:
        """The pooled, normalised representation ``[N, width]`` (the head's input)."""
        x = jnp.asarray(x, self.dtype)
        p = self.patch_size
        size = x.shape[1:3]
        if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"ViT needs NHWC images with sides divisible by patch_size {p}, got {x.shape}"
            )
        x = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="embedding"
        )(x)
        n, h, w, d = x.shape
        x = x.reshape(n, h * w, d)
        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, d)), x], axis=1)
        tokens = x.shape[1]
        if self.has_variable("params", "pos_embedding"):
            have = self.get_variable("params", "pos_embedding").shape
            if tuple(have) != (1, tokens, d):
                raise ValueError(
                    f"pos_embedding has shape {list(have)}, but {size[0]}x{size[1]} images "
                    f"({h}x{w} patches of {p}) need [1, {tokens}, {d}]: load the checkpoint "
                    "with image_size= the images' size (dpft.models.vit_import.load)"
                )
        pos = self.param("pos_embedding", nn.initializers.truncated_normal(0.02), (1, tokens, d))
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = EncoderBlock(
                self.mlp_dim,
                self.num_heads,
                self.gelu,
                self.layernorm_eps,
                self.dtype,
                name=f"encoderblock_{i}",
            )(x)
        norm = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="encoder_norm")
        if self.fc_norm:
            return norm(jnp.mean(x, axis=1))
        x = norm(x)
        return x[:, 0] if self.pool_type == "tok" else jnp.mean(x, axis=1)

    def __call__(self, x: Array) -> Array:
        """Logits ``[N, num_classes]``."""
        return self.linear(self.features(x))


def vit(size: str, num_classes: int = 1000, patch_size: int = 16, **kwargs: Any) -> ViT:
    """ViT-Ti/S/B/L (``size`` 'ti', 's', 'b', 'l'; `SIZES`) with a 4 x width MLP."""
    if size not in SIZES:
        raise ValueError(f"ViT size must be one of {list(SIZES)}, got {size!r}")
    width, depth, heads = SIZES[size]
    return ViT(
        num_classes=num_classes,
        patch_size=patch_size,
        width=width,
        depth=depth,
        mlp_dim=4 * width,
        num_heads=heads,
        **kwargs,
    )
