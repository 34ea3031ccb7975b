"""Parameter-free 1-Lipschitz building blocks (channels last).

Each is evaluated exactly by floating-point arithmetic (a permutation, max / min, a reshape,
a coordinate projection or embedding) and maps 0 to 0, so each states ``L = 1`` and no
rounding through :class:`aol_jax.ExactMap`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from aol_jax._src.certification.protocol import ExactMap, library_class
from aol_jax._src.sharding import batch_reshape


@library_class
class GroupSort(ExactMap, nnx.Module):
  """Sorts the channels within consecutive groups of ``group_size``, largest first.

  A permutation of its input at every point, hence 1-Lipschitz and gradient-norm preserving
  (Anil et al., 2019). ``GroupSort(2)`` is :class:`MaxMin`.
  """
  _FORWARD_METHODS = ("_sort_groups",)

  def __init__(self, group_size: int):
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}.")
    self.group_size = group_size

  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.group_size:
      raise ValueError(f"{type(self).__name__} needs the channel count ({c}) to be a multiple "
                       f"of the group size ({self.group_size}).")
    return self._sort_groups(x)

  def _sort_groups(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    grouped = batch_reshape(x, (*x.shape[:-1], c // self.group_size, self.group_size))
    return batch_reshape(-jnp.sort(-grouped, axis=-1), x.shape)


@library_class
class MaxMin(GroupSort):
  """Channel pairs (0, 1), (2, 3), ... become (max, min) in place."""

  def __init__(self):
    super().__init__(2)

  def _sort_groups(self, x: jax.Array) -> jax.Array:
    # Pairs need no sort: one max and one min, cheaper than jnp.sort over groups of 2.
    a, b = x[..., 0::2], x[..., 1::2]
    return batch_reshape(jnp.stack([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1), x.shape)


@library_class
class ConcatenationPooling(ExactMap, nnx.Module):
  """Space-to-depth: non-overlapping ``window`` patches become channels (orthogonal).

  Input ``(batch, *spatial, c)`` with each spatial size divisible by its window; output
  ``(batch, *(spatial // window), c * prod(window))``, the patch offsets major and the input
  channel minor.
  """

  def __init__(self, window: int | Sequence[int], num_spatial: int = 2):
    self.window = (window,) * num_spatial if isinstance(window, int) else tuple(window)
    if any(w < 1 for w in self.window):
      raise ValueError(f"window must be positive, got {window!r}.")

  def __call__(self, x: jax.Array) -> jax.Array:
    nd = len(self.window)
    if x.ndim != nd + 2:
      raise ValueError(f"ConcatenationPooling over {nd} spatial dims expects (batch, "
                       f"*spatial, channels), got shape {x.shape}.")
    spatial = x.shape[1:-1]
    if any(s % w for s, w in zip(spatial, self.window)):
      raise ValueError(f"Spatial size {spatial} is not divisible by the pooling window "
                       f"{self.window}.")
    split = [x.shape[0]]
    for s, w in zip(spatial, self.window):
      split += [s // w, w]
    x = batch_reshape(x, (*split, x.shape[-1]))
    # (b, s0, w0, s1, w1, ..., c) -> (b, s0, s1, ..., w0, w1, ..., c)
    order = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [2 * nd + 1]
    x = x.transpose(order)
    return batch_reshape(x, (*x.shape[:nd + 1], -1))


@library_class
class FirstChannels(ExactMap, nnx.Module):
  """Keeps the first ``n`` channels: a coordinate projection, norm <= 1."""

  def __init__(self, n: int):
    if n < 1:
      raise ValueError(f"FirstChannels needs n >= 1, got {n}.")
    self.n = n

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] < self.n:
      raise ValueError(f"FirstChannels({self.n}) got only {x.shape[-1]} channels.")
    return x[..., :self.n]


@library_class
class ZeroChannelPad(ExactMap, nnx.Module):
  """Appends ``n`` zero channels: an isometric embedding."""

  def __init__(self, n: int):
    if n < 0:
      raise ValueError(f"ZeroChannelPad needs n >= 0, got {n}.")
    self.n = n

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.n)])


@library_class
class Flatten(ExactMap, nnx.Module):
  """``(batch, ...) -> (batch, -1)``: a reshape, norm preserving."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return batch_reshape(x, (x.shape[0], -1))
