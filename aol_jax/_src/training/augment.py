"""The paper's data augmentation, on device inside the train step, built from ``dm_pix``.

AOL section 5 (reference: Keras ``RandomRotation(5/360)``, ``RandomTranslation(0.1, 0.1)``,
``random_flip_left_right`` and ``tf.image`` colour jitter): per image, independently,

* colour (RGB images only): hue shift ``U(-0.02, 0.02)`` of the hue circle, saturation
  factor ``U(0.3, 2)``, brightness ``+U(-0.1, 0.1)``, contrast factor ``U(0.5, 2)`` about the
  per-channel mean, then a clip to ``[0, 1]`` (as the reference); greyscale (1-channel)
  images get brightness and contrast only, since hue and saturation do not exist for them;
* geometry: rotation by ``U(-5, 5)`` degrees about the centre and a translation by
  ``U(-10%, 10%)`` of the height and width, applied as one affine warp with bilinear
  interpolation and reflect fill (``d c b a | a b c d | d c b a``, Keras' ``'reflect'``);
* a horizontal flip with probability 1/2.

The colour jitter and the flip are ``dm_pix.random_*`` calls, and the warp is
``dm_pix.affine_transform``. Bilinear interpolation and reflect fill keep values in
``[0, 1]``, so the output does too.
"""

from __future__ import annotations

import dataclasses

import dm_pix as pix
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Strengths of each augmentation; zero / ``(1, 1)`` disables one. Defaults: the paper's.

  A pytree whose fields are all data, so under ``jax.jit`` one compilation serves every
  strength.
  """
  flip: bool = True  # random horizontal flip with probability 1/2
  translate: float = 0.1  # max shift, as a fraction of the height / width
  rotate_degrees: float = 5.0  # max rotation angle
  hue: float = 0.02  # max hue shift, fraction of the hue circle (RGB only)
  saturation: tuple[float, float] = (0.3, 2.0)  # range of the saturation factor (RGB only)
  brightness: float = 0.1  # max additive brightness change
  contrast: tuple[float, float] = (0.5, 2.0)  # range of the contrast factor


NONE = AugmentConfig(flip=False, translate=0.0, rotate_degrees=0.0, hue=0.0,
                     saturation=(1.0, 1.0), brightness=0.0, contrast=(1.0, 1.0))


def affine_warp(image: jax.Array, angle: jax.Array, shift: jax.Array) -> jax.Array:
  """Rotate ``(H, W, C)`` by ``angle`` radians about the centre, then shift by ``shift``
  = (dy, dx) pixels; bilinear interpolation, reflect fill (``dm_pix.affine_transform``).

  Output pixel ``p`` samples the input at ``R(-angle) (p - shift - c) + c`` with ``c`` the
  centre, i.e. at ``M p + offset`` with ``M = R(-angle)`` and
  ``offset = c - R(-angle) (shift + c)``. A zero angle and integer shift reproduce the input's
  pixels exactly.
  """
  # dm_pix has rotate (no shift) and affine_transform (any pull matrix) but no rotate-and-shift:
  # the matrix is composed here so that the image is resampled once, not once per transform.
  h, w = image.shape[:2]
  centre = jnp.asarray([(h - 1) / 2.0, (w - 1) / 2.0], jnp.float32)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  rotation = jnp.stack([jnp.stack([cos, -sin]), jnp.stack([sin, cos])]).astype(jnp.float32)
  offset = centre - rotation @ (shift.astype(jnp.float32) + centre)
  matrix = jnp.eye(3, dtype=jnp.float32).at[:2, :2].set(rotation)  # channels map to themselves
  # zeros_like, not jnp.append(offset, 0.0): under vmap on a batch-sharded explicit mesh the
  # literal gets an empty mesh and the concatenation is refused.
  offset = jnp.concatenate([offset, jnp.zeros_like(offset[:1])])
  # mode='reflect' runs through jax.scipy.ndimage.map_coordinates over all three axes (the
  # channel axis too, at weight 0): about 2.5x the time of a 2-D hand-written warp on CPU.
  return pix.affine_transform(image, matrix, offset=offset, order=1, mode="reflect")


def _augment_one(key: jax.Array, image: jax.Array, config: AugmentConfig) -> jax.Array:
  """Augment one ``(H, W, C)`` float32 image; see the module docstring."""
  keys = jax.random.split(key, 7)
  if image.shape[-1] == 3:  # hue and saturation are defined for RGB only
    image = pix.random_hue(keys[0], image, max_delta=config.hue)
    image = pix.random_saturation(keys[1], image, *config.saturation)
  image = pix.random_brightness(keys[2], image, max_delta=config.brightness)
  image = pix.random_contrast(keys[3], image, *config.contrast)
  image = jnp.clip(image, 0.0, 1.0)  # the reference clips; dm_pix leaves it to the caller
  # dm_pix has no random rotation or translation: draw the angle and shift here.
  h, w = image.shape[:2]
  angle = jnp.radians(jax.random.uniform(keys[4], (), jnp.float32, -1.0, 1.0)
                      * config.rotate_degrees)
  shift = (jax.random.uniform(keys[5], (2,), jnp.float32, -1.0, 1.0)
           * config.translate * jnp.asarray([h, w], jnp.float32))
  image = affine_warp(image, angle, shift)
  image = pix.random_flip_left_right(keys[6], image, probability=0.5 * config.flip)
  return jnp.clip(image, 0.0, 1.0)  # the warp is a convex combination: this only trims rounding


def augment(key: jax.Array, images: jax.Array, *,
            config: AugmentConfig = AugmentConfig()) -> jax.Array:
  """Randomly augment a batch ``(N, H, W, C)`` of images in ``[0, 1]``, each image with its
  own randomness drawn from ``key``; same shape and dtype out, values in ``[0, 1]``.

  Deterministic per ``key``; the draws for image ``i`` do not depend on how the batch is
  sharded. See the module docstring for the transformations. Computed in float32 (the
  draws are float32 in ``dm_pix``), returned in the input's dtype.

  Example:
    >>> x = jnp.full((2, 8, 8, 3), 0.5, jnp.bfloat16)
    >>> y = augment(jax.random.key(0), x)
    >>> y.shape, y.dtype, bool((y >= 0).all() & (y <= 1).all())
    ((2, 8, 8, 3), dtype(bfloat16), True)
  """
  if images.ndim != 4:
    raise ValueError(f"augment expects a batch of images (N, H, W, C), got shape {images.shape}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"augment expects float images in [0, 1], got dtype {images.dtype}.")
  keys = jax.random.split(key, images.shape[0])
  # Under an explicit mesh the per-image keys must be split over devices like the images;
  # the values drawn do not depend on the sharding.
  sharding = jax.typeof(images).sharding
  if sharding.spec and sharding.spec[0] is not None:
    keys = jax.sharding.reshard(keys, NamedSharding(sharding.mesh, P(sharding.spec[0])))
  out = jax.vmap(lambda k, x: _augment_one(k, x, config))(keys, images.astype(jnp.float32))
  return out.astype(images.dtype)
