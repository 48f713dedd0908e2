"""The ViT of the bench's PyTorch side (`bench.peers_torch`): timm's model, or its twin.

``vit_ti16`` (and ``vit_s16`` / ``vit_b16``): timm's own ``vit_tiny_patch16_224``
(``_small_``, ``_base_``), ``timm.create_model(..., pretrained=False, num_classes=...,
img_size=...)`` with ``img_size`` the images' side, when timm imports (`timm_vit`); otherwise,
with a printed line, `ViTTwin`, a layer-identical rebuild of it (a 16 x 16 stride-16 Conv2d
patch embedding, class token and position embedding, pre-norm blocks: LayerNorm eps 1e-6,
Linear qkv / proj / fc1 / fc2, erf GELU; final LayerNorm, class-token pooling, Linear head).
dpft's twin runs with ``gelu='exact'``; `describe_model` says which of the two was built and
``build_steps`` reports it (``info['torch_model']``).

Opacus and timm's ViT: timm keeps the class token and position embedding as parameters of
the ``VisionTransformer`` itself. Opacus has no grad sampler for a module with parameters of
its own, so it falls back to functorch for that module, and, as it then does not look into
its children, for the WHOLE model: every per-example gradient comes from a vmap of the full
forward and backward, and ``grad_sample_mode='ghost'`` computes no ghost norm at all.
`timm_vit` therefore moves those two parameters (the same tensors, timm's initialisation)
into a module of their own, `TokenEmbed`, which has its own grad sampler, and routes timm's
``_pos_embed`` to it; every other layer and timm's ``forward`` are untouched. Then every
parameter is trained and clipped: Linear layers get Opacus ghost norms, the Conv2d, the
LayerNorms and `TokenEmbed` per-example gradients from grad samplers.
``ModuleValidator.validate`` finds nothing to fix in timm's ViT (no BatchNorm, no buffers).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

#: dpft's ViT registry name -> (width, depth, heads), as in `dpft.models.vit.SIZES`.
VIT_SIZES = {"vit_ti16": (192, 12, 3), "vit_s16": (384, 12, 6), "vit_b16": (768, 12, 12)}
VIT_PATCH = 16
VIT_LN_EPS = 1e-6


#: dpft's ViT registry name -> timm's model name (the architecture `ViTTwin` rebuilds).
TIMM_NAMES = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
}


def vit_param_count(image: int, num_classes: int, width: int, depth: int) -> int:
    """Trainable parameters of a ViT of this shape (dpft's, timm's and `ViTTwin` alike)."""
    tokens = (image // VIT_PATCH) ** 2 + 1
    patch = 3 * VIT_PATCH * VIT_PATCH * width + width
    block = 12 * width * width + 13 * width  # 2 LayerNorms, qkv, proj, fc1, fc2
    return patch + width + tokens * width + depth * block + 2 * width + (width + 1) * num_classes


def vit_model(name: str, num_classes: int, image: int) -> nn.Module:
    """timm's ViT (`timm_vit`) when timm imports, else `ViTTwin` with a printed line saying so
    (`describe_model` tells which one a model is)."""
    try:
        import timm  # noqa: F401
    except Exception as e:  # ImportError, or a torchvision built against another torch
        print(
            f"bench.peers_torch: timm not importable ({type(e).__name__}: {str(e)[:120]}); "
            f"the PyTorch {name} rows use ViTTwin, a layer-identical rebuild of "
            f"timm's {TIMM_NAMES[name]}",
            flush=True,
        )
        return ViTTwin(image, num_classes, *VIT_SIZES[name])
    return timm_vit(name, num_classes, image)


def _timm_pos_embed(self, x):
    """timm's ``VisionTransformer._pos_embed`` for its class-token models, by `TokenEmbed`."""
    return self.pos_drop(self.tokens(x))


def timm_vit(name: str, num_classes: int, image: int) -> nn.Module:
    """timm's ``TIMM_NAMES[name]`` (random initialisation) for ``image`` x ``image`` inputs, with
    its class token and position embedding moved into a `TokenEmbed` submodule ``tokens``.

    The moved parameters are timm's own tensors; timm's ``_pos_embed`` (concatenate the class
    token, add the position embedding, ``pos_drop``) is replaced on this instance by the same
    computation through ``tokens``. Opacus then grad-samples them with `TokenEmbed`'s sampler
    and every other layer with its own (see the module docstring). Raises ``AssertionError``
    when timm's configuration is not the one this assumes, or its parameter count differs from
    dpft's.
    """
    import timm

    width, depth, _ = VIT_SIZES[name]
    vit = timm.create_model(
        TIMM_NAMES[name], pretrained=False, num_classes=num_classes, img_size=image
    )
    assert vit.global_pool == "token" and vit.num_prefix_tokens == 1, "class-token pooling"
    assert not vit.no_embed_class and not vit.dynamic_img_size and vit.reg_token is None
    assert vit.pos_embed.shape == (1, (image // VIT_PATCH) ** 2 + 1, width)
    expected = vit_param_count(image, num_classes, width, depth)
    assert count_params(vit) == expected, (count_params(vit), expected)
    tokens = TokenEmbed(vit.pos_embed.shape[1], width)
    tokens.cls, tokens.pos = vit.cls_token, vit.pos_embed
    del vit.cls_token, vit.pos_embed
    vit.tokens = tokens
    vit._pos_embed = types.MethodType(_timm_pos_embed, vit)
    vit.timm_name = TIMM_NAMES[name]
    assert count_params(vit) == expected
    return vit


class TokenEmbed(nn.Module):
    """``[N, T-1, D]`` patch tokens -> ``[N, T, D]``: the class token first, plus ``pos``."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)

    def forward(self, x):
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos


class ViTBlock(nn.Module):
    """Pre-norm Transformer block: ``x + proj(attention(norm1(x)))``, ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=VIT_LN_EPS)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=VIT_LN_EPS)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, T, head_dim]
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTTwin(nn.Module):
    """ViT with class-token pooling for NCHW square images, like `dpft.models.vit.ViT`."""

    def __init__(self, image: int, num_classes: int, width: int, depth: int, heads: int):
        super().__init__()
        if image % VIT_PATCH:
            raise ValueError(f"image side {image} is not a multiple of the patch {VIT_PATCH}")
        self.embedding = nn.Conv2d(3, width, VIT_PATCH, VIT_PATCH)
        self.tokens = TokenEmbed((image // VIT_PATCH) ** 2 + 1, width)
        self.blocks = nn.Sequential(*(ViTBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=VIT_LN_EPS)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.tokens(self.embedding(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(self.blocks(x))[:, 0])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
