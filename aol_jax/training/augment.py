"""The paper's data augmentation as pure, jit-able JAX, run on device inside the train step.

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

Bilinear interpolation and reflect fill keep values in ``[0, 1]``, so the output does too.
"""

from __future__ import annotations

import dataclasses

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


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """``(..., 3)`` RGB in ``[0, 1]`` to HSV with hue in ``[0, 1)`` (as ``tf.image``)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = jnp.max(rgb, axis=-1)
  delta = v - jnp.min(rgb, axis=-1)
  s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
  safe = jnp.where(delta > 0, delta, 1.0)
  h = jnp.where(v == r, (g - b) / safe,
                jnp.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """Inverse of :func:`rgb_to_hsv`: ``channel_n = v - v s clip(min(k, 4 - k), 0, 1)``,
  ``k = (n + 6 h) mod 6`` for ``n = 5, 3, 1`` (R, G, B)."""
  h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
  k = (jnp.asarray([5.0, 3.0, 1.0], hsv.dtype) + 6.0 * h) % 6.0
  return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def _reflect(index: jax.Array, size: int) -> jax.Array:
  """Integer index mapped into ``[0, size)`` by mirroring at the edges (edge pixel repeated)."""
  index = index % (2 * size)
  return jnp.where(index >= size, 2 * size - 1 - index, index)


def affine_warp(image: jax.Array, angle: jax.Array, shift: jax.Array) -> jax.Array:
  """Rotate ``(H, W, C)`` by ``angle`` radians about the centre, then shift by ``shift``
  = (dy, dx) pixels; bilinear interpolation, reflect fill.

  Output pixel ``p`` samples the input at ``R(-angle) (p - shift - c) + c`` with ``c`` the
  centre. A zero angle and integer shift reproduce the input's pixels exactly.
  """
  h, w = image.shape[:2]
  dtype = image.dtype
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype), indexing="ij")
  y, x = yy - shift[0] - cy, xx - shift[1] - cx
  cos, sin = jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)
  sy, sx = cos * y - sin * x + cy, sin * y + cos * x + cx
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  fy, fx = (sy - y0)[..., None], (sx - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  ya, yb = _reflect(y0, h), _reflect(y0 + 1, h)
  xa, xb = _reflect(x0, w), _reflect(x0 + 1, w)
  top = image[ya, xa] * (1 - fx) + image[ya, xb] * fx
  bottom = image[yb, xa] * (1 - fx) + image[yb, xb] * fx
  return top * (1 - fy) + bottom * fy


def _augment_one(key: jax.Array, image: jax.Array, config: AugmentConfig) -> jax.Array:
  """Augment one ``(H, W, C)`` image; see the module docstring."""
  keys = jax.random.split(key, 7)
  dtype = image.dtype
  uniform = lambda k, lo, hi: jax.random.uniform(k, (), jnp.float32, lo, hi).astype(dtype)
  if image.shape[-1] == 3:
    hsv = rgb_to_hsv(image)
    hue = (hsv[..., 0] + uniform(keys[0], -config.hue, config.hue)) % 1.0
    sat = jnp.clip(hsv[..., 1] * uniform(keys[1], *config.saturation), 0.0, 1.0)
    image = hsv_to_rgb(jnp.stack([hue, sat, hsv[..., 2]], axis=-1))
  image = image + uniform(keys[2], -config.brightness, config.brightness)
  mean = jnp.mean(image, axis=(0, 1), keepdims=True)
  image = (image - mean) * uniform(keys[3], *config.contrast) + mean
  image = jnp.clip(image, 0.0, 1.0)
  h, w = image.shape[:2]
  angle = uniform(keys[4], -1.0, 1.0) * jnp.radians(jnp.asarray(config.rotate_degrees, dtype))
  shift = (jax.random.uniform(keys[5], (2,), jnp.float32, -1.0, 1.0)
           * config.translate * jnp.asarray([h, w], jnp.float32)).astype(dtype)
  image = affine_warp(image, angle, shift)
  image = jnp.where(jax.random.bernoulli(keys[6]) & config.flip, image[:, ::-1], image)
  return jnp.clip(image, 0.0, 1.0)  # the warp is a convex combination: this only trims rounding


def augment(key: jax.Array, images: jax.Array, *,
            config: AugmentConfig = AugmentConfig()) -> jax.Array:
  """Randomly augment a batch ``(N, H, W, C)`` of images in ``[0, 1]``, each image with its
  own randomness drawn from ``key``; same shape and dtype out, values in ``[0, 1]``.

  Deterministic per ``key``; the draws for image ``i`` do not depend on how the batch is
  sharded. See the module docstring for the transformations.
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
  return jax.vmap(lambda k, x: _augment_one(k, x, config))(keys, images)
