"""ImageNet-style ResNet-18/34/50 (He et al. 2016, Table 1) for DP training, in flax linen.

The layout of torchvision's ``resnet18/34/50``: a 7x7 stride-2 stem convolution and a 3x3
stride-2 max-pool, four stages of basic (18, 34) or bottleneck (50) blocks with 64, 128, 256 and
512 base channels, projection shortcuts (1x1 convolution + norm) where the shape changes, global
average pooling and the head ``linear``. Submodule names follow torchvision's tensor names with
``layer{s}.{i}`` written ``layer{s}_{i}`` and ``downsample.{0,1}`` written
``downsample_conv`` / ``downsample_bn``, as in `dpft.models.resnet`.

Normalization (``norm``) as in `dpft.models.resnet`: ``'group_norm'`` (the default; per-example,
so DP-SGD's per-example gradients are well defined) or ``'frozen_bn'`` (BatchNorm in inference
mode, for pretrained weights). ``stem='cifar'`` replaces the stem by one 3x3 stride-1
convolution without max-pool, for small (32x32, 64x64) images.

No pretrained ImageNet weights ship with dpft; `dpft.models.pretrained.load` reads torchvision's
(or any state dict in its layout, e.g. Places365 weights) from a safetensors file you give
(``config.model.pretrained=resnet18`` and ``config.model.pretrained_path=FILE``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpft.models.conv import conv_impl, torch_padded_conv
from dpft.models.pool import max_pool
from dpft.models.resnet import NORMS, make_norm

Array = jax.Array

#: depth -> (block kind, blocks per stage)
LAYOUTS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
STEMS = ("imagenet", "cifar")


class ImageNetBlock(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion) residual block."""

    channels: int
    stride: int = 1
    bottleneck: bool = False
    norm: str = "group_norm"
    groups: int = 32
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def norm(name):
            return make_norm(self.norm, self.groups, name, self.dtype)

        def conv(features, kernel, stride, name):
            return torch_padded_conv(features, kernel, stride, self.dtype, self.conv, name)

        c = self.channels
        if self.bottleneck:  # torchvision v1.5: the stride is on the 3x3 convolution
            out = nn.relu(norm("bn1")(conv(c, 1, 1, "conv1")(x)))
            out = nn.relu(norm("bn2")(conv(c, 3, self.stride, "conv2")(out)))
            out = norm("bn3")(conv(4 * c, 1, 1, "conv3")(out))
        else:
            out = nn.relu(norm("bn1")(conv(c, 3, self.stride, "conv1")(x)))
            out = norm("bn2")(conv(c, 3, 1, "conv2")(out))
        if self.stride != 1 or x.shape[-1] != out.shape[-1]:
            x = norm("downsample_bn")(conv(out.shape[-1], 1, self.stride, "downsample_conv")(x))
        return nn.relu(out + x)


class ImageNetResNet(nn.Module):
    """ResNet-18/34/50 for ImageNet-style NHWC images (any size >= 32 with the default stem).

    Attributes:
      depth: 18, 34 or 50.
      num_classes: width of the head ``linear``.
      norm: 'group_norm' (default) or 'frozen_bn'.
      groups: GroupNorm groups (must divide 64, the narrowest width).
      stem: 'imagenet' (7x7/2 convolution + 3x3/2 max-pool) or 'cifar' (3x3/1 convolution).
      dtype: computation dtype (parameters are always float32).
      conv: convolution implementation, 'auto', 'xla' or 'im2col' (`conv.conv_impl`).
    """

    depth: int = 18
    num_classes: int = 1000
    norm: str = "group_norm"
    groups: int = 32
    stem: str = "imagenet"
    dtype: Any = jnp.float32
    conv: str = "auto"

    def __post_init__(self) -> None:
        if self.depth not in LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(LAYOUTS)}, got {self.depth}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {list(STEMS)}, got {self.stem!r}")
        if self.norm == "group_norm" and (self.groups < 1 or 64 % self.groups):
            raise ValueError(f"groups must divide 64 (the narrowest width), got {self.groups}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {self.norm!r}")
        conv_impl(self.conv)
        super().__post_init__()

    def setup(self) -> None:
        self.linear = nn.Dense(self.num_classes, dtype=self.dtype)

    @nn.compact
    def features(self, x: Array) -> Array:
        """Globally average-pooled features ``[N, 512]`` (``[N, 2048]`` for ResNet-50)."""
        kind, blocks = LAYOUTS[self.depth]
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = torch_padded_conv(64, 7, 2, self.dtype, self.conv, "conv1")(x)
            x = nn.relu(make_norm(self.norm, self.groups, "bn1", self.dtype)(x))
            x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = torch_padded_conv(64, 3, 1, self.dtype, self.conv, "conv1")(x)
            x = nn.relu(make_norm(self.norm, self.groups, "bn1", self.dtype)(x))
        for s, n in enumerate(blocks):
            for i in range(n):
                x = ImageNetBlock(
                    64 * 2**s,
                    stride=2 if (i == 0 and s > 0) else 1,
                    bottleneck=kind == "bottleneck",
                    norm=self.norm,
                    groups=self.groups,
                    dtype=self.dtype,
                    conv=self.conv,
                    name=f"layer{s + 1}_{i}",
                )(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: Array) -> Array:
        """Logits ``[N, num_classes]``."""
        return self.linear(self.features(x))


def resnet18(num_classes: int = 1000, **kwargs: Any) -> ImageNetResNet:
    return ImageNetResNet(depth=18, num_classes=num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs: Any) -> ImageNetResNet:
    return ImageNetResNet(depth=34, num_classes=num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs: Any) -> ImageNetResNet:
    return ImageNetResNet(depth=50, num_classes=num_classes, **kwargs)
