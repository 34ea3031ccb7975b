"""Initialisers from the AOL paper: identity where the layer preserves size, orthogonal otherwise.

For a kernel of shape ``(*spatial, in // g, out)`` (dense: ``(in, out)``), every tap is zero
except the centre tap ``(k - 1) // 2`` per spatial dim, which holds, per group, the identity
when the group is square and a matrix with orthonormal rows or columns otherwise. With
'SAME' padding that centre tap is the one aligned with the output pixel, so a square conv
starts as the identity map.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer


def aol_init(feature_group_count: int = 1) -> Initializer:
  """Returns a Flax initialiser ``init(key, shape, dtype)`` following the rule above.

  Args:
    feature_group_count: ``g``; the kernel's output channels split into ``g`` groups, each
      initialised on its own.

  Example:
    >>> aol_init()(jax.random.key(0), (2, 2))
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
  """

  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    *spatial, c_in_g, c_out = shape
    g = feature_group_count
    if c_out % g:
      raise ValueError(f"feature_group_count={g} does not divide out features {c_out}.")
    c_out_g = c_out // g
    if c_in_g == c_out_g:
      blocks = jnp.broadcast_to(jnp.eye(c_in_g, dtype=jnp.float32), (g, c_in_g, c_out_g))
    else:
      ortho = jax.nn.initializers.orthogonal()
      keys = jax.random.split(key, g)
      blocks = jax.vmap(lambda k: ortho(k, (c_in_g, c_out_g), jnp.float32))(keys)
    centre_tap = jnp.concatenate(list(blocks), axis=-1)  # (c_in_g, c_out)
    kernel = jnp.zeros((*spatial, c_in_g, c_out), jnp.float32)
    centre = tuple((k - 1) // 2 for k in spatial)
    return kernel.at[centre].set(centre_tap).astype(dtype)

  return init
