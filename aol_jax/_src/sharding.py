"""The batch layout: a reshape that keeps the batch sharding under explicit mesh axes.

(The split of the AOL rescaling over a mesh axis is the layers' own:
:mod:`aol_jax._src.rescaled_apply`.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec


def batch_reshape(x: jax.Array, shape: Sequence[int]) -> jax.Array:
  """``x.reshape(shape)`` for a reshape that keeps axis 0 (the batch) in place.

  Under a mesh with explicit axes JAX does not infer the sharding of a reshape's output: a
  batch-sharded input keeps its batch sharding, every other axis comes out replicated.
  """
  shape = tuple(shape)
  if -1 in shape:
    known = math.prod(d for d in shape if d != -1)
    shape = tuple(x.size // known if d == -1 else d for d in shape)
  sharding = jax.typeof(x).sharding
  if x.ndim and sharding.mesh.explicit_axes and sharding.spec[0] is not None:
    out = PartitionSpec(sharding.spec[0], *([None] * (len(shape) - 1)))
    return jax.lax.reshape(x, shape, out_sharding=NamedSharding(sharding.mesh, out))
  return x.reshape(shape)
