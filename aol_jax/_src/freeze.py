"""Precompute the rescaled kernels once, for inference and certification."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from aol_jax._src import checks
from aol_jax._src.layers import AOLConv, AOLDense, RescaledKernel


def _narrower(dtype, than) -> bool:
  return (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
          and jnp.finfo(dtype).bits < jnp.finfo(than).bits)


def freeze(model: nnx.Module, *, dtype: Dtype | None = None) -> nnx.Module:
  """Returns a copy of ``model`` whose AOL layers hold their rescaled kernels.

  Each ``AOLDense`` / ``AOLConv`` in the copy stores ``rescale(P)`` as a
  :class:`~aol_jax.layers.RescaledKernel` (not an ``nnx.Param``), so a call costs what a
  plain dense / conv costs and optimisers over ``nnx.Param`` cannot move it off the bound.
  The original model is not modified. Outputs agree with ``model`` to float rounding.

  Args:
    model: any module; its AOL layers are frozen, trained or already frozen.
    dtype: a floating dtype (certification passes float32) that the copy computes in at
      least: every floating-point variable narrower than it is cast up *before* the
      rescaling (so a bfloat16 raw kernel is rescaled in float32 and kept in float32), and
      every module's compute ``dtype`` attribute narrower than it is cleared (the
      ``nnx.Linear`` convention: ``None`` computes in the parameters' dtype). ``None``
      keeps every dtype as it is.
  """
  checks.nnx_module(model, "freeze(model)")
  frozen = nnx.clone(model)
  if dtype is not None:
    widen = lambda a: a.astype(dtype) if _narrower(a.dtype, dtype) else a
    nnx.update(frozen, jax.tree.map(widen, nnx.state(frozen)))
    for _, module in nnx.iter_modules(frozen):
      if _narrower(getattr(module, "dtype", None), dtype):
        module.dtype = None
  for _, layer in nnx.iter_modules(frozen):
    if isinstance(layer, (AOLDense, AOLConv)) and not isinstance(layer.kernel, RescaledKernel):
      # float32 at 'highest' whatever the layer's training-time gram_precision.
      layer.kernel = RescaledKernel(layer.applied_kernel(gram_precision="highest"))
  return frozen
