"""Small CNNs for 28x28 grey-scale images (MNIST, Fashion-MNIST).

`SampleConvNet` is the network of the Opacus MNIST example; `TramerBonehCNN` is the end-to-end
CNN that Tramer & Boneh (2021, "Differentially private learning needs better features (or much
more data)") train with DP-SGD on MNIST and Fashion-MNIST: the same layers with tanh activations
(the tempered-sigmoid family of Papernot et al. 2021, which does better than ReLU under DP-SGD).

Layout (NHWC inputs ``[N, 28, 28, 1]``, float32)::

    conv1   16 filters 8x8, stride 2, padding 3   -> [N, 14, 14, 16]
    act, max-pool 2x2 stride 1                    -> [N, 13, 13, 16]  (`dpft.models.pool`)
    conv2   32 filters 4x4, stride 2, 'VALID'     -> [N, 5, 5, 32]
    act, max-pool 2x2 stride 1                    -> [N, 4, 4, 32]
    flatten, fc1 Dense 32, act                    -> [N, 32]        (`features`)
    linear  Dense num_classes                     -> [N, num_classes] (logits)

On 28x28x1 inputs this has 26,010 parameters, the count of the PyTorch original. The output
layer is named ``linear`` (parameter paths ``linear/kernel``, ``linear/bias``) like the head of
every model in `dpft.models`, so that trainers can select or re-initialise the head by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpft.models.conv import conv_impl
from dpft.models.pool import max_pool

Array = jax.Array

#: Activations by name. ``tanh`` is the tempered sigmoid with scale 2, temperature 2, offset 1.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "selu": nn.selu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation function called ``name``; ValueError listing the valid names otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


class SampleConvNet(nn.Module):
    """The CNN of the Opacus MNIST example (26,010 parameters on 28x28x1 inputs).

    Attributes:
      num_classes: width of the output layer ``linear``.
      activation: a name from `ACTIVATIONS` ('relu' in Opacus, 'tanh' for Tramer & Boneh).
      dtype: computation dtype (parameters are always float32).
      conv: convolution implementation, see `dpft.models.conv.conv_impl`: 'auto' (on CPU
        im2col patches + matmul for the layer shapes where it is faster, XLA's convolution with
        a batch-chunked kernel gradient otherwise; XLA's on GPU/TPU), 'xla' or 'im2col'. The
        same parameters and function.

    ``model.apply(variables, x)`` returns logits ``[N, num_classes]``;
    ``model.apply(variables, x, method=model.features)`` the 32-d activations before ``linear``.
    Submodules: ``conv1``, ``conv2``, ``fc1``, ``linear``.
    """

    num_classes: int = 10
    activation: str = "relu"
    dtype: Any = jnp.float32
    conv: str = "auto"

    def __post_init__(self) -> None:
        get_activation(self.activation)  # fail at construction, not at the first apply
        conv_impl(self.conv)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        super().__post_init__()

    def setup(self) -> None:
        impl = conv_impl(self.conv)
        self.conv1 = nn.Conv(
            16,
            (8, 8),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            dtype=self.dtype,
            conv_general_dilated=impl,
        )
        self.conv2 = nn.Conv(
            32, (4, 4), strides=(2, 2), padding="VALID", dtype=self.dtype, conv_general_dilated=impl
        )
        self.fc1 = nn.Dense(32, dtype=self.dtype)
        self.linear = nn.Dense(self.num_classes, dtype=self.dtype)

    def features(self, x: Array) -> Array:
        """The 32-d representation ``[N, 32]`` that the output layer reads."""
        act = get_activation(self.activation)
        x = jnp.asarray(x, self.dtype)
        x = act(self.conv1(x))
        x = max_pool(x, (2, 2), strides=(1, 1))
        x = act(self.conv2(x))
        x = max_pool(x, (2, 2), strides=(1, 1))
        x = x.reshape(x.shape[0], -1)
        return act(self.fc1(x))

    def __call__(self, x: Array) -> Array:
        """Logits ``[N, num_classes]`` for NHWC images ``[N, 28, 28, 1]``."""
        return self.linear(self.features(x))


class TramerBonehCNN(SampleConvNet):
    """The end-to-end MNIST / Fashion-MNIST CNN of Tramer & Boneh (2021).

    The same layers and parameter paths as `SampleConvNet` with tanh activations;
    ``TramerBonehCNN(num_classes)`` is ``SampleConvNet(num_classes, activation='tanh')``.
    """

    activation: str = "tanh"


def sample_convnet(num_classes: int = 10, **kwargs: Any) -> SampleConvNet:
    """`SampleConvNet` with ReLU (Opacus)."""
    return SampleConvNet(num_classes=num_classes, **kwargs)


def tramer_boneh_cnn(num_classes: int = 10, **kwargs: Any) -> TramerBonehCNN:
    """`TramerBonehCNN`: `SampleConvNet` with tanh (Tramer & Boneh 2021)."""
    return TramerBonehCNN(num_classes=num_classes, **kwargs)
