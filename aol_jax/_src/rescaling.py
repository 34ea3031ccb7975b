"""AOL rescaling as pure functions of arrays: the public API.

Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz
Networks", ECCV 2022; the ``q``-weighted form is the SLL generalisation of Araujo et al.,
ICLR 2023. Kernel layouts are Flax's: dense ``(in, out)``, conv ``(*spatial, in // g, out)``.

Every function here is jit-able and differentiable; called eagerly, the rescalings, factors
and Grams each run as one compiled program per shape and setting. The Gram matrix and the
factors are computed in float32 at least, whatever the parameter dtype; rescaled kernels
come back in the parameter dtype. The Gram products run at ``gram_precision`` (a key of
:data:`GRAM_PRECISIONS`; ``'highest'`` here, ``'default'`` in the layers' training path).

The Gram and the offset table are :mod:`aol_jax.gram`'s; the factors with ``q = None`` have
the hand-written derivative of :mod:`aol_jax.factors`, which ``axis_name`` (inside a
``jax.shard_map`` over that axis) splits over the axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from aol_jax._src import factors as factors_lib
from aol_jax._src.gram import (DEFAULT_GRAM_METHOD, GRAM_METHODS, GRAM_PRECISIONS, GramMethod,
                          GramPrecision, check_groups, check_kernel, check_method,
                          check_precision, check_positive_q, compute_dtype, conv_gram,
                          dense_gram, dot, one_program_when_eager)

__all__ = ["DEFAULT_GRAM_METHOD", "GRAM_METHODS", "GRAM_PRECISIONS", "GramMethod",
           "GramPrecision", "compute_dtype", "conv_factors", "conv_gram", "dense_factors",
           "rescale_conv", "rescale_dense"]


def _factors_from_gram(gram: jax.Array, q: jax.Array, eps: float, precision: str) -> jax.Array:
  """``d_i = (sum_{s, j} |G[s, i, j]| q_j / q_i + eps) ** -1/2``; ``G`` is ``(*offsets, in, in)``.

  The sum runs over the offsets and the LAST axis ``j``; ``i`` (the second-to-last axis)
  indexes the factor.
  """
  absg = jnp.abs(gram).sum(axis=tuple(range(gram.ndim - 2)))  # (in, in): sum_s |G[s, i, j]|
  return jax.lax.rsqrt(dot(absg, q[:, None], precision)[:, 0] / q + eps)


def _dense_gram_factors(p: jax.Array, q: jax.Array, *, eps: float, precision: str
                        ) -> jax.Array:
  return _factors_from_gram(dense_gram(p, gram_precision=precision), q.astype(p.dtype), eps,
                            precision)


def _conv_gram_factors(kernel: jax.Array, q: jax.Array | None, *, eps: float, groups: int,
                       method: str, precision: str) -> jax.Array:
  gram = conv_gram(kernel, feature_group_count=groups, method=method, gram_precision=precision)
  gram = gram.reshape((groups,) + gram.shape[-(kernel.ndim):])  # (g, *offsets, in/g, in/g)
  qg = jnp.ones((groups, kernel.shape[-2]), gram.dtype) if q is None else q.astype(
      gram.dtype).reshape(groups, -1)
  return jax.vmap(lambda gr, qq: _factors_from_gram(gr, qq, eps, precision))(gram, qg).reshape(-1)


def _check_q(q: ArrayLike | None, n: int) -> jax.Array | None:
  if q is None:
    return None
  q = jnp.asarray(q)
  if q.shape != (n,):
    raise ValueError(f"q must be a vector with one weight per input feature, shape ({n},); "
                     f"got shape {q.shape}.")
  if not isinstance(q, jax.core.Tracer):
    check_positive_q(q)
  return q


def _vary_like(d: jax.Array, kernel: jax.Array) -> jax.Array:
  """``d`` made varying over the ``shard_map`` axes ``kernel`` varies over, so that the
  transpose of that cast (a ``psum`` of ``d``'s cotangent) acts on the ``(in,)`` vector and
  not on a kernel-sized broadcast of it."""
  missing = tuple(sorted(jax.typeof(kernel).manual_axis_type.varying
                         - jax.typeof(d).manual_axis_type.varying))
  return jax.lax.pcast(d, missing, to="varying") if missing else d


@one_program_when_eager
def dense_factors(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                  gram_precision: GramPrecision = "highest",
                  axis_name: str | None = None) -> jax.Array:
  """AOL factors of a dense kernel ``P`` of shape ``(in, out)``.

  ``d_i = (sum_j |P P^T|_ij q_j / q_i + eps) ** -1/2``, one per input feature; ``q=None``
  means ``q = 1`` (AOL, Theorem 1). ``diag(d) @ P`` has spectral norm <= 1 for every ``P``.

  Args:
    kernel: ``P``, ``(in, out)``.
    q: optional positive weights ``(in,)`` (SLL generalisation); ``None`` is AOL.
    eps: stabiliser added to each row sum.
    gram_precision: the precision of the Gram products, a key of :data:`GRAM_PRECISIONS`.
    axis_name: with ``q=None``, called inside a ``jax.shard_map`` over this mesh axis (size
      ``n``): each device forms ``1/n`` of ``P P^T``'s blocks on and above the diagonal
      forward, and ``1/n`` of the backward's product; the result is the same. The
      kernel's cotangent is this device's share, completed by the
      ``psum`` that transposes the kernel's ``jax.lax.pcast`` to varying (made here if the
      kernel is invariant), the same ``psum`` that sums the gradients of the devices' batch
      shares (:mod:`aol_jax._src.factors`).

  Example:
    >>> dense_factors(jnp.eye(3)).round(4)  # orthogonal kernels keep factor (1 + eps)^-1/2
    Array([1., 1., 1.], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  check_kernel(kernel, 2, 2, "dense")
  q = _check_q(q, kernel.shape[0])
  precision = check_precision(gram_precision)
  p = kernel.astype(compute_dtype(kernel.dtype))
  if q is None:
    return factors_lib.factors(p, (), float(eps), precision, axis_name)
  return _dense_gram_factors(p, q, eps=float(eps), precision=precision)


@one_program_when_eager
def conv_factors(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                 feature_group_count: int = 1, method: GramMethod | None = None,
                 gram_precision: GramPrecision = "highest",
                 axis_name: str | None = None) -> jax.Array:
  """AOL factors of a conv kernel ``K`` of shape ``(*spatial, in // g, out)``.

  ``d_i = (sum_{s, j} |G[s, i, j]| q_j / q_i + eps) ** -1/2`` with ``G = conv_gram(K)``
  (Theorem 2). With ``g`` groups the conv is block-diagonal and each group is rescaled on
  its own.

  Args:
    kernel: ``K``, ``(*spatial, in // g, out)`` with 1, 2 or 3 spatial dims.
    q: optional positive weights ``(in,)`` (SLL generalisation); ``None`` is AOL.
    eps: stabiliser added to each row sum.
    feature_group_count: ``g``.
    method: the Gram formulation (see :func:`conv_gram`). ``'taps'`` with ``q=None`` takes
      the path with the hand-written derivative that keeps only ``sign(G)``, and that
      ``axis_name`` splits; ``'conv'`` (the reference) and ``q`` are differentiated by autodiff.
    gram_precision: the precision of the Gram products, a key of :data:`GRAM_PRECISIONS`.
    axis_name: with the ``'taps'`` Gram and ``q=None``, inside a ``jax.shard_map`` over this
      axis, split each group's Gram rows (input channels) over it, as :func:`dense_factors`
      does; the result is the same.

  Returns:
    ``(in,)`` factors, input channel ``c = group * (in // g) + i``.

  Example:
    >>> conv_factors(jnp.ones((1, 1, 2, 2))).round(4)  # |G| row sums 4: d = 1/2
    Array([0.5, 0.5], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  check_kernel(kernel, 3, 5, "conv")
  check_groups(kernel, feature_group_count)
  g = feature_group_count
  q = _check_q(q, kernel.shape[-2] * g)
  method = check_method(method)
  precision = check_precision(gram_precision)
  if q is None and method == "taps":
    k = kernel.astype(compute_dtype(kernel.dtype))
    ksize = k.shape[:-2]

    one = lambda kg: factors_lib.factors(kg, ksize, float(eps), precision, axis_name)
    if g == 1:
      return one(k)
    return jax.vmap(one, in_axes=-2)(k.reshape(*k.shape[:-1], g, k.shape[-1] // g)).reshape(-1)
  return _conv_gram_factors(kernel, q, eps=float(eps), groups=g, method=method,
                            precision=precision)


@one_program_when_eager
def rescale_dense(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                  gram_precision: GramPrecision = "highest",
                  axis_name: str | None = None) -> jax.Array:
  """The 1-Lipschitz dense kernel ``diag(d) @ P`` (AOL, Theorem 1), in the dtype of ``kernel``.

  ``d_i = (sum_j |P P^T|_ij q_j / q_i + eps) ** -1/2`` (:func:`dense_factors`) scales row
  ``i`` (input feature ``i``) of ``P``; then ``||x @ (diag(d) P)||_2 <= ||x||_2`` for every
  ``P``. Prach & Lampert, ECCV 2022, Theorem 1; with ``q`` the SLL bound of Araujo et al.,
  ICLR 2023.

  Args:
    kernel: ``P``, ``(in, out)`` (Flax's dense layout), any floating dtype.
    q: optional positive weights ``(in,)``; ``None`` means ``q = 1`` (AOL).
    eps: stabiliser inside the factor.
    gram_precision: the precision of the Gram products (see :data:`GRAM_PRECISIONS`).
    axis_name: inside a ``jax.shard_map`` over this axis, split the Gram work over it (see
      :func:`dense_factors`); the result does not change.

  Returns:
    ``diag(d) @ P``, shape and dtype of ``kernel``.

  Example:
    >>> rescale_dense(2 * jnp.eye(2)).round(4)  # twice an orthogonal matrix becomes it
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  d = dense_factors(kernel, q=q, eps=eps, gram_precision=gram_precision,
                    axis_name=axis_name)
  return scale_dense(kernel, d)


def scale_dense(kernel: jax.Array, d: jax.Array) -> jax.Array:
  """``diag(d) @ kernel`` in ``kernel``'s dtype (``d`` from :func:`dense_factors`)."""
  d = _vary_like(d, kernel)
  return (kernel.astype(d.dtype) * d[:, None]).astype(kernel.dtype)


@one_program_when_eager
def rescale_conv(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                 feature_group_count: int = 1, method: GramMethod | None = None,
                 gram_precision: GramPrecision = "highest",
                 axis_name: str | None = None) -> jax.Array:
  """The 1-Lipschitz conv kernel ``K[..., i, o] * d_i`` (AOL, Theorem 2), in ``kernel``'s dtype.

  ``d_i = (sum_{s, j} |G[s, i, j]| q_j / q_i + eps) ** -1/2`` with ``G`` the kernel
  convolved with itself (:func:`conv_gram`, :func:`conv_factors`) scales input channel
  ``i``; the convolution with the rescaled kernel is 1-Lipschitz in l2 for zero or circular
  padding, any input size, stride and dilation. Prach & Lampert, ECCV 2022, Theorem 2;
  with ``q`` the SLL bound of Araujo et al., ICLR 2023. With ``g`` groups each group's
  input channels are rescaled by that group's Gram.

  Args:
    kernel: ``K``, ``(*spatial, in // g, out)`` (Flax's conv layout), 1-3 spatial dims.
    q: optional positive weights ``(in,)``; ``None`` means ``q = 1`` (AOL).
    eps: stabiliser inside the factor.
    feature_group_count: ``g``.
    method: Gram formulation, ``'taps'`` or ``'conv'`` (see :func:`conv_gram`).
    gram_precision: the precision of the Gram products (see :data:`GRAM_PRECISIONS`).
    axis_name: inside a ``jax.shard_map`` over this axis, split the Gram work over it (see
      :func:`conv_factors`); the result does not change.

  Returns:
    The rescaled kernel, shape and dtype of ``kernel``.

  Example:
    >>> rescale_conv(jnp.ones((1, 1, 2, 2)))[0, 0].round(4)  # every channel scaled by 1/2
    Array([[0.5, 0.5],
           [0.5, 0.5]], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  d = conv_factors(kernel, q=q, eps=eps, feature_group_count=feature_group_count,
                   method=method, gram_precision=gram_precision, axis_name=axis_name)
  return scale_conv(kernel, d, feature_group_count)


def scale_conv(kernel: jax.Array, d: jax.Array, feature_group_count: int = 1) -> jax.Array:
  """``K[..., i, o] * d_c`` in ``kernel``'s dtype, ``c`` the input channel of ``(i, o)``'s
  group (``d`` from :func:`conv_factors`)."""
  d = _vary_like(d, kernel)
  g = feature_group_count
  c_in_g, c_out = kernel.shape[-2:]
  # Factor of (i, o): group of o is o // (c_out // g), input channel is group * c_in_g + i.
  scale = d.reshape(g, c_in_g).T  # (c_in_g, g)
  scale = jnp.repeat(scale, c_out // g, axis=1)  # (c_in_g, c_out)
  return (kernel.astype(d.dtype) * scale).astype(kernel.dtype)
