"""CIFAR ResNets (He et al. 2016, Sec. 4.2) and a Wide ResNet for DP training (De et al. 2022).

`CifarResNet` is ResNet-20/32/44/56 with "option A" (parameter-free) shortcuts, laid out like the
PyTorch models whose CIFAR-10 weights are in the data directory (see `dpft.models.pretrained`).
Submodule names mirror the PyTorch tensor names, with ``layer{s}.{i}`` written ``layer{s}_{i}``
because flax paths use '/' and the trainer joins them with '/'::

    conv1/kernel                          <- conv1.weight
    bn1/{scale,bias}  (+ batch_stats bn1/{mean,var})  <- bn1.{weight,bias,running_mean,running_var}
    layer1_0/conv1/kernel ... layer3_{n-1}/bn2/bias   <- layer1.0.conv1.weight ...
    linear/{kernel,bias}                  <- linear.{weight,bias}

Two normalizations (``norm``):

- ``'frozen_bn'``: BatchNorm always in inference mode (``use_running_average=True``). The
  statistics live in the 'batch_stats' collection and are never recomputed, so no example's
  gradient depends on another example of the batch (what DP-SGD needs); scale and bias are
  ordinary parameters. Use with pretrained weights.
- ``'group_norm'``: GroupNorm (``groups`` groups), for training from scratch with DP; there is no
  'batch_stats' collection. The parameter names stay ``bn1``/``bn2`` so the paths are the same.

`WideResNet` is the WRN-16-4 of De et al. (2022, "Unlocking high-accuracy differentially private
image classification through scale"): pre-activation blocks, GroupNorm with 16 groups and
weight-standardized convolutions.

Every model has a ``conv`` attribute choosing the convolution implementation (see
`dpft.models.conv.conv_impl`): 'auto' (the default: on the CPU backend im2col patches + matmul
for 1x1 kernels and single-channel inputs and XLA's convolution with a batch-chunked kernel
gradient elsewhere; XLA's convolution on GPU/TPU), 'xla' or 'im2col'. It changes neither the
parameters nor the function computed.

Every model has a ``features`` method (pooled features before the head) and a head named
``linear``: ``model.apply(v, x)`` -> logits, ``model.apply(v, x, method=model.features)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpft.models.conv import conv_impl

Array = jax.Array

#: Blocks per stage for each CIFAR ResNet depth (depth = 6 n + 2).
BLOCKS_PER_STAGE: dict[int, int] = {20: 3, 32: 5, 44: 7, 56: 9}
NORMS: tuple[str, ...] = ("frozen_bn", "group_norm")
BN_EPSILON = 1e-5  # PyTorch's default, used by the pretrained weights
# torch ``padding=1``: one pixel on every side, also for stride 2 ('SAME' would pad 0 before, 1
# after an even input and shift the sampling grid by one pixel).
PAD1 = ((1, 1), (1, 1))


def _check_norm(norm: str, groups: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if norm == "group_norm" and (groups < 1 or 16 % groups):
        raise ValueError(f"groups must divide 16 (the narrowest stage), got {groups}")


def make_norm(norm: str, groups: int, name: str, dtype: Any = jnp.float32) -> nn.Module:
    """A frozen (inference-mode) BatchNorm or a GroupNorm named ``name``."""
    if norm == "frozen_bn":
        return nn.BatchNorm(
            use_running_average=True,
            momentum=0.9,
            epsilon=BN_EPSILON,
            dtype=dtype,
            name=name,
        )
    if norm == "group_norm":
        return nn.GroupNorm(num_groups=groups, epsilon=BN_EPSILON, dtype=dtype, name=name)
    raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")


def option_a_shortcut(x: Array, channels: int, stride: int) -> Array:
    """Parameter-free shortcut: subsample by ``stride``, zero-pad channels on both sides."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = channels - x.shape[-1]
    if extra:
        if extra < 0 or extra % 2:
            raise ValueError(f"option-A shortcut cannot map {x.shape[-1]} to {channels} channels")
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra // 2)))
    return x


class BasicBlock(nn.Module):
    """conv1 3x3 (stride) - bn1 - relu - conv2 3x3 - bn2, plus shortcut, then relu."""

    channels: int
    stride: int = 1
    norm: str = "frozen_bn"
    groups: int = 16
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:

        def conv(name: str, stride: int) -> nn.Conv:
            return nn.Conv(
                self.channels,
                (3, 3),
                strides=(stride, stride),
                padding=PAD1,
                use_bias=False,
                dtype=self.dtype,
                name=name,
                conv_general_dilated=conv_impl(self.conv),
            )

        out = conv("conv1", self.stride)(x)
        out = nn.relu(make_norm(self.norm, self.groups, "bn1", self.dtype)(out))
        out = conv("conv2", 1)(out)
        out = make_norm(self.norm, self.groups, "bn2", self.dtype)(out)
        if self.stride != 1 or x.shape[-1] != self.channels:
            # out // 4 on each side when the width doubles: 16 -> 32 -> 64 (He et al., option A)
            x = option_a_shortcut(x, self.channels, self.stride)
        return nn.relu(out + x)


class CifarResNet(nn.Module):
    """ResNet-20/32/44/56 for 32x32 images, option-A shortcuts (He et al. 2016).

    Attributes:
      depth: 20, 32, 44 or 56 (3, 5, 7 or 9 blocks per stage).
      num_classes: width of the head ``linear``.
      norm: 'frozen_bn' (BatchNorm in inference mode, stats in 'batch_stats') or 'group_norm'.
      groups: GroupNorm groups (must divide 16); ignored for 'frozen_bn'.
      dtype: computation dtype (parameters are always float32).
      conv: convolution implementation, 'auto', 'xla' or 'im2col' (`conv.conv_impl`).

    Submodules: ``conv1``, ``bn1``, ``layer{1,2,3}_{i}`` (each with ``conv1``, ``bn1``,
    ``conv2``, ``bn2``) and ``linear``.
    """

    depth: int = 20
    num_classes: int = 10
    norm: str = "frozen_bn"
    groups: int = 16
    dtype: Any = jnp.float32
    conv: str = "auto"

    def __post_init__(self) -> None:
        if self.depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {self.depth}")
        _check_norm(self.norm, self.groups)
        conv_impl(self.conv)
        super().__post_init__()

    def setup(self) -> None:
        n = BLOCKS_PER_STAGE[self.depth]
        kw = {"norm": self.norm, "groups": self.groups, "dtype": self.dtype, "conv": self.conv}
        self.conv1 = nn.Conv(
            16,
            (3, 3),
            padding=PAD1,
            use_bias=False,
            dtype=self.dtype,
            conv_general_dilated=conv_impl(self.conv),
        )
        self.bn1 = make_norm(self.norm, self.groups, "bn1", self.dtype)
        # Lists assigned in setup are named attr_0, attr_1, ...: layer1_0, layer1_1, ...
        self.layer1 = [BasicBlock(16, 1, **kw) for _ in range(n)]
        self.layer2 = [BasicBlock(32, 2 if i == 0 else 1, **kw) for i in range(n)]
        self.layer3 = [BasicBlock(64, 2 if i == 0 else 1, **kw) for i in range(n)]
        self.linear = nn.Dense(self.num_classes, dtype=self.dtype)

    def features(self, x: Array) -> Array:
        """Globally average-pooled 64-d features ``[N, 64]`` (the input of ``linear``)."""
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(self.bn1(self.conv1(x)))
        for block in (*self.layer1, *self.layer2, *self.layer3):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: Array) -> Array:
        """Logits ``[N, num_classes]`` for NHWC images ``[N, 32, 32, 3]``."""
        return self.linear(self.features(x))


class WSConv(nn.Module):
    """A convolution whose kernel is standardized per output channel before use.

    ``w_hat = (w - mean(w)) / sqrt(var(w) + eps)`` over (kh, kw, in) for each output channel
    (Qiao et al. 2019), as in the WRNs of De et al. (2022). The stored kernel has the flax layout
    ``[kh, kw, in, out]`` under the name ``kernel``.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Any = PAD1
    use_bias: bool = True
    eps: float = 1e-4
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
        kernel = (kernel - mean) * jax.lax.rsqrt(var + self.eps)
        y = conv_impl(self.conv)(
            jnp.asarray(x, self.dtype),
            jnp.asarray(kernel, self.dtype),
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + jnp.asarray(bias, self.dtype)
        return y


class WideBlock(nn.Module):
    """Pre-activation wide block: norm1-relu-conv1 (stride)-norm2-relu-conv2, plus shortcut.

    The shortcut is a 1x1 weight-standardized conv of the pre-activated input when the shape
    changes, the identity otherwise.
    """

    channels: int
    stride: int = 1
    groups: int = 16
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        strides = (self.stride, self.stride)
        kw = {"dtype": self.dtype, "conv": self.conv}
        h = nn.relu(nn.GroupNorm(self.groups, dtype=self.dtype, name="norm1")(x))
        out = WSConv(self.channels, strides=strides, name="conv1", **kw)(h)
        out = nn.relu(nn.GroupNorm(self.groups, dtype=self.dtype, name="norm2")(out))
        out = WSConv(self.channels, name="conv2", **kw)(out)
        if self.stride != 1 or x.shape[-1] != self.channels:
            proj = WSConv(self.channels, (1, 1), strides, "VALID", name="shortcut", **kw)
            x = proj(h)
        return x + out


class WideResNet(nn.Module):
    """WRN-depth-width with GroupNorm and weight standardization (De et al. 2022).

    Attributes:
      depth: 6 n + 4 (16 for WRN-16-4: n = 2 blocks per stage).
      width: channel multiplier; stages have 16 w, 32 w, 64 w channels.
      num_classes: width of the head ``linear``.
      groups: GroupNorm groups (16 in De et al.).
      dtype: computation dtype (parameters are always float32).
      conv: convolution implementation, 'auto', 'xla' or 'im2col' (`conv.conv_impl`).

    Submodules: ``conv1`` (stem, 16 channels), ``layer{1,2,3}_{i}`` (``norm1``, ``conv1``,
    ``norm2``, ``conv2`` and, where the shape changes, ``shortcut``), ``norm`` (final GroupNorm)
    and ``linear``.
    """

    depth: int = 16
    width: int = 4
    num_classes: int = 10
    groups: int = 16
    dtype: Any = jnp.float32
    conv: str = "auto"

    def __post_init__(self) -> None:
        conv_impl(self.conv)
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6 n + 4 with n >= 1, got {self.depth}")
        if self.width < 1 or (16 * self.width) % self.groups:
            raise ValueError(f"groups={self.groups} must divide 16 * width = {16 * self.width}")
        super().__post_init__()

    def setup(self) -> None:
        n = (self.depth - 4) // 6
        kw = {"groups": self.groups, "dtype": self.dtype, "conv": self.conv}
        w = self.width
        self.conv1 = WSConv(16, dtype=self.dtype, conv=self.conv)
        self.layer1 = [WideBlock(16 * w, 1, **kw) for _ in range(n)]
        self.layer2 = [WideBlock(32 * w, 2 if i == 0 else 1, **kw) for i in range(n)]
        self.layer3 = [WideBlock(64 * w, 2 if i == 0 else 1, **kw) for i in range(n)]
        self.norm = nn.GroupNorm(self.groups, dtype=self.dtype)
        self.linear = nn.Dense(self.num_classes, dtype=self.dtype)

    def features(self, x: Array) -> Array:
        """Globally average-pooled features ``[N, 64 * width]`` (the input of ``linear``)."""
        x = self.conv1(jnp.asarray(x, self.dtype))
        for block in (*self.layer1, *self.layer2, *self.layer3):
            x = block(x)
        return jnp.mean(nn.relu(self.norm(x)), axis=(1, 2))

    def __call__(self, x: Array) -> Array:
        """Logits ``[N, num_classes]`` for NHWC images."""
        return self.linear(self.features(x))


def resnet(depth: int = 20, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """`CifarResNet` of the given depth (20, 32, 44, 56); kwargs: norm, groups, dtype."""
    return CifarResNet(depth=depth, num_classes=num_classes, **kwargs)


def resnet20(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 0.27 M parameters)."""
    return resnet(20, num_classes, **kwargs)


def resnet32(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-32 (5 blocks per stage, 0.46 M parameters)."""
    return resnet(32, num_classes, **kwargs)


def resnet44(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-44 (7 blocks per stage, 0.66 M parameters)."""
    return resnet(44, num_classes, **kwargs)


def resnet56(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, 0.85 M parameters)."""
    return resnet(56, num_classes, **kwargs)


def wrn16_4(num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-16-4 with GroupNorm(16) and weight-standardized convs (De et al. 2022)."""
    return WideResNet(depth=16, width=4, num_classes=num_classes, **kwargs)
