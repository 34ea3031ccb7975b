"""An AOL layer's call on its raw kernel: rescale, then apply; whole, or split over a mesh axis.

The layer's static attribute ``scaled_operand`` (set with ``nnx.view``, see
:meth:`aol_jax.AOLConv.set_view`) decides what the factors ``d`` multiply: ``'kernel'``
applies the rescaled kernel; ``'input'`` scales the input's features and applies the raw
kernel, the same map (``d`` scales the kernel's input features, the last axis of a dense
and a conv layer's input alike), without forming the rescaled kernel; ``'smaller'`` takes
the input where it has at most :data:`INPUT_TO_KERNEL` times the kernel's elements (the
input as the call sees it: per device when the factors are split), the kernel elsewhere. A
kernel narrower than float32 (bfloat16 parameters) is always scaled itself: its rescaled
kernel is rounded to its dtype (the kernel :meth:`~aol_jax.AOLDense.applied_kernel` states
a bound for), which scaling the input would not reproduce.

Its static attribute ``rescaling_axis`` (set with ``nnx.view(model,
rescaling_axis='data')``) decides where the factors are computed. ``None``: every
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

from aol_jax._src.gram import compute_dtype

_RESCALED = "aol_rescaled_kernel"
# What an unfrozen layer's call multiplies by the factors (AOLDense.set_view).
SCALED_OPERANDS = ("kernel", "input", "smaller")
# 'smaller' scales the input up to this many times the kernel's size. Measured on AOL-Small's
# train step for TPU v5e 2x4 (per-device peak / plain, benchmarks/README.md): at 32 examples
# per device its 3x3 convolutions' inputs are 1.2 kernels, and scaling every layer's input
# gives 1.21 (all kernels 1.54); at 256 they are 9.5 kernels, and the input scaled where it
# is at most 2 kernels (the dense layers) gives 1.08 (all kernels 1.11, all inputs 1.47).
INPUT_TO_KERNEL = 2


def apply_rescaled(layer, op: Callable[[jax.Array, jax.Array], jax.Array], raw: jax.Array,
                   x: jax.Array) -> jax.Array:
  """``op(x, layer.rescale(raw))``, or ``op(x * d, raw)`` as ``layer.scaled_operand`` says,
  split over ``layer.rescaling_axis`` if it names one.

  Split over an axis of ``n > 1`` devices, ``axis_name=`` is passed to ``layer.rescale``,
  which splits the rescaling's work. One ``pcast`` of the raw kernel to varying serves both
  of its uses, so its transpose is the single ``psum`` of the gradient, over the batch
  shares and the rescaling's rows together.

  With ``layer.scaled_operand == 'kernel'`` the rescaled kernel is not kept for the
  backward pass: it is recomputed there from the raw kernel and the factors (one elementwise
  product). With ``'input'`` no kernel-sized product is formed: the scaled input, the size
  of the batch's activations, is kept instead; where the compiler fuses the scaling into the
  layer's product and the batch per device is small (a TPU), that holds least: AOL-Small's
  train step on v5e 2x4, per-device peak over plain 1.54 -> 1.21 (``benchmarks/README.md``).

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
  """``op(x * d, raw)`` for ``scaled_operand == 'input'``; for ``'kernel'``,
  ``op(x, layer.rescale(raw, axis_name=axis_name))`` under a ``jax.checkpoint`` that saves
  everything but the rescaled kernel (a ``custom_vjp`` would break ``jax.jacfwd`` of the
  layer, which the exact-norm tests and users need)."""
  mode = layer.scaled_operand
  if mode not in SCALED_OPERANDS:
    raise ValueError(f"{type(layer).__name__}.scaled_operand is {mode!r}; it must be one of "
                     f"{SCALED_OPERANDS}: set it with nnx.view(model, scaled_operand=...).")
  if raw.dtype != compute_dtype(raw.dtype):  # rescaled, then rounded to raw's dtype
    mode = "kernel"
  elif mode == "smaller":
    mode = "input" if x.size <= INPUT_TO_KERNEL * raw.size else "kernel"
  if mode == "input":  # d in raw's dtype: x * d promotes as x with raw would
    return op(x * layer.factors(raw, axis_name=axis_name), raw)
  policy = jax.checkpoint_policies.save_anything_except_these_names(_RESCALED)

  def rescaled_op(raw, x):
    return op(x, checkpoint_name(layer.rescale(raw, axis_name=axis_name), _RESCALED))

  return jax.checkpoint(rescaled_op, policy=policy)(raw, x)
