"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout, in flax linen, NHWC.

The architecture of torchvision's ``mobilenet_v2`` (width 1.0):

* ``features.0``: 3x3 stride-2 convolution 3 -> 32, norm, ReLU6.
* ``features.1`` .. ``features.17``: inverted residual blocks from the settings `SETTINGS`
  (t, c, n, s): n blocks of c output channels, the first with stride s. A block with expansion
  t > 1 is a 1x1 convolution to ``t * in`` channels, norm, ReLU6; a 3x3 depthwise convolution
  (``feature_group_count`` = channels) with the stride, norm, ReLU6; a 1x1 projection and norm
  (no activation). The t = 1 block has no expansion convolution. The input is added back when
  the stride is 1 and the block keeps the number of channels.
* ``features.18``: 1x1 convolution 320 -> 1280, norm, ReLU6.
* global average pooling -> 1280-d features (`MobileNetV2.features`), head ``linear``.

Every 3x3 convolution pads one pixel on every side (torch's ``padding=1``; 'SAME' would shift the
sampling grid of the stride-2 ones). There is no dropout (torchvision's 0.2 before the head acts
only in training and is left out).

Submodule names are torchvision's tensor names with '.' written '_' (``features_0_0``,
``features_3/conv_1_0``, ``features_18_1``), except the head: ``linear`` is ``classifier.1``.
`dpft.models.pretrained.load('mobilenet_v2')` reads torchvision's state dict into this tree.

Normalization (``norm``): ``'frozen_bn'`` (the default: BatchNorm in inference mode, as the
pretrained weights need; their BatchNorm is folded into the convolutions) or ``'group_norm'``
(``groups`` groups; every width is a multiple of 8).

Convolutions use ``conv`` (`dpft.models.conv.conv_impl`); the depthwise ones, which im2col does not
support, use XLA's convolution when ``conv='im2col'``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpft.models.conv import conv_impl, torch_padded_conv
from dpft.models.resnet import NORMS, make_norm

Array = jax.Array

#: (expansion t, output channels c, blocks n, stride of the first block s) per stage.
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
FEATURE_CHANNELS = 1280


def relu6(x: Array) -> Array:
    return jnp.clip(x, 0, 6)


class _Layers:
    """Builds the convolutions and norms of one module with its settings."""

    def __init__(self, module: nn.Module):
        self.m = module

    def conv(self, features: int, kernel: int, stride: int, groups: int, name: str) -> nn.Conv:
        m = self.m
        return torch_padded_conv(features, kernel, stride, m.dtype, m.conv, name, groups)

    def norm(self, name: str) -> nn.Module:
        return make_norm(self.m.norm, self.m.groups, name, self.m.dtype)


class InvertedResidual(nn.Module):
    """[1x1 expansion, norm, ReLU6,] 3x3 depthwise, norm, ReLU6, 1x1 projection, norm (+ input)."""

    channels: int
    stride: int = 1
    expansion: int = 6
    norm: str = "frozen_bn"
    groups: int = 8
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        layers = _Layers(self)
        cin = x.shape[-1]
        hidden = cin * self.expansion
        out = x
        i = 0  # index of the next torchvision ``conv.{i}`` entry
        if self.expansion != 1:
            out = layers.conv(hidden, 1, 1, 1, "conv_0_0")(out)
            out = relu6(layers.norm("conv_0_1")(out))
            i = 1
        out = layers.conv(hidden, 3, self.stride, hidden, f"conv_{i}_0")(out)
        out = relu6(layers.norm(f"conv_{i}_1")(out))
        out = layers.conv(self.channels, 1, 1, 1, f"conv_{i + 1}")(out)
        out = layers.norm(f"conv_{i + 2}")(out)
        if self.stride == 1 and cin == self.channels:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 for NHWC images of any size >= 32 (global average pooling).

    Attributes:
      num_classes: width of the head ``linear``.
      norm: 'frozen_bn' (default, for the pretrained weights) or 'group_norm'.
      groups: GroupNorm groups (must divide 8, the greatest common width divisor).
      dtype: computation dtype (parameters are always float32).
      conv: convolution implementation, 'auto', 'xla' or 'im2col' (`conv.conv_impl`).
    """

    num_classes: int = 1000
    norm: str = "frozen_bn"
    groups: int = 8
    dtype: Any = jnp.float32
    conv: str = "auto"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {self.norm!r}")
        if self.norm == "group_norm" and (self.groups < 1 or 8 % self.groups):
            raise ValueError(
                f"groups must divide 8 (every width is a multiple of 8), got {self.groups}"
            )
        conv_impl(self.conv)
        super().__post_init__()

    def setup(self) -> None:
        self.linear = nn.Dense(self.num_classes, dtype=self.dtype)

    @nn.compact
    def features(self, x: Array) -> Array:
        """Globally average-pooled features ``[N, 1280]``."""
        layers = _Layers(self)
        x = jnp.asarray(x, self.dtype)
        x = layers.conv(STEM_CHANNELS, 3, 2, 1, "features_0_0")(x)
        x = relu6(layers.norm("features_0_1")(x))
        index = 1
        for t, c, n, s in SETTINGS:
            for i in range(n):
                x = InvertedResidual(
                    c,
                    stride=s if i == 0 else 1,
                    expansion=t,
                    norm=self.norm,
                    groups=self.groups,
                    dtype=self.dtype,
                    conv=self.conv,
                    name=f"features_{index}",
                )(x)
                index += 1
        x = layers.conv(FEATURE_CHANNELS, 1, 1, 1, f"features_{index}_0")(x)
        x = relu6(layers.norm(f"features_{index}_1")(x))
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: Array) -> Array:
        """Logits ``[N, num_classes]``."""
        return self.linear(self.features(x))


def mobilenet_v2(num_classes: int = 1000, **kwargs: Any) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, **kwargs)
