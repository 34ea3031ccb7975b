"""Sharding helpers: keeping the batch sharding in reshapes, and splitting the AOL rescaling.

Two concerns of running AOL layers on a device mesh:

* :func:`batch_reshape`: a reshape that keeps the batch sharding under explicit mesh axes.
* :func:`sharded_rescaling`: the context in which AOL layers split their rescaling (the
  Gram products, the factors and their gradient, which do not depend on the batch) over a
  mesh axis, so that each device does ``1/n`` of it instead of all of it. The results are
  the same as without; ``aol_jax.training``'s steps enter it whenever the mesh has more
  than one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_RESCALING_SHARD: contextvars.ContextVar[tuple[Mesh, str] | None] = contextvars.ContextVar(
    "aol_jax_rescaling_shard", default=None)


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


@contextlib.contextmanager
def sharded_rescaling(mesh: Mesh | None, axis_name: str = "data") -> Iterator[None]:
  """AOL layers called inside split their rescaling over the mesh axis ``axis_name``.

  Each layer runs its kernel on its batch share inside a ``jax.shard_map`` over
  ``axis_name``; each device computes the Gram rows of its ``1/n`` share of the kernel's
  input features (rows of ``P``, input channels of ``K``), forward and backward; the
  factors are all-gathered, and each device's rows of the rescaling's gradient join its
  batch share's gradient in the one all-reduce that data parallelism does anyway.
  Per-device rescaling work shrinks with the axis size ``n``, the results do not change.
  The batch must be a multiple of ``n``. ``mesh=None`` (or an axis of size 1) restores the
  unsplit rescaling.

  The choice is made when a function is traced, so enter the context inside the function
  you ``jax.jit`` (a jitted function traced outside it keeps the unsplit rescaling)::

    mesh = aol_jax.training.make_data_mesh()

    @jax.jit
    def loss_fn(params, x, y):
      with aol_jax.sharding.sharded_rescaling(mesh):
        return offset_cross_entropy(nnx.merge(graphdef, params)(x), y)

  Raises:
    ValueError: if ``axis_name`` is not an axis of ``mesh``.
  """
  if mesh is not None and axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh (axes "
                     f"{mesh.axis_names}); pass the mesh axis to split the rescaling over.")
  split = mesh is not None and mesh.shape[axis_name] > 1
  token = _RESCALING_SHARD.set((mesh, axis_name) if split else None)
  try:
    yield
  finally:
    _RESCALING_SHARD.reset(token)


@contextlib.contextmanager
def rescaling_in_shard_map(axis_name: str) -> Iterator[None]:
  """For layers: code inside runs in a ``jax.shard_map`` over ``axis_name`` (see
  :func:`rescaling_kwargs`)."""
  token = _RESCALING_SHARD.set((None, axis_name))
  try:
    yield
  finally:
    _RESCALING_SHARD.reset(token)


def rescaling_shard() -> tuple[Mesh | None, str] | None:
  """``(mesh, axis_name)`` of the enclosing :func:`sharded_rescaling`; ``(None, axis_name)``
  inside :func:`rescaling_in_shard_map`; None when the rescaling is not split."""
  return _RESCALING_SHARD.get()


def rescaling_kwargs() -> dict[str, object]:
  """The ``mesh`` / ``axis_name`` arguments of :mod:`aol_jax.rescaling` for the current
  context: empty when the rescaling is not split."""
  shard = _RESCALING_SHARD.get()
  if shard is None:
    return {}
  mesh, axis_name = shard
  return {"axis_name": axis_name} if mesh is None else {"mesh": mesh, "axis_name": axis_name}
