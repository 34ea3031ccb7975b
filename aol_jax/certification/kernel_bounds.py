"""The one place that bounds the spectral norm of the kernel a layer actually applies.

After :func:`aol_jax.freeze` a layer applies a stored kernel, rounded to its dtype (bfloat16
rounding can push an AOL kernel's norm above 1). Every certificate of a frozen layer uses
:func:`applied_kernel_bound`; a tighter sound bound replaces it here, in one place.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flax import nnx

from aol_jax.certification import worst_case


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
  ``(*k, in // g, out)``, with ``feature_group_count``). The bound is the float64 Schur
  (row-sum) test with its own rounding error, :func:`aol_jax.certification.worst_case.
  dense_kernel_norm_bound` / ``conv_kernel_norm_bound``: valid for any input size, stride,
  dilation, zero or circular padding.
  """
  kernel = applied_kernel(layer)
  groups = 1 if kernel.ndim == 2 else layer.feature_group_count
  # Keyed by the kernel's bytes: the same kernel always gets the same bound, computed once.
  key = (kernel.shape, groups, hashlib.sha256(kernel.tobytes()).hexdigest())
  if key not in _BOUNDS:
    if len(_BOUNDS) > 4096:
      _BOUNDS.clear()
    _BOUNDS[key] = (worst_case.dense_kernel_norm_bound(kernel) if kernel.ndim == 2 else
                    worst_case.conv_kernel_norm_bound(kernel, feature_group_count=groups))
  return _BOUNDS[key]


_BOUNDS: dict = {}
