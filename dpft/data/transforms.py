"""Per-example transforms of the streaming pipeline: decode, crop + resize, flip, normalise.

`ImageTransform.pixels` maps one source example (encoded bytes or a uint8 array) to uint8
``[H, W, C]`` pixels, written straight into a caller's buffer when given one (a row of the
step's batch). With ``size > 0``:

* training: Inception-style random-resized crop (area fraction uniform in ``scale``, log aspect
  ratio uniform in ``log(ratio)``, up to 10 tries, else the largest centre crop of a clamped
  aspect ratio), resized to ``size x size``, flipped left-right with probability 1/2;
* evaluation: the centre square of side ``crop_fraction`` x the shorter side, resized to
  ``size x size`` (what resizing the shorter side to ``size / crop_fraction`` and taking the
  centre ``size`` crop gives, in one resize).

The crop box is drawn from the image's stored size (read from the header, before decoding), so
a JPEG whose box is at least twice the output on both sides is decoded at 1/2, 1/4 or 1/8 of its
size in the DCT domain (libjpeg's scaled decoding, as ``PIL.Image.draft`` does), which skips
most of the decoding work; the box is then taken in the reduced image. Decoding and resizing
are OpenCV's (libjpeg-turbo; bilinear, or pixel-area averaging where the box is still at least
twice the output on both sides, e.g. a PNG, which has no scaled decoding). EXIF orientation is
ignored, as PIL and TFDS do.

With ``size == 0`` images keep their shape (every example must then have the same one): the
streaming pipeline then gives exactly the inputs of the in-memory one.

Channels: ``channels = 0`` keeps an image's own (1 for grayscale, else 3: RGB, alpha dropped);
1 or 3 converts every image to that count (`dpft.data.stream.StreamSplit` pins it to example
0's, so that a few grayscale JPEGs in an RGB dataset still stack).

Normalisation is `dpft.data.preprocess` with a preset name or `Preset` (scale to [0, 1], optional
32x32 RGB padding, ``(x - mean) / std``): on the host (`ImageTransform.__call__`,
`normalize_batch`) or in a jitted function (`normalize_on_device`, the same float32 operations).
The random choices of a training example come only from the generator the caller passes in
(`dpft.data.stream` seeds it with ``[seed, step, index, view]``), never from process-local
state.
"""

from __future__ import annotations

import dataclasses
import io
import math

import cv2
import numpy as np
from PIL import Image

from dpft.data.preprocess import PRESETS, Preset, preprocess
from dpft.paths import DataError

__all__ = [
    "ImageTransform",
    "decode_pixels",
    "image_info",
    "normalize_batch",
    "normalize_on_device",
    "random_resized_box",
]

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_REDUCED = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4}
_REDUCED[8] = cv2.IMREAD_REDUCED_GRAYSCALE_8


def _encoded(image) -> bool:
    return isinstance(image, bytes | bytearray | memoryview | np.bytes_)


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a baseline/progressive JPEG's SOF segment, or None
    if ``data`` is not a JPEG whose markers lead to one."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a SOF segment
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height, data[i + 9]) if width and height else None
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def image_info(image, where: str = "example") -> tuple[int, int, int, bool]:
    """``(width, height, channels, is_jpeg)`` of encoded bytes (header only) or a uint8 array."""
    if _encoded(image):
        header = _jpeg_header(image)
        if header is not None:
            return header[0], header[1], 1 if header[2] == 1 else 3, True
        try:
            img = Image.open(io.BytesIO(bytes(image)))
        except Exception as e:  # noqa: BLE001 - PIL raises several types on corrupt data
            raise DataError(f"{where}: expected an encoded image (JPEG, PNG), {e}") from None
        channels = 1 if img.mode in _GRAY_MODES else 3
        return img.width, img.height, channels, img.format == "JPEG"
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] > 4):
        raise DataError(
            f"{where}: expected image bytes or uint8 [H, W(, C)], got {arr.dtype} {arr.shape}"
        )
    channels = 1 if arr.ndim == 2 or arr.shape[-1] in (1, 2) else 3
    return arr.shape[1], arr.shape[0], channels, False


def decode_pixels(image, channels: int, where: str = "example", reduce: int = 1) -> np.ndarray:
    """uint8 ``[H, W]`` (``channels`` 1) or ``[H, W, 3]`` RGB of encoded bytes or an array.

    ``reduce`` (1, 2, 4 or 8; JPEG only) decodes at ``ceil(size / reduce)`` in the DCT domain.
    """
    if _encoded(image):
        buf = np.frombuffer(bytes(image), np.uint8)
        flag = _REDUCED[reduce] | cv2.IMREAD_IGNORE_ORIENTATION
        flag |= cv2.IMREAD_COLOR_RGB if channels == 3 else 0
        arr = cv2.imdecode(buf, flag)
        if arr is None:  # a format OpenCV does not read (e.g. GIF): PIL, at full size
            try:
                img = Image.open(io.BytesIO(bytes(image)))
                arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
            except Exception as e:  # noqa: BLE001 - PIL raises several types on corrupt data
                raise DataError(f"{where}: expected an encoded image (JPEG, PNG), {e}") from None
        return arr
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):  # gray (+ alpha)
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[-1] == 4:  # RGBA: alpha dropped
        arr = arr[..., :3]
    if channels == 3 and arr.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_GRAY2RGB)
    if channels == 1 and arr.ndim == 3:
        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
    return arr


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


def centre_box(width: int, height: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """The centre square of side ``crop_fraction`` x the shorter side (at least 1 pixel)."""
    side = max(1, int(round(min(width, height) * crop_fraction)))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _reduction(box, size: int) -> int:
    """The largest DCT reduction (8, 4, 2) that keeps the box at least ``size`` on both sides."""
    side = min(box[2] - box[0], box[3] - box[1])
    return next((r for r in (8, 4, 2) if side >= r * size), 1)


def _scaled_box(box, width: int, height: int, arr: np.ndarray):
    """``box`` of the WxH image in the (possibly reduced) decoded ``arr``, at least 1 pixel."""
    h, w = arr.shape[:2]
    if (w, h) == (width, height):
        return box
    sx, sy = w / width, h / height
    left, top = min(int(round(box[0] * sx)), w - 1), min(int(round(box[1] * sy)), h - 1)
    right = min(max(int(round(box[2] * sx)), left + 1), w)
    bottom = min(max(int(round(box[3] * sy)), top + 1), h)
    return left, top, right, bottom


def _resize_into(src: np.ndarray, out: np.ndarray) -> None:
    """Resizes ``src`` ``[h, w(, C)]`` into ``out`` ``[H, W, C]``: bilinear, or pixel-area
    averaging when shrinking by 2 or more on both sides (where 2x2 bilinear taps would skip
    source pixels)."""
    height, width = out.shape[:2]
    shrink = src.shape[0] >= 2 * height and src.shape[1] >= 2 * width
    dst = out[..., 0] if out.shape[-1] == 1 else out
    if src.ndim == 3 and src.shape[-1] == 1:
        src = src[..., 0]
    mode = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    got = cv2.resize(src, (width, height), dst=dst, interpolation=mode)
    if got is not dst and not np.shares_memory(got, dst):
        dst[...] = got


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """One example -> ``[size, size, C]`` (or the image's own shape when size is 0).

    Attributes:
        preset: `dpft.data.preprocess` preset name or `Preset` (normalisation statistics).
        size: Output side; 0 keeps the image as it is (no crop, resize or flip).
        train: Random-resized crop + flip (needs ``rng``); else resize + centre crop.
        crop_fraction: Evaluation crop: the centre ``crop_fraction`` of the shorter side.
        scale, ratio: Random-resized-crop area fraction and aspect-ratio ranges.
        channels: 0 keeps each image's own channels (1 or 3); 1 or 3 converts to that many.
    """

    preset: str | Preset
    size: int = 0
    train: bool = False
    crop_fraction: float = 0.875
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    channels: int = 0

    def __post_init__(self):
        if isinstance(self.preset, str) and self.preset not in PRESETS:
            raise ValueError(
                f"config.data.preprocessing must be one of {sorted(PRESETS)}, got {self.preset!r}"
            )
        if not (isinstance(self.size, int) and self.size >= 0):
            raise ValueError(f"config.data.image_size must be an int >= 0, got {self.size!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.channels not in (0, 1, 3):
            raise ValueError(f"channels must be 0, 1 or 3, got {self.channels!r}")

    def pixels(self, image, rng=None, where="example", out=None) -> np.ndarray:
        """The cropped, resized (and flipped) uint8 image ``[H, W, C]``, before normalisation.

        With ``out`` (uint8 ``[H, W, C]``, e.g. a row of a batch) the pixels are written there
        and ``out`` is returned.
        """
        width, height, channels, jpeg = image_info(image, where)
        channels = self.channels or channels
        if self.size == 0:
            arr = decode_pixels(image, channels, where)
            arr = arr[..., None] if arr.ndim == 2 else arr
            if out is None:
                return arr
            if out.shape != arr.shape:
                raise DataError(
                    f"{where}: expected an image of shape {out.shape} (config.data.image_size=0 "
                    f"keeps the images as they are), got {arr.shape}"
                )
            out[...] = arr
            return out
        if self.train:
            if rng is None:
                raise ValueError("a training transform needs a random generator")
            box = random_resized_box(width, height, rng, self.scale, self.ratio)
        else:
            box = centre_box(width, height, self.crop_fraction)
        arr = decode_pixels(image, channels, where, _reduction(box, self.size) if jpeg else 1)
        left, top, right, bottom = _scaled_box(box, width, height, arr)
        if out is None:
            out = np.empty((self.size, self.size, channels), np.uint8)
        _resize_into(arr[top:bottom, left:right], out)
        if self.train and rng.random() < 0.5:
            cv2.flip(out, 1, dst=out[..., 0] if channels == 1 else out)
        return out

    def __call__(self, image, rng: np.random.Generator | None = None, where="example"):
        """The float32 model input of one example (host normalisation)."""
        return preprocess(self.pixels(image, rng, where)[None], self.preset)[0]


def _preset(preset: str | Preset) -> Preset:
    return PRESETS[preset] if isinstance(preset, str) else preset


def normalize_batch(pixels: np.ndarray, preset: str | Preset, out=None) -> np.ndarray:
    """uint8 ``[..., H, W, C]`` -> float32, bit for bit what `preprocess` computes.

    A uint8 pixel of channel c has 256 possible outputs: they are computed once with
    `preprocess`'s own float operations (a ``[256, C]`` table) and looked up per channel, one
    pass over the batch instead of one per arithmetic operation. ``out``: float32 destination.
    """
    kind = _preset(preset)
    if kind.pad_to_32_rgb:
        result = preprocess(pixels.reshape(-1, *pixels.shape[-3:]), kind)
        result = result.reshape(*pixels.shape[:-3], *result.shape[1:])
        if out is not None:
            out[...] = result
            return out
        return result
    channels = pixels.shape[-1]
    levels = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1)
    table = preprocess(np.broadcast_to(levels, (256, 1, 1, channels)), kind).reshape(256, -1)
    out = np.empty(pixels.shape, np.float32) if out is None else out
    for c in range(channels):
        out[..., c] = np.take(table[:, c], pixels[..., c], mode="clip")
    return out


def normalize_on_device(x, preset: str | Preset):
    """uint8 ``[..., H, W, C]`` -> float32 model inputs in JAX (traceable, for a jitted step).

    The operations of `preprocess` in float32: ``x / 255``, the 32x32 RGB padding of the
    preset (28x28 inputs padded by 2 black pixels, one channel repeated to 3), then
    ``(x - mean) / std`` per channel.
    """
    import jax.numpy as jnp

    kind = _preset(preset)
    x = x.astype(jnp.float32) / jnp.float32(255.0)
    if kind.pad_to_32_rgb:
        if x.shape[-3:-1] == (28, 28):
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(2, 2), (2, 2), (0, 0)])
        elif x.shape[-3:-1] != (32, 32):
            raise ValueError(f"pad_to_32_rgb takes 28x28 or 32x32 images, got {x.shape[-3:-1]}")
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
    mean = jnp.asarray(kind.mean, jnp.float32)
    std = jnp.asarray(kind.std, jnp.float32)
    return (x - mean) / std
