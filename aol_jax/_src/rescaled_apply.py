"""An AOL layer's call on its raw kernel: rescale, then apply; whole, or split over a mesh axis.

The layer's static attribute ``rescaling_axis`` (set with ``nnx.view(model,
rescaling_axis='data')``, see :meth:`aol_jax.AOLConv.set_view`) decides. ``None``: every
device computes the whole rescaling. An axis name: the call runs in a ``jax.shard_map``
over that axis of the mesh entered with ``jax.set_mesh`` (``aol_jax.training``'s steps
enter it), each device on its batch share, and each device computes ``1/n`` of the Gram's
products, forward and backward (:mod:`aol_jax._src.factors`: the rows of its share of the
input features for a conv kernel, block pairs of the symmetric ``P P^T`` for a dense one);
the results are the same.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

_RESCALED = "aol_rescaled_kernel"


def apply_rescaled(layer, op: Callable[[jax.Array, jax.Array], jax.Array], raw: jax.Array,
                   x: jax.Array) -> jax.Array:
  """``op(x, layer.rescale(raw))``, split over ``layer.rescaling_axis`` if it names one.

  Split over an axis of ``n > 1`` devices, ``axis_name=`` is passed to ``layer.rescale``,
  which splits the rescaling's work. One ``pcast`` of the raw kernel to varying serves both
  of its uses, so its transpose is the single ``psum`` of the gradient, over the batch
  shares and the rescaling's rows together.

  The rescaled kernel is not kept for the backward pass: it is recomputed there from the
  raw kernel and the factors (one elementwise product), so a training step holds no more
  kernels than one with plain layers does.

  Raises:
    ValueError: if the layer splits over an axis but no mesh with that axis is set, or the
      batch is not a multiple of the axis size.
  """
  axis = layer.rescaling_axis
  if axis is None:
    return _rescale_and_apply(layer, op, None, raw, x)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis not in mesh.axis_names:
    where = "outside any mesh" if mesh.empty else f"under a mesh with axes {mesh.axis_names}"
    raise ValueError(
        f"{type(layer).__name__} splits its rescaling over mesh axis {axis!r} (its "
        f"rescaling_axis, set by nnx.view), but it is traced {where}: call it under "
        f"jax.set_mesh(mesh) with a mesh axis {axis!r}, or take nnx.view(model, "
        f"rescaling_axis=None) to compute the rescaling whole.")
  n = mesh.shape[axis]
  if n == 1:
    return _rescale_and_apply(layer, op, None, raw, x)
  if x.shape[0] % n:
    raise ValueError(f"{type(layer).__name__} splits its rescaling and the batch over the {n} "
                     f"devices of mesh axis {axis!r}, but got a batch of {x.shape[0]}: use a "
                     f"batch that is a multiple of {n}, or nnx.view(model, rescaling_axis=None).")
  if axis in mesh.explicit_axes:  # shard_map takes explicit-axis inputs as they are typed
    x = jax.sharding.reshard(x, PartitionSpec(axis))

  def local(raw, x):
    return _rescale_and_apply(layer, op, axis, jax.lax.pcast(raw, axis, to="varying"), x)

  return jax.shard_map(local, in_specs=(PartitionSpec(), PartitionSpec(axis)),
                       out_specs=PartitionSpec(axis), axis_names={axis})(raw, x)


def _rescale_and_apply(layer, op, axis_name: str | None, raw: jax.Array,
                       x: jax.Array) -> jax.Array:
  """``op(x, layer.rescale(raw, axis_name=axis_name))`` under a ``jax.checkpoint`` that
  saves everything but the rescaled kernel (a ``custom_vjp`` would break ``jax.jacfwd`` of
  the layer, which the exact-norm tests and users need)."""
  policy = jax.checkpoint_policies.save_anything_except_these_names(_RESCALED)

  def rescaled_op(raw, x):
    return op(x, checkpoint_name(layer.rescale(raw, axis_name=axis_name), _RESCALED))

  return jax.checkpoint(rescaled_op, policy=policy)(raw, x)
