"""Per-example transforms of the streaming pipeline: decode, crop/resize, flip, normalise.

`ImageTransform` maps one source example (encoded bytes or a uint8 array) to a float32
``[H, W, C]`` model input. With ``size > 0``:

* training: Inception-style random-resized crop (area fraction uniform in ``scale``, log aspect
  ratio uniform in ``log(ratio)``, up to 10 tries, else the largest centre crop of a clamped
  aspect ratio), resized to ``size x size`` (bilinear), flipped left-right with probability 1/2;
* evaluation: resize the shorter side to ``size / crop_fraction`` and take the centre
  ``size x size`` crop (done as one resize of the matching box of the original image).

With ``size == 0`` images keep their shape (every example must then have the same one) and
are only normalised: the streaming pipeline then gives exactly the inputs of the in-memory one.

Normalisation is `dpft.data.preprocess` with a preset name or `Preset` (scale to [0, 1], optional
32x32 RGB padding, ``(x - mean) / std``). The random choices of a training example come only
from the generator the caller passes in (`dpft.data.stream` seeds it with
``[seed, step, index, view]``), never from process-local state.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

from dpft.data.preprocess import PRESETS, Preset, preprocess
from dpft.paths import DataError

__all__ = ["ImageTransform", "decode_image", "normalize_batch", "random_resized_box"]


def decode_image(image, where: str = "example") -> Image.Image:
    """Encoded bytes or a uint8 array ``[H, W(, C)]`` -> a PIL image (RGB, or L for 1 channel)."""
    if isinstance(image, bytes | bytearray | memoryview | np.bytes_):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
            img.load()
        except Exception as e:  # noqa: BLE001 - PIL raises several types on corrupt data
            raise DataError(f"{where}: expected an encoded image (JPEG, PNG), {e}") from None
        return img if img.mode in ("RGB", "L") else img.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] > 4):
        raise DataError(
            f"{where}: expected image bytes or uint8 [H, W(, C)], got {arr.dtype} {arr.shape}"
        )
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    img = Image.fromarray(arr)
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def random_resized_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of an Inception-style random crop of a WxH image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height  # fallback: the largest centre crop of a clamped aspect ratio
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _centre_box(width: int, height: int, size: int, crop_fraction: float):
    """The box of the original image that becomes the centre ``size`` crop after resizing the
    shorter side to ``size / crop_fraction``."""
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """One example -> float32 ``[size, size, C]`` (or the image's own shape when size is 0).

    Attributes:
        preset: `dpft.data.preprocess` preset name or `Preset` (normalisation statistics).
        size: Output side; 0 keeps the image as it is (no crop, resize or flip).
        train: Random-resized crop + flip (needs ``rng``); else resize + centre crop.
        crop_fraction: Evaluation crop: the shorter side is resized to ``size / crop_fraction``.
        scale, ratio: Random-resized-crop area fraction and aspect-ratio ranges.
    """

    preset: str | Preset
    size: int = 0
    train: bool = False
    crop_fraction: float = 0.875
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if isinstance(self.preset, str) and self.preset not in PRESETS:
            raise ValueError(
                f"config.data.preprocessing must be one of {sorted(PRESETS)}, got {self.preset!r}"
            )
        if not (isinstance(self.size, int) and self.size >= 0):
            raise ValueError(f"config.data.image_size must be an int >= 0, got {self.size!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")

    def pixels(self, image, rng: np.random.Generator | None = None, where="example"):
        """The cropped, resized (and flipped) uint8 image ``[H, W, C]``, before normalisation."""
        if self.size == 0:
            arr = np.asarray(decode_image(image, where) if _encoded(image) else image)
            return arr[..., None] if arr.ndim == 2 else arr
        img = decode_image(image, where)
        s = (self.size, self.size)
        if self.train:
            if rng is None:
                raise ValueError("a training transform needs a random generator")
            box = random_resized_box(img.width, img.height, rng, self.scale, self.ratio)
            img = img.resize(s, Image.Resampling.BILINEAR, box=box)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            box = _centre_box(img.width, img.height, self.size, self.crop_fraction)
            img = img.resize(s, Image.Resampling.BILINEAR, box=box)
        arr = np.asarray(img)
        return arr[..., None] if arr.ndim == 2 else arr

    def __call__(self, image, rng: np.random.Generator | None = None, where="example"):
        """The float32 model input of one example."""
        return preprocess(self.pixels(image, rng, where)[None], self.preset)[0]


def normalize_batch(pixels: np.ndarray, preset: str | Preset) -> np.ndarray:
    """uint8 ``[..., H, W, C]`` -> float32, bit for bit what `preprocess` computes.

    A uint8 pixel of channel c has 256 possible outputs: they are computed once with
    `preprocess`'s own float operations (a ``[256, C]`` table) and looked up per channel, one
    pass over the batch instead of one per arithmetic operation.
    """
    kind = PRESETS[preset] if isinstance(preset, str) else preset
    if kind.pad_to_32_rgb:
        flat = pixels.reshape(-1, *pixels.shape[-3:])
        out = preprocess(flat, kind)
        return out.reshape(*pixels.shape[:-3], *out.shape[1:])
    channels = pixels.shape[-1]
    levels = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1)
    table = preprocess(np.broadcast_to(levels, (256, 1, 1, channels)), kind).reshape(256, -1)
    out = np.empty(pixels.shape, np.float32)
    for c in range(channels):
        out[..., c] = np.take(table[:, c], pixels[..., c])
    return out


def _encoded(image) -> bool:
    return isinstance(image, bytes | bytearray | memoryview | np.bytes_)
