"""The AOL paper's networks (Table 2) as Flax NNX modules.

Every model maps images in ``[0, 1]``, NHWC, to logits, and is 1-Lipschitz (l2) by
construction; :meth:`AOLNetwork.lipschitz_bound` returns the constant to certify with,
including ``max(1 / std)`` when the model normalises its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from aol_jax.blocks import ConcatenationPooling, FirstChannels, Flatten, MaxMin
from aol_jax.layers import AOLConv, AOLDense


class AOLNetwork(nnx.Module):
  """A sequence of 1-Lipschitz layers behind an optional per-channel normalisation.

  Args:
    layers: the 1-Lipschitz layers, applied in order.
    input_mean, input_std: optional per-channel normalisation ``(x - mean) / std`` applied
      first. It multiplies the Lipschitz constant by ``max(1 / std)``, which
      :meth:`lipschitz_bound` includes, so certificates stay sound.
  """

  def __init__(self, layers: Sequence[nnx.Module], *,
               input_mean: Sequence[float] | None = None,
               input_std: Sequence[float] | None = None):
    self.layers = nnx.List(list(layers))
    if input_std is not None and min(input_std) <= 0:
      raise ValueError(f"input_std must be positive, got {input_std}.")
    self.input_mean = None if input_mean is None else tuple(float(m) for m in input_mean)
    self.input_std = None if input_std is None else tuple(float(s) for s in input_std)

  def lipschitz_bound(self) -> float:
    """The l2 Lipschitz constant of the whole network: 1, times max(1/std) if normalising."""
    return 1.0 if self.input_std is None else max(1.0 / s for s in self.input_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.input_mean is not None:
      x = x - jnp.asarray(self.input_mean, x.dtype)
    if self.input_std is not None:
      x = x / jnp.asarray(self.input_std, x.dtype)
    for layer in self.layers:
      x = layer(x)
    return x


def aol_convnet(num_classes: int = 10, *, width: int = 16, channels: int = 192,
                conv_depth: int = 12, dense_depth: int = 14, pool: int = 4,
                image_size: int = 32, in_channels: int = 3, rngs: nnx.Rngs,
                **normalisation) -> AOLNetwork:
  """The AOL-{Small, Medium, Large} family of Table 2, with every size a parameter.

  ConcatenationPooling(pool) -> 1x1 conv to ``channels`` + MaxMin -> ``conv_depth`` x
  [3x3 conv + MaxMin] -> 1x1 conv -> FirstChannels(width) -> Flatten -> ``dense_depth``
  dense layers of ``(image_size / pool)^2 * width`` features with MaxMin between them ->
  FirstChannels(num_classes). Identity init for size-preserving layers, orthogonal else.
  """
  if image_size % pool:
    raise ValueError(f"image_size {image_size} must be divisible by pool {pool}.")
  features = (image_size // pool) ** 2 * width
  if not num_classes <= features or width > channels:
    raise ValueError(f"num_classes ({num_classes}) must be <= {features} dense features and "
                     f"width ({width}) <= channels ({channels}).")
  layers: list[nnx.Module] = [
      ConcatenationPooling(pool),
      AOLConv(in_channels * pool * pool, channels, (1, 1), rngs=rngs), MaxMin()]
  for _ in range(conv_depth):
    layers += [AOLConv(channels, channels, (3, 3), padding="SAME", rngs=rngs), MaxMin()]
  layers += [AOLConv(channels, channels, (1, 1), rngs=rngs), FirstChannels(width), Flatten()]
  for i in range(dense_depth):
    layers.append(AOLDense(features, features, rngs=rngs))
    if i < dense_depth - 1:
      layers.append(MaxMin())
  layers.append(FirstChannels(num_classes))
  return AOLNetwork(layers, **normalisation)


def aol_small(num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> AOLNetwork:
  """AOL-Small (w = 16, about 18.7M parameters)."""
  return aol_convnet(num_classes, width=16, rngs=rngs, **kwargs)


def aol_medium(num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> AOLNetwork:
  """AOL-Medium (w = 32, about 62.8M parameters)."""
  return aol_convnet(num_classes, width=32, rngs=rngs, **kwargs)


def aol_large(num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> AOLNetwork:
  """AOL-Large (w = 48, about 136.2M parameters)."""
  return aol_convnet(num_classes, width=48, rngs=rngs, **kwargs)
