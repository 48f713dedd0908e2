"""Augmentation multiplicity: K augmented views of one example, made on device (pure jnp).

De et al. 2022 ("Unlocking high-accuracy differentially private image classification through
scale") feed every sampled example as K augmented views and average the K views' gradients
BEFORE clipping. The per-example loss of `dpft.train.step.cross_entropy_loss` does that when
given an `AugmentSpec`: it calls `views` on the example's image, runs the model once on the
``[K, H, W, C]`` stack and takes the mean of the K losses, so the example's gradient is the mean
of its views' gradients and is clipped as ONE unit (docs/augmult.md).

View ``k`` of an example whose loss key is ``rng`` (``keys.derive(step_key, "example", i)`` in
`dpft.privacy.clipping.clipped_grad`) is drawn with ``keys.derive(rng, "augment", k)``: it is a
function of (seed, step, position of the example in the batch, k), so a resumed run makes the
same views, and the augmentation keys never coincide with keys of another purpose.

Augmentations (``AugmentSpec.augment``, one of `AUGMENTS`), on images ``[H, W, C]``:

* ``crop``: pad H and W by ``pad`` on both sides (``pad_mode`` 'reflect' or 'zero'), then cut
  an ``H x W`` window at a uniformly random offset in ``[0, 2 pad]^2`` (the usual CIFAR crop);
* ``flip``: mirror left-right with probability 1/2 (wrong for digits: `default_augment` leaves
  it out for MNIST);
* ``crop_flip``: crop, then flip; ``none``: K copies of the image.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpft.privacy import keys

__all__ = ["AUGMENTS", "PAD_MODES", "AugmentSpec", "default_augment", "from_config", "views"]

AUGMENTS = ("crop_flip", "crop", "flip", "none")
PAD_MODES = ("reflect", "zero")
# Datasets whose images must not be mirrored (digits, characters); the others default to crop_flip.
NO_FLIP = ("mnist", "emnist", "kmnist")


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """How many views of an example the loss sees and how they are made.

    Attributes:
      augmult: K, the number of views per example (>= 1).
      augment: one of `AUGMENTS`.
      pad: crop padding in pixels on each side of H and W.
      pad_mode: 'reflect' or 'zero'.
    """

    augmult: int = 1
    augment: str = "none"
    pad: int = 4
    pad_mode: str = "reflect"

    @property
    def identity(self) -> bool:
        """True when the loss sees the example itself, once (the plain per-example loss)."""
        return self.augmult == 1 and self.augment == "none"

    def check_image(self, shape: tuple[int, ...]) -> None:
        """One-line ValueError if images of per-example ``shape`` cannot be augmented so."""
        if self.augment == "none":
            return
        if len(shape) != 3:
            raise ValueError(
                f"config.data.augment={self.augment!r} needs images [H, W, C], got examples of "
                f"shape {tuple(shape)} (use 'none')"
            )
        if "crop" in self.augment and not self.pad < min(shape[0], shape[1]):
            raise ValueError(
                f"config.data.augment_pad={self.pad} must be < the image height and width "
                f"{tuple(shape[:2])}"
            )


def default_augment(dataset: str, augmult: int) -> str:
    """'none' at one view, else 'crop' for digits (`NO_FLIP`) and 'crop_flip' for the rest."""
    if augmult == 1:
        return "none"
    base = dataset.strip().lower().split("/")[0]  # TFDS configs: 'emnist/digits'
    return "crop" if base in NO_FLIP else "crop_flip"


def from_config(data) -> AugmentSpec:
    """The `AugmentSpec` of ``config.data``; a one-line ValueError naming a bad key.

    Keys: ``augmult`` (int >= 1), ``augment`` (one of `AUGMENTS`; '' = `default_augment` of
    ``data.name``), ``augment_pad`` (int >= 0), ``augment_pad_mode`` (one of `PAD_MODES`).
    """
    k = data.get("augmult", 1)
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"config.data.augmult must be an int >= 1, got {k!r}")
    augment = data.get("augment", "")
    if augment == "":
        augment = default_augment(str(data.get("name", "")), k)
    if augment not in AUGMENTS:
        raise ValueError(
            f"config.data.augment must be {'|'.join(AUGMENTS)} ('' = per dataset), got {augment!r}"
        )
    pad = data.get("augment_pad", 4)
    if not (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0):
        raise ValueError(f"config.data.augment_pad must be an int >= 0, got {pad!r}")
    mode = data.get("augment_pad_mode", "reflect")
    if mode not in PAD_MODES:
        raise ValueError(
            f"config.data.augment_pad_mode must be {'|'.join(PAD_MODES)}, got {mode!r}"
        )
    return AugmentSpec(k, augment, pad, mode)


def _crop(image: jax.Array, key: jax.Array, pad: int, mode: str) -> jax.Array:
    h, w = image.shape[0], image.shape[1]
    widths = ((pad, pad), (pad, pad), (0, 0))
    padded = jnp.pad(image, widths, mode="reflect" if mode == "reflect" else "constant")
    dy, dx = jax.random.randint(key, (2,), 0, 2 * pad + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[2]))


def _one_view(image: jax.Array, key: jax.Array, spec: AugmentSpec) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    if "crop" in spec.augment and spec.pad > 0:
        image = _crop(image, crop_key, spec.pad, spec.pad_mode)
    if "flip" in spec.augment:
        image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    return image


def views(image: jax.Array, rng: jax.Array, spec: AugmentSpec) -> jax.Array:
    """``[K, *image.shape]``: the ``spec.augmult`` views of ONE example (view k from
    ``keys.derive(rng, "augment", k)``); jit- and vmap-friendly."""
    spec.check_image(tuple(image.shape))
    if spec.augment == "none":
        return jnp.broadcast_to(image, (spec.augmult, *image.shape))
    ks = jnp.arange(spec.augmult, dtype=jnp.uint32)
    return jax.vmap(lambda k: _one_view(image, keys.derive(rng, "augment", k), spec))(ks)
