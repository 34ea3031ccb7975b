"""AOL rescaling as pure functions of arrays.

Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz
Networks", ECCV 2022; the ``q``-weighted form is the SLL generalisation of Araujo et al.,
ICLR 2023. Kernel layouts are Flax's: dense ``(in, out)``, conv ``(*spatial, in // g, out)``.

Every function here is jit-able and differentiable. The Gram matrix and the factors are
computed in float32 at least, whatever the parameter dtype; rescaled kernels come back in
the parameter dtype.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

GramMethod = Literal["conv", "taps"]
GRAM_METHODS: tuple[str, ...] = ("conv", "taps")
# Chosen by `python -m benchmarks.gram` (see the README's benchmark table).
DEFAULT_GRAM_METHOD: GramMethod = "taps"

_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype the rescaling is computed in: float32, or the parameter dtype if wider."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_kernel(kernel: jax.Array, min_ndim: int, max_ndim: int, what: str) -> None:
  if not min_ndim <= kernel.ndim <= max_ndim:
    raise ValueError(
        f"{what} kernel must have rank {min_ndim}..{max_ndim} "
        f"({'(*spatial, in, out)' if what == 'conv' else '(in, out)'}), got shape {kernel.shape}.")
  if 0 in kernel.shape:
    raise ValueError(f"{what} kernel has a zero-sized dimension: shape {kernel.shape}. "
                     "Every kernel dimension must be at least 1.")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"{what} kernel must be a floating-point array, got dtype {kernel.dtype}.")


def _check_groups(kernel: jax.Array, feature_group_count: int) -> None:
  if feature_group_count < 1 or kernel.shape[-1] % feature_group_count:
    raise ValueError(
        f"feature_group_count={feature_group_count} must be >= 1 and divide the kernel's "
        f"output channels ({kernel.shape[-1]}).")


def _conv_gram_selfconv(kernel: jax.Array) -> jax.Array:
  """Reference Gram: the kernel cross-correlated with itself by conv_general_dilated."""
  nd = kernel.ndim - 2
  ksize = kernel.shape[:nd]
  spatial = "DHW"[3 - nd:]
  # c_in becomes the batch axis, c_out the feature axis; the same kernel with its two
  # channel axes swapped is the filter (c_out features in, c_in features out).
  lhs = jnp.moveaxis(kernel, nd, 0)  # (in, *spatial, out)
  rhs = jnp.swapaxes(kernel, -1, -2)  # (*spatial, out, in)
  out = jax.lax.conv_general_dilated(
      lhs, rhs, window_strides=(1,) * nd, padding=[(k - 1, k - 1) for k in ksize],
      dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"), precision=_HIGHEST)
  return jnp.moveaxis(out, 0, nd)  # (*(2k-1), in, in)


@jax.custom_jvp
def _outer_gram(a: jax.Array) -> jax.Array:
  """``a @ a.T`` whose derivative is ``da a^T + (da a^T)^T``: one product, not two.

  Reverse mode transposes that tangent into ``(dG + dG^T) @ a``, one matmul where autodiff
  of ``a @ a.T`` forms two (``benchmarks/gram.py``: forward+backward 0.64x at 3x3 192
  channels, about 0.7x for dense 1024-3072). A ``custom_jvp`` rather than a ``custom_vjp``
  keeps forward mode (``jax.jacfwd``) working.
  """
  return jnp.matmul(a, a.T, precision=_HIGHEST)


@_outer_gram.defjvp
def _outer_gram_jvp(primals, tangents):
  (a,), (da,) = primals, tangents
  t = jnp.matmul(da, a.T, precision=_HIGHEST)
  return _outer_gram(a), t + t.T


def _conv_gram_taps(kernel: jax.Array) -> jax.Array:
  """The same Gram as one matrix product over all pairs of taps, skipping the zero padding.

  ``M[t, u] = K[t] K[u]^T`` (``(in, in)`` per pair of taps ``t, u``) is one matmul of the
  ``(taps * in, out)`` kernel with its transpose (:func:`_outer_gram`); the pair
  contributes to the offset ``s = t - u``, so ``G[s] = sum_{t - u = s} M[t, u]`` is a
  segment sum with static segment ids. Cost ``taps^2 * in^2 * out`` multiply-adds versus the
  self-convolution's ``taps * prod(2k - 1) * in^2 * out``, and one op to compile (not one
  per offset).
  """
  nd = kernel.ndim - 2
  ksize = kernel.shape[:nd]
  c_in, c_out = kernel.shape[-2:]
  taps = int(np.prod(ksize))
  # Rows (t, i) of the (taps * in, out) matrix, taps in row-major order; the product's
  # block (t, u) is M[t, u].
  pairs = _outer_gram(kernel.reshape(taps * c_in, c_out)).reshape(taps, c_in, taps, c_in)
  pairs = pairs.transpose(0, 2, 1, 3)  # (t, u, i, j)
  pos = np.array(list(np.ndindex(*ksize))).reshape(-1, nd)
  gram_shape = tuple(2 * k - 1 for k in ksize)
  offsets = (pos[:, None] - pos[None, :] + np.array(ksize) - 1).reshape(-1, nd)
  segment = np.ravel_multi_index(tuple(offsets.T), gram_shape)
  gram = jax.ops.segment_sum(pairs.reshape(-1, c_in, c_in), segment,
                             num_segments=int(np.prod(gram_shape)), indices_are_sorted=False)
  return gram.reshape(*gram_shape, c_in, c_in)


def conv_gram(kernel: ArrayLike, *, feature_group_count: int = 1,
              method: GramMethod | None = None) -> jax.Array:
  """Gram kernel of a convolution: the kernel convolved with itself.

  ``G[s, i, j] = sum_{p, o} K[p + s, i, o] * K[p, j, o]`` for every offset ``s`` in
  ``[-(k-1), k-1]`` per spatial dim, so ``sum_{s, j} |G[s, i, j]|`` bounds the row sums of
  the conv operator's ``|A^T A|``.

  Args:
    kernel: ``(*spatial, in // g, out)`` with 1, 2 or 3 spatial dims.
    feature_group_count: ``g``; each group's Gram is computed on its own.
    method: ``'conv'`` (self-convolution by ``jax.lax.conv_general_dilated``, the reference)
      or ``'taps'`` (one matmul per tap offset). ``None`` takes ``DEFAULT_GRAM_METHOD``.

  Returns:
    ``(*(2k - 1), in // g, in // g)`` in the compute dtype for ``g == 1``, and with a
    leading group axis ``(g, *(2k - 1), in // g, in // g)`` for ``g > 1``.

  Example:
    >>> conv_gram(jnp.ones((3, 3, 2, 4))).shape
    (5, 5, 2, 2)
  """
  kernel = jnp.asarray(kernel)
  _check_kernel(kernel, 3, 5, "conv")
  _check_groups(kernel, feature_group_count)
  method = DEFAULT_GRAM_METHOD if method is None else method
  if method not in GRAM_METHODS:
    raise ValueError(f"Unknown Gram method {method!r}; choose one of {GRAM_METHODS}.")
  fn = _conv_gram_selfconv if method == "conv" else _conv_gram_taps
  kernel = kernel.astype(compute_dtype(kernel.dtype))
  if feature_group_count == 1:
    return fn(kernel)
  g = feature_group_count
  grouped = kernel.reshape(*kernel.shape[:-1], g, kernel.shape[-1] // g)
  return jax.vmap(fn, in_axes=-2)(grouped)


def _factors_from_gram(gram: jax.Array, q: ArrayLike | None, eps: float) -> jax.Array:
  """``d_i = (sum_{s, j} |G[s, i, j]| q_j / q_i + eps) ** -1/2``; ``G`` is ``(*offsets, in, in)``.

  The sum runs over the offsets and the LAST axis ``j``; ``i`` (the second-to-last axis)
  indexes the factor.
  """
  absg = jnp.abs(gram).sum(axis=tuple(range(gram.ndim - 2)))  # (in, in): sum_s |G[s, i, j]|
  if q is None:
    sums = absg.sum(axis=-1)
  else:
    sums = jnp.matmul(absg, q, precision=_HIGHEST) / q
  return jax.lax.rsqrt(sums + eps)


def _check_q(q: ArrayLike | None, n: int) -> jax.Array | None:
  if q is None:
    return None
  q = jnp.asarray(q)
  if q.shape != (n,):
    raise ValueError(f"q must be a vector with one weight per input feature, shape ({n},); "
                     f"got shape {q.shape}.")
  if not isinstance(q, jax.core.Tracer) and not bool(jnp.all(q > 0)):
    raise ValueError("q must be strictly positive (the SLL bound divides by q); "
                     f"got min(q) = {float(jnp.min(q))}.")
  return q


def dense_factors(kernel: ArrayLike, *, q: ArrayLike | None = None,
                  eps: float = 1e-6) -> jax.Array:
  """AOL factors of a dense kernel ``P`` of shape ``(in, out)``.

  ``d_i = (sum_j |P P^T|_ij q_j / q_i + eps) ** -1/2``, one per input feature; ``q=None``
  means ``q = 1`` (AOL, Theorem 1). ``diag(d) @ P`` has spectral norm <= 1 for every ``P``.

  Example:
    >>> dense_factors(jnp.eye(3))  # orthogonal kernels keep factor 1
    Array([0.9999995, 0.9999995, 0.9999995], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  _check_kernel(kernel, 2, 2, "dense")
  q = _check_q(q, kernel.shape[0])
  p = kernel.astype(compute_dtype(kernel.dtype))
  gram = _outer_gram(p)
  return _factors_from_gram(gram, None if q is None else q.astype(p.dtype), eps)


def conv_factors(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                 feature_group_count: int = 1, method: GramMethod | None = None) -> jax.Array:
  """AOL factors of a conv kernel ``K`` of shape ``(*spatial, in // g, out)``.

  ``d_i = (sum_{s, j} |G[s, i, j]| q_j / q_i + eps) ** -1/2`` with ``G = conv_gram(K)``
  (Theorem 2). With ``g`` groups the conv is block-diagonal and each group is rescaled on
  its own.

  Returns:
    ``(in,)`` factors, input channel ``c = group * (in // g) + i``.
  """
  kernel = jnp.asarray(kernel)
  _check_kernel(kernel, 3, 5, "conv")
  _check_groups(kernel, feature_group_count)
  g = feature_group_count
  q = _check_q(q, kernel.shape[-2] * g)
  gram = conv_gram(kernel, feature_group_count=g, method=method)
  if g == 1:
    return _factors_from_gram(gram, None if q is None else q.astype(gram.dtype), eps)
  qg = None if q is None else q.astype(gram.dtype).reshape(g, -1)
  per_group = jax.vmap(lambda gr, qq: _factors_from_gram(gr, qq, eps),
                       in_axes=(0, None if qg is None else 0))(gram, qg)
  return per_group.reshape(-1)


def rescale_dense(kernel: ArrayLike, *, q: ArrayLike | None = None,
                  eps: float = 1e-6) -> jax.Array:
  """``diag(d) @ P``: the 1-Lipschitz dense kernel, in the dtype of ``kernel``."""
  kernel = jnp.asarray(kernel)
  d = dense_factors(kernel, q=q, eps=eps)
  return (kernel.astype(d.dtype) * d[:, None]).astype(kernel.dtype)


def rescale_conv(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                 feature_group_count: int = 1,
                 method: GramMethod | None = None) -> jax.Array:
  """``K * d`` per input channel: the 1-Lipschitz conv kernel, in the dtype of ``kernel``."""
  kernel = jnp.asarray(kernel)
  d = conv_factors(kernel, q=q, eps=eps, feature_group_count=feature_group_count,
                   method=method)
  g = feature_group_count
  c_in_g, c_out = kernel.shape[-2:]
  # Factor of (i, o): group of o is o // (c_out // g), input channel is group * c_in_g + i.
  scale = d.reshape(g, c_in_g).T  # (c_in_g, g)
  scale = jnp.repeat(scale, c_out // g, axis=1)  # (c_in_g, c_out)
  return (kernel.astype(d.dtype) * scale).astype(kernel.dtype)

