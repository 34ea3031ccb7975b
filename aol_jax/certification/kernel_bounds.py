"""The one place that bounds the spectral norm of the kernel a layer actually applies.

After :func:`aol_jax.freeze` a layer applies a stored kernel, rounded to its dtype (bfloat16
rounding can push an AOL kernel's norm above 1). Every certificate of a frozen layer, in both
rounding modes, uses :func:`applied_kernel_bound`: the tight rigorous bounds of
:mod:`aol_jax.spectral_bounds`, never above the AOL row-sum (Schur) bound. The rescaling
guarantees ``||T|| <= 1``; the frozen kernel's own norm is usually well below (0.66 to 0.9 for
trained AOL convs), and every certificate gains from it.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flax import nnx

from aol_jax import spectral_bounds


def applied_kernel(layer: nnx.Module) -> np.ndarray:
  """The kernel ``layer`` applies, as float64: the frozen one, or its rescaling now."""
  import jax  # noqa: PLC0415  (only for the rescaling of an unfrozen layer)

  from aol_jax.layers import RescaledKernel  # noqa: PLC0415  (layers import this package)
  if isinstance(layer.kernel, RescaledKernel):
    value = layer.kernel[...]
  else:
    value = jax.jit(lambda k: layer.rescale(k, gram_precision="highest"))(layer.kernel[...])
  kernel = np.asarray(value, np.float64)
  if not np.all(np.isfinite(kernel)):
    raise ValueError(f"{type(layer).__name__} applies a kernel with non-finite entries (a zero "
                     "row rescaled with eps=0?); no Lipschitz bound can be stated for it.")
  return kernel


def applied_kernel_bound(layer: nnx.Module) -> float:
  """A rigorous upper bound on the l2 operator norm of the kernel ``layer`` applies.

  ``layer`` is an ``AOLDense`` (kernel ``(in, out)``) or an ``AOLConv`` (kernel
  ``(*k, in // g, out)``, with ``feature_group_count``). The bound is
  :func:`aol_jax.spectral_bounds.dense_norm_bound` (within about ``1e-5`` of the exact
  norm) or :func:`~aol_jax.spectral_bounds.conv_norm_bound` with the layer's padding,
  strides, dilation and groups (valid for any input size; within 10 % of the sup of the
  symbol for a 192-wide 3x3 kernel at the default budget, within 1.02 % for narrow ones).
  Both are rigorous in float64 (their own rounding included) and never above the AOL
  row-sum (Schur) bound of :mod:`aol_jax.certification.worst_case`, so this never states
  more than before. Computed once per distinct kernel (cached by its bytes and the conv's
  geometry).
  """
  kernel = applied_kernel(layer)
  if kernel.ndim == 2:
    geometry = ()
  else:
    geometry = (tuple(layer.strides), tuple(layer.kernel_dilation), layer.feature_group_count,
                repr(layer.padding))
  # Keyed by the kernel's bytes: the same kernel always gets the same bound, computed once.
  key = (kernel.shape, geometry, hashlib.sha256(kernel.tobytes()).hexdigest())
  if key not in _BOUNDS:
    if len(_BOUNDS) > 4096:
      _BOUNDS.clear()
    if kernel.ndim == 2:
      _BOUNDS[key] = spectral_bounds.dense_norm_bound(kernel)
    else:
      _BOUNDS[key] = spectral_bounds.conv_norm_bound(
          kernel, strides=tuple(layer.strides), kernel_dilation=tuple(layer.kernel_dilation),
          feature_group_count=layer.feature_group_count, padding=layer.padding)
  return _BOUNDS[key]


_BOUNDS: dict = {}
