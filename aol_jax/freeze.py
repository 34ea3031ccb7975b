"""Precompute the rescaled kernels once, for inference and certification."""

from __future__ import annotations

import jax
from flax import nnx

from aol_jax.layers import AOLConv, AOLDense, RescaledKernel


def freeze(model: nnx.Module) -> nnx.Module:
  """Returns a copy of ``model`` whose AOL layers hold their rescaled kernels.

  Each ``AOLDense`` / ``AOLConv`` in the copy stores ``rescale(P)`` as a
  :class:`~aol_jax.layers.RescaledKernel` (not an ``nnx.Param``), so a call costs what a
  plain dense / conv costs and optimisers over ``nnx.Param`` cannot move it off the bound.
  The original model is not modified. Outputs agree with ``model`` to float rounding.
  """
  frozen = nnx.clone(model)
  for _, layer in nnx.iter_modules(frozen):
    if isinstance(layer, (AOLDense, AOLConv)) and not isinstance(layer.kernel, RescaledKernel):
      # One compiled program per layer, not an op-by-op dispatch of the rescaling.
      layer.kernel = RescaledKernel(jax.jit(layer.rescale)(layer.kernel[...]))
  return frozen
