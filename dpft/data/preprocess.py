"""uint8 images -> float32 NHWC model inputs, with the statistics each model expects.

A preset is scale to [0, 1], optionally pad 28x28x1 to 32x32x3, then ``(x - mean) / std`` per
channel. Padding happens on the [0, 1] image, before normalization, so the border is black
(pixel value 0), exactly as the reference outputs of the pretrained ResNets were computed.

``NAME@SIZE`` (e.g. ``imagenet@64``, for ``config.data.preprocessing``) is preset NAME on images
first resized to SIZE x SIZE (`resize`: bilinear, on the [0, 1] image) and, for a preset of three
per-channel statistics, a grayscale image repeated to three channels. This is how the
in-memory pipeline feeds 28x28 grayscale datasets to ImageNet models (the reference inputs of
the pretrained MobileNetV2 were made this way).

Presets (`PRESETS`):

* ``mnist``: mean 0.1307, std 0.3081 (MNIST train statistics), 28x28x1 kept.
* ``fashion_mnist``: mean 0.2860, std 0.3530 (Fashion-MNIST train statistics), 28x28x1 kept.
* ``cifar_pretrained``: pad to 32x32x3 if needed, ImageNet mean/std; what the CIFAR-10
  pretrained ResNets of the data dir expect.
* ``cifar10`` / ``cifar100``: their train-set per-channel statistics.
* ``imagenet``: ImageNet per-channel statistics, no padding (RGB images).
* ``standard``: mean 0.5, std 0.5 on every channel ([-1, 1]); the default for TFDS datasets
  without known statistics.
* ``unit``: [0, 1], no normalization.

For other statistics, pass a `Preset` instead of a name. NOT PRIVATE: statistics computed with
``Preset.from_images`` / `channel_stats` are exact functions of the images they see; compute them
on PUBLIC data only (a public proxy dataset, never the private training split), or they leak.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dpft.data.datasets import canonical_name

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "PRETRAINED_MODELS",
    "Preset",
    "channel_stats",
    "default_preprocessing",
    "normalize",
    "pad_to_32_rgb",
    "preprocess",
    "resize",
    "to_float",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Models whose (CIFAR-10 pretrained) weights expect 32x32 RGB inputs with ImageNet statistics.
PRETRAINED_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Normalization statistics (one value, or one per channel) and optional 32x32 RGB padding."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad_to_32_rgb: bool = False

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean} and std {self.std} must have the same length > 0")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @classmethod
    def from_images(cls, images: np.ndarray, pad_to_32_rgb: bool = False) -> Preset:
        """Per-channel statistics of uint8 NHWC ``images``. NOT PRIVATE: public images only."""
        mean, std = channel_stats(images)
        return cls(tuple(mean.tolist()), tuple(std.tolist()), pad_to_32_rgb)


PRESETS: dict[str, Preset] = {
    "mnist": Preset((0.1307,), (0.3081,)),
    "fashion_mnist": Preset((0.2860,), (0.3530,)),
    "cifar_pretrained": Preset(IMAGENET_MEAN, IMAGENET_STD, pad_to_32_rgb=True),
    "cifar10": Preset((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Preset((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": Preset(IMAGENET_MEAN, IMAGENET_STD),
    "standard": Preset((0.5,), (0.5,)),
    "unit": Preset((0.0,), (1.0,)),
}


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.astype(np.float32) / np.float32(255.0)


def pad_to_32_rgb(x: np.ndarray) -> np.ndarray:
    """Float images ``[N, 28, 28, 1]`` -> ``[N, 32, 32, 3]``: 2 zero pixels on every side, the
    channel repeated. 32x32 inputs are left as they are (grayscale ones still get 3 channels).

    Apply it to [0, 1] images, before `normalize`, so that the padding is black.
    """
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [N, H, W, 1 or 3], got shape {x.shape}")
    if x.shape[1:3] == (28, 28):
        x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    elif x.shape[1:3] != (32, 32):
        raise ValueError(f"pad_to_32_rgb takes 28x28 or 32x32 images, got {x.shape[1:3]}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(x - mean) / std`` over the last (channel) axis, in float32.

    ``mean``/``std`` hold one value (for every channel) or one per channel.
    """
    x = np.asarray(x, np.float32)
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    if mean.shape != std.shape or mean.size not in (1, x.shape[-1]):
        raise ValueError(
            f"mean/std of {mean.size}/{std.size} values do not fit {x.shape[-1]} channels"
        )
    return (x - mean) / std


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Float images ``[N, H, W, C]`` -> ``[N, size, size, C]``, bilinear, in float32.

    Half-pixel centres, borders clamped, no antialiasing: what ``cv2.INTER_LINEAR`` and torch's
    ``interpolate(mode='bilinear', align_corners=False)`` compute. Separable: two small matrix
    products per image batch.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {x.shape}")
    rows, cols = _linear_weights(x.shape[1], size), _linear_weights(x.shape[2], size)
    return np.einsum("ih,nhwc,jw->nijc", rows, x, cols, optimize=True).astype(np.float32)


def _linear_weights(n: int, m: int) -> np.ndarray:
    """``[m, n]``: row i holds the bilinear weights of output pixel i over the n inputs."""
    src = np.maximum((np.arange(m) + 0.5) * (n / m) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = src - lo
    w = np.zeros((m, n), np.float64)
    np.add.at(w, (np.arange(m), lo), 1.0 - frac)
    np.add.at(w, (np.arange(m), hi), frac)
    return w.astype(np.float32)


def _resolve(kind: str | Preset, size: int) -> tuple[Preset, int]:
    if isinstance(kind, Preset):
        return kind, size
    name, at, side = str(kind).partition("@")
    if name not in PRESETS or (at and not (side.isdigit() and int(side) > 0)):
        raise ValueError(
            f"config.data.preprocessing must be one of {sorted(PRESETS)}, optionally as NAME@SIZE "
            f"(resized to SIZE x SIZE pixels), got {kind!r}"
        )
    preset = PRESETS[name]
    size = int(side) if side else size
    if size and preset.pad_to_32_rgb:
        raise ValueError(
            f"config.data.preprocessing={kind!r}: preset {name!r} pads to 32x32; resize with "
            "a preset without padding (e.g. imagenet@SIZE)"
        )
    return preset, size


def preprocess(
    images: np.ndarray, kind: str | Preset, size: int = 0, chunk: int = 4096
) -> np.ndarray:
    """uint8 NHWC images -> float32 NHWC model inputs, by preset name (`PRESETS`) or `Preset`.

    ``kind`` may be ``NAME@SIZE`` (see the module docstring), or ``size > 0`` given: the images
    are resized to ``size x size`` first. Computed ``chunk`` images at a time, so the only large
    array is the result.
    """
    kind, size = _resolve(kind, size)
    images = np.asarray(images)
    if images.ndim == 3:  # [N, H, W] grayscale
        images = images[..., None]
    if images.shape[0] <= chunk:
        return _preprocess(images, kind, size)
    first = _preprocess(images[:chunk], kind, size)
    out = np.empty((images.shape[0], *first.shape[1:]), np.float32)
    out[:chunk] = first
    for start in range(chunk, images.shape[0], chunk):
        out[start : start + chunk] = _preprocess(images[start : start + chunk], kind, size)
    return out


def _preprocess(images: np.ndarray, kind: Preset, size: int) -> np.ndarray:
    x = to_float(images)
    if kind.pad_to_32_rgb:
        x = pad_to_32_rgb(x)
    if size:
        x = resize(x, size)
    if size and len(kind.mean) == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return normalize(x, kind.mean, kind.std)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64 ``[C]``) of uint8 NHWC ``images`` scaled to [0, 1].

    NOT PRIVATE: an exact, un-noised statistic of ``images``; never apply it to private data.

    Accumulated in chunks, so memory stays small for large datasets.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected non-empty images [N, H, W, C], got shape {images.shape}")
    c = images.shape[-1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].reshape(-1, c).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
        count += x.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return mean, np.maximum(std, 1e-6)


def default_preprocessing(dataset_name: str, model_name: str) -> str:
    """The preset a (dataset, model) pair uses unless ``config.data.preprocessing`` says otherwise.

    Pretrained CIFAR ResNets (resnet20..resnet56) -> 'cifar_pretrained'; otherwise the dataset's
    own statistics where known (mnist, fashion_mnist, cifar10, cifar100), else 'standard'.
    """
    if model_name in PRETRAINED_MODELS:
        return "cifar_pretrained"
    name = canonical_name(dataset_name)
    if name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        return name
    return "standard"
