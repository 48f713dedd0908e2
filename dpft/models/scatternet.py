"""ScatterNet heads: a fixed wavelet scattering transform, normalised, then one Dense; and the
same features beside an ImageNet MobileNetV2's pooled features.

Tramer & Boneh (2021, "Differentially private learning needs better features (or much more
data)") train a linear classifier with DP-SGD on the scattering transform of Mallat (2012) /
Oyallon & Mallat (2015): second-order scattering with ``J = 2`` scales and ``L = 8`` angles,
computed by kymatio. The transform has no parameters and depends on no data, so it is a public
feature extractor: computing it costs no privacy and only the head is trained privately.

Layout (NHWC inputs ``[N, H, W, C]``, H and W multiples of ``2**J``)::

    scattering of each channel (kymatio, J, L)      -> [N, C * K, H / 2^J, W / 2^J]
        K = 1 + J L + L^2 J (J - 1) / 2 coefficients per channel (81 for J=2, L=8)
    GroupNorm per example (no affine parameters)    -> same shape
    flatten                                         -> [N, D]  (`features`; D = 3969 on 28x28x1)
    linear  Dense num_classes                       -> [N, num_classes]

Normalisation (``norm``): ``'group_norm'`` normalises each example's coefficients by
``groups`` contiguous channel groups (zero mean, unit variance over a group's channels and
positions, epsilon 1e-5), with no scale or bias: Tramer & Boneh's data-independent choice
(27 groups of 3 of the 81 channels). Being a function of the example alone, it costs no
privacy either and is part of `features`, so a feature cache of `features` holds everything
but the head. ``'none'`` gives the raw coefficients.

Inputs: Tramer & Boneh scatter images in [0, 1] (``config.data.preprocessing='unit'``); an
affine input normalisation only shifts the zeroth-order coefficients, which GroupNorm mostly
removes.

kymatio is imported from its 2D frontend module
(``kymatio.scattering2d.frontend.jax_frontend``), not from ``kymatio.jax``: the latter also
imports the 3D frontend, which needs ``scipy.special.sph_harm``, removed from recent SciPy.
The filter bank is built once per (image size, J, L) and closed over as constants.

`ScatterNetMobileNet` (registry ``scatternet_mobilenet``) concatenates those features with the
1280 pooled features of the ImageNet MobileNetV2 (`dpft.models.pretrained.load`, torchvision's
weights in the data directory, frozen BatchNorm) applied to the images resized to
``image_size`` px (bilinear), grey replicated to RGB and normalised with ImageNet's mean and
std; the MobileNetV2 block is normalised per example (LayerNorm without parameters, so both
blocks have unit scale) and multiplied by ``mobilenet_weight``. The MobileNetV2 weights are
public and fixed: they are closed over as constants, not parameters, so this model too has
only ``linear/kernel`` and ``linear/bias``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("group_norm", "none")
MOBILENET_FEATURES = 1280


@functools.lru_cache(maxsize=8)
def scattering_transform(height: int, width: int, J: int = 2, L: int = 8):
    """kymatio's JAX scattering of ``[..., height, width]`` arrays (filters built once)."""
    from kymatio.scattering2d.frontend.jax_frontend import ScatteringJax2D

    return ScatteringJax2D(J=J, shape=(height, width), L=L).scattering


def num_coefficients(J: int = 2, L: int = 8) -> int:
    """Scattering channels per input channel: order 0, J L of order 1, L^2 J (J - 1) / 2 of 2."""
    return 1 + J * L + L * L * J * (J - 1) // 2


class ScatterNetLinear(nn.Module):
    """Scattering transform (fixed), per-example normalisation, linear head ``linear``.

    Attributes:
      num_classes: width of the head ``linear``.
      J: number of scales (the output is downsampled by ``2**J``).
      L: number of angles.
      norm: ``'group_norm'`` (no affine parameters) or ``'none'``; see the module docstring.
      groups: GroupNorm groups; must divide the number of scattering channels ``C * K``.
      dtype: dtype of the features and the head's computation (parameters are float32).

    ``model.apply(variables, x)`` returns logits; ``model.apply(variables, x,
    method=model.features)`` the flattened normalised coefficients (the only parameters are
    ``linear/kernel`` and ``linear/bias``).
    """

    num_classes: int = 10
    J: int = 2
    L: int = 8
    norm: str = "group_norm"
    groups: int = 27
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"ScatterNetLinear norm must be one of {NORMS}, got {self.norm!r}")
        if self.J < 1 or self.L < 1:
            raise ValueError(f"ScatterNetLinear needs J >= 1 and L >= 1, got {self.J}, {self.L}")
        if self.norm == "group_norm" and (
            self.groups < 1 or num_coefficients(self.J, self.L) % self.groups
        ):
            raise ValueError(
                f"ScatterNetLinear groups={self.groups} must divide the "
                f"{num_coefficients(self.J, self.L)} scattering channels per input channel"
            )
        super().__post_init__()

    def scatter(self, x: jax.Array) -> jax.Array:
        """Raw coefficients ``[N, C * K, H / 2^J, W / 2^J]`` (channel c's block is c*K..)."""
        if x.ndim != 4:
            raise ValueError(f"ScatterNetLinear expects NHWC images [N, H, W, C], got {x.shape}")
        n, h, w, c = x.shape
        step = 2**self.J
        if h % step or w % step:
            raise ValueError(
                f"ScatterNetLinear with J={self.J} needs H and W divisible by {step}, got {h}x{w}"
            )
        fn = scattering_transform(h, w, self.J, self.L)
        s = fn(jnp.moveaxis(jnp.asarray(x, jnp.float32), -1, 1))  # [N, C, K, h', w']
        return s.reshape(n, -1, h // step, w // step)

    def setup(self) -> None:
        self.linear = nn.Dense(
            self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros
        )

    def features(self, x: jax.Array) -> jax.Array:
        """The normalised coefficients, flattened: ``[N, C * K * (H / 2^J) * (W / 2^J)]``."""
        s = self.scatter(x)
        n = s.shape[0]
        if self.norm == "group_norm":
            s = group_norm(s, self.groups * x.shape[-1])
        return jnp.asarray(s, self.dtype).reshape(n, -1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[N, num_classes]``."""
        return self.linear(self.features(x))


def group_norm(s: jax.Array, groups: int, epsilon: float = 1e-5) -> jax.Array:
    """Per-example GroupNorm of ``[N, channels, ...]`` without affine parameters.

    The channels are split into ``groups`` contiguous groups; each example's group is shifted
    and scaled to mean 0 and (biased) variance 1 over its channels and positions.
    """
    n, channels = s.shape[:2]
    g = s.reshape(n, groups, -1)
    mean = jnp.mean(g, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=-1, keepdims=True)
    return ((g - mean) * jax.lax.rsqrt(var + epsilon)).reshape(s.shape)


def layer_norm(x: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """Each row of ``[N, D]`` shifted and scaled to mean 0 and (biased) variance 1."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon)


@functools.cache
def mobilenet_v2(path: str = ""):
    """``(model, variables)`` of the ImageNet MobileNetV2 (``path`` '' = the data directory).

    Cached: `ScatterNetMobileNet` loads it when constructed, outside any flax module context
    (a module made inside another module's method would be bound to it as a submodule).
    """
    from dpft.models import pretrained

    return pretrained.load("mobilenet_v2", path=path or None)


class ScatterNetMobileNet(nn.Module):
    """`ScatterNetLinear`'s features beside the ImageNet MobileNetV2's, then ``linear``.

    Attributes:
      num_classes, J, L, norm, groups, dtype: as `ScatterNetLinear` (its scattering block).
      image_size: side the images are resized to for the MobileNetV2 (bilinear).
      mobilenet_weight: factor on the per-example normalised MobileNetV2 block.
      weights: the MobileNetV2 safetensors file ('' = the data directory's, see
        `dpft.models.pretrained.weights_path`).

    ``features`` gives ``[N, D_scatter + 1280]``: the scattering block first (as
    `ScatterNetLinear.features`), then ``mobilenet_weight * layer_norm(pooled)``. Inputs are
    NHWC images in [0, 1] with 1 (grey) or 3 (RGB) channels.
    """

    num_classes: int = 10
    J: int = 2
    L: int = 8
    norm: str = "group_norm"
    groups: int = 27
    image_size: int = 64
    mobilenet_weight: float = 1.0
    weights: str = ""
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"ScatterNetMobileNet image_size must be >= 32, got {self.image_size}")
        mobilenet_v2(self.weights)  # the weights file is read (and checked) once, here
        super().__post_init__()

    def setup(self) -> None:
        self.scatternet = ScatterNetLinear(
            self.num_classes, self.J, self.L, self.norm, self.groups, self.dtype
        )
        self.linear = nn.Dense(
            self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros
        )

    def mobilenet_features(self, x: jax.Array) -> jax.Array:
        """The MobileNetV2 block ``[N, 1280]``, normalised per example (unweighted)."""
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(
                f"ScatterNetMobileNet expects NHWC images [N, H, W, 1 or 3], got {x.shape}"
            )
        from dpft.models import pretrained

        model, variables = mobilenet_v2(self.weights)
        n, size = x.shape[0], self.image_size
        x = jax.image.resize(jnp.asarray(x, jnp.float32), (n, size, size, x.shape[-1]), "bilinear")
        x = jnp.broadcast_to(x, (n, size, size, 3))
        x = (x - jnp.asarray(pretrained.MEAN)) / jnp.asarray(pretrained.STD)
        return layer_norm(model.apply(variables, x, method=model.features))

    def features(self, x: jax.Array) -> jax.Array:
        """``[scattering block, mobilenet_weight * MobileNetV2 block]``, ``[N, D]``."""
        mob = self.mobilenet_weight * self.mobilenet_features(x)
        return jnp.concatenate([self.scatternet.features(x), jnp.asarray(mob, self.dtype)], axis=-1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[N, num_classes]``."""
        return self.linear(self.features(x))
