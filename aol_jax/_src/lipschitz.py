"""Independent measurements of Lipschitz constants, used to check the AOL bound.

``operator_norm`` is exact (an SVD of the explicit matrix, small sizes only);
``power_iteration`` estimates the local Jacobian norm of any function (a lower bound on its
Lipschitz constant); ``circular_conv_singular_values`` gives every singular value of a
circular convolution via the FFT (Sedghi, Gupta & Long, ICLR 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def explicit_matrix(f: Callable[[jax.Array], jax.Array], input_shape: Sequence[int],
                    dtype=jnp.float64) -> np.ndarray:
  """The Jacobian of ``f`` at zero as a float64 ``(out_size, in_size)`` matrix.

  For an affine ``f`` this is exactly its linear part: each column is ``f`` applied to a
  unit vector by forward-mode differentiation, so no finite-difference error enters. By
  default it is computed in float64 (inside ``jax.enable_x64``; float32 parameters are
  promoted exactly), so an entry that sums several coefficients (a circular conv whose
  kernel wraps around a smaller input) is exact too, up to float64 rounding. ``f`` must be
  jit-able: the whole Jacobian is one compiled program.
  """
  shape = tuple(input_shape)
  with jax.enable_x64(jnp.dtype(dtype) == jnp.float64):
    # The zeros made on the host: on the device they would be programs of their own.
    x0 = np.zeros(math.prod(shape), jnp.dtype(dtype))
    flat = lambda v: f(v.reshape(shape)).reshape(-1)
    jac = jax.jit(jax.jacfwd(flat))(x0)
    return np.asarray(jac, dtype=np.float64)


def operator_norm(f: Callable[[jax.Array], jax.Array], input_shape: Sequence[int],
                  dtype=jnp.float64) -> float:
  """Exact spectral norm (l2 -> l2) of the linear map ``f`` on inputs of ``input_shape``."""
  mat = explicit_matrix(f, input_shape, dtype)
  return float(np.linalg.svd(mat, compute_uv=False)[0]) if mat.size else 0.0


def power_iteration(f: Callable[[jax.Array], jax.Array], x: jax.Array, num_iters: int = 50,
                    *, key: jax.Array | None = None) -> jax.Array:
  """Largest singular value of the Jacobian of ``f`` at ``x``, by power iteration on J^T J.

  Uses one jvp and one vjp per iteration; returns ``||J v||`` for the final unit ``v``,
  which is a lower bound on the local (hence the global) Lipschitz constant of ``f``.
  """
  key = jax.random.key(0) if key is None else key
  v = jax.random.normal(key, x.shape, x.dtype)
  v = v / jnp.linalg.norm(v)
  _, vjp = jax.vjp(f, x)

  def step(v, _):
    _, jv = jax.jvp(f, (x,), (v,))
    (jtjv,) = vjp(jv)
    return jtjv / (jnp.linalg.norm(jtjv) + 1e-30), None

  v, _ = jax.lax.scan(step, v, None, length=num_iters)
  _, jv = jax.jvp(f, (x,), (v,))
  return jnp.linalg.norm(jv)


def circular_conv_singular_values(kernel: jax.Array, input_shape: Sequence[int]) -> np.ndarray:
  """All singular values of the stride-1 circular conv with ``kernel`` on ``input_shape``.

  ``kernel`` is ``(*spatial, in, out)``; ``input_shape`` the spatial size. Taps that wrap
  around (kernel larger than the input) are summed, as the circular conv sums them. Returns
  ``prod(input_shape) * min(in, out)`` values, sorted descending.
  """
  kernel = np.asarray(kernel, np.float64)
  nd = kernel.ndim - 2
  if len(input_shape) != nd:
    raise ValueError(f"input_shape {tuple(input_shape)} must have {nd} spatial dims.")
  folded = np.zeros((*input_shape, *kernel.shape[-2:]))
  for tap in np.ndindex(*kernel.shape[:nd]):
    folded[tuple(t % n for t, n in zip(tap, input_shape))] += kernel[tap]
  transfer = np.fft.fftn(folded, axes=tuple(range(nd)))  # (*n, in, out)
  sv = np.linalg.svd(transfer.reshape(-1, *kernel.shape[-2:]), compute_uv=False)
  return np.sort(sv.reshape(-1))[::-1]
