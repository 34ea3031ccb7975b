"""Sharding helpers: keeping the batch sharding in reshapes, and splitting the AOL rescaling.

Two concerns of running AOL layers on a device mesh:

* :func:`batch_reshape`: a reshape that keeps the batch sharding under explicit mesh axes.
* :func:`sharded_rescaling`: the context in which AOL layers split their rescaling (the
  Gram products, the factors and their gradient, which do not depend on the batch) over a
  mesh axis, so that each device does ``1/n`` of it instead of all of it. The results are
  the same as without; ``aol_jax.training``'s steps enter it whenever the mesh has more
  than one device. It is set there and read in one place, :func:`apply_rescaled`, which
  passes ``axis_name=`` to the layer explicitly.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.ad_checkpoint import checkpoint_name
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


def apply_rescaled(layer, op: Callable[[jax.Array, jax.Array], jax.Array], raw: jax.Array,
                   x: jax.Array) -> jax.Array:
  """``op(x, rescaled)``, ``rescaled = layer.apply_factors(raw, layer.factors(raw))``: an AOL
  layer's call on its raw kernel. The one place the :func:`sharded_rescaling` context is read.

  Inside it (an axis of ``n > 1`` devices) the call runs in a ``jax.shard_map`` over the
  axis on each device's batch share, and ``axis_name=`` is passed to ``layer.factors``, which
  splits the rescaling's work (:mod:`aol_jax.factors`). One ``pcast`` of the raw kernel to
  varying serves both of its uses, so its transpose is the single ``psum`` of the gradient,
  over the batch shares and the rescaling's rows together.

  The rescaled kernel is not kept for the backward pass: it is recomputed there from the
  raw kernel and the factors (one elementwise product), so a training step holds no more
  kernels than one with plain layers does.
  """
  shard = _RESCALING_SHARD.get()
  if shard is None:
    return _rescale_and_apply(layer, op, None, raw, x)
  mesh, axis = shard
  n = mesh.shape[axis]
  if x.shape[0] % n:
    raise ValueError(f"Under sharded_rescaling the batch is split over the {n} devices of "
                     f"mesh axis {axis!r}, but this layer got a batch of {x.shape[0]}. Use a "
                     f"batch that is a multiple of {n}, or leave sharded_rescaling.")
  if axis in mesh.explicit_axes:  # shard_map takes explicit-axis inputs as they are typed
    x = jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(axis)))

  def local(raw, x):
    return _rescale_and_apply(layer, op, axis, jax.lax.pcast(raw, axis, to="varying"), x)

  return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(axis)),
                       out_specs=PartitionSpec(axis), axis_names={axis})(raw, x)


_RESCALED = "aol_rescaled_kernel"


def _rescale_and_apply(layer, op, axis_name: str | None, raw: jax.Array,
                       x: jax.Array) -> jax.Array:
  """``op(x, layer.rescale(raw, axis_name=axis_name))`` under a ``jax.checkpoint`` that
  saves everything but the rescaled kernel (a ``custom_vjp`` would break ``jax.jacfwd`` of
  the layer, which the exact-norm tests and users need)."""
  policy = jax.checkpoint_policies.save_anything_except_these_names(_RESCALED)

  def rescaled_op(raw, x):
    return op(x, checkpoint_name(layer.rescale(raw, axis_name=axis_name), _RESCALED))

  return jax.checkpoint(rescaled_op, policy=policy)(raw, x)
