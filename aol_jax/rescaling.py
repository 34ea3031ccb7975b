"""AOL rescaling as pure functions of arrays.

Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz
Networks", ECCV 2022; the ``q``-weighted form is the SLL generalisation of Araujo et al.,
ICLR 2023. Kernel layouts are Flax's: dense ``(in, out)``, conv ``(*spatial, in // g, out)``.

Every function here is jit-able and differentiable. The Gram matrix and the factors are
computed in float32 at least, whatever the parameter dtype; rescaled kernels come back in
the parameter dtype.

The factors (``q = None``) have a hand-written reverse-mode derivative (:func:`_factors`):
it keeps only the signs of the Gram matrix (int8) for the backward pass, and with a
``mesh`` each device computes the Gram rows of its share of the input features, forward
and backward, and the results are gathered (:mod:`aol_jax.sharding` explains when).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jax.typing import ArrayLike, DTypeLike

GramMethod = Literal["conv", "taps"]
GRAM_METHODS: tuple[str, ...] = ("conv", "taps")
# Chosen by `python -m benchmarks.gram` (see the README's benchmark table).
DEFAULT_GRAM_METHOD: GramMethod = "taps"

_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype: DTypeLike) -> jnp.dtype:
  """The dtype the rescaling is computed in: float32, or the parameter dtype if wider.

  Example:
    >>> compute_dtype(jnp.bfloat16)
    dtype('float32')
  """
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
      or ``'taps'`` (one GEMM of the ``(taps * in, out)`` kernel with its transpose, over all
      pairs of taps, then a sum of each pair's block into its offset).
      ``None`` takes ``DEFAULT_GRAM_METHOD``.

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


def _offset_table(ksize: tuple[int, ...]) -> tuple[np.ndarray, int]:
  """Offset index of each pair of taps ``(t, u)`` (row-major taps) and the offset count.

  Pair ``(t, u)`` contributes ``K[t] K[u]^T`` to the Gram at offset ``pos[t] - pos[u]``;
  offsets are numbered row-major over ``[-(k - 1), k - 1]`` per spatial dim. A dense kernel
  (``ksize == ()``) has one tap and one offset.
  """
  if not ksize:
    return np.zeros((1, 1), np.int32), 1
  nd = len(ksize)
  pos = np.array(list(np.ndindex(*ksize))).reshape(-1, nd)
  gram_shape = tuple(2 * k - 1 for k in ksize)
  offsets = pos[:, None] - pos[None, :] + np.array(ksize) - 1  # (taps, taps, nd)
  table = np.ravel_multi_index(tuple(np.moveaxis(offsets, -1, 0)), gram_shape)
  return table.astype(np.int32), int(np.prod(gram_shape))


def _gram_rows(rows: jax.Array, kernel: jax.Array, table: np.ndarray,
               num_offsets: int) -> jax.Array:
  """Rows ``i`` of the Gram kernel: ``G[s, i, j]`` for the input features in ``rows``.

  ``rows`` is ``(taps, b, out)``, a block of the input features of ``kernel``
  ``(taps, in, out)``. One GEMM ``(taps * b, out) x (out, taps * in)`` forms every pair of
  taps ``M[t, u] = K[t, rows] K[u]^T``; ``G[s] = sum_{(t, u) at offset s} M[t, u]``.
  """
  taps, b, c_out = rows.shape
  n = kernel.shape[1]
  pairs = jnp.matmul(rows.reshape(taps * b, c_out), kernel.reshape(taps * n, c_out).T,
                     precision=_HIGHEST)
  if taps == 1:
    return pairs.reshape(1, b, n)
  pairs = pairs.reshape(taps, b, taps, n).transpose(0, 2, 1, 3).reshape(taps * taps, b, n)
  return jax.ops.segment_sum(pairs, table.reshape(-1), num_segments=num_offsets,
                             indices_are_sorted=False)


def _factor_rows(rows: jax.Array, kernel: jax.Array, table: np.ndarray, num_offsets: int,
                 eps: float) -> tuple[jax.Array, jax.Array]:
  """Factors of the features in ``rows``, and ``sign(G)`` of their Gram rows as int8."""
  gram = _gram_rows(rows, kernel, table, num_offsets)
  d = jax.lax.rsqrt(jnp.abs(gram).sum(axis=(0, 2)) + eps)
  # The TPU compiler stores these int8 signs. XLA:CPU fuses sign() into its use in the
  # backward pass and keeps the float32 Gram alive instead (an optimization_barrier does
  # not stop it), so on CPU the residual is still G.
  return d, jnp.sign(gram).astype(jnp.int8)


def _factor_rows_vjp(rows: jax.Array, kernel: jax.Array, sign_rows: jax.Array,
                     c_rows: jax.Array, c: jax.Array, table: np.ndarray) -> jax.Array:
  """Rows of ``dL/dK`` through the factors, given ``c_i = dL/d(sum_{s, j} |G[s, i, j]|)``.

  With ``dL/dG[s, i, j] = c_i sign(G[s, i, j])`` and ``G[-s] = G[s]^T``, the derivative of
  the Gram GEMM ``A A^T`` (``A`` the ``(taps * in, out)`` kernel) is ``(D + D^T) A`` with
  ``(D + D^T)[(t, i), (u, j)] = (c_i + c_j) sign(G[s(t, u), i, j])``: one GEMM whose rows
  ``(t, i)`` need only the Gram rows ``i``.
  """
  taps, b, c_out = rows.shape
  n = kernel.shape[1]
  s = sign_rows.astype(kernel.dtype)[table]  # (t, u, b, n)
  m = s * (c_rows[:, None] + c[None, :])
  m = m.transpose(0, 2, 1, 3).reshape(taps * b, taps * n)
  return jnp.matmul(m, kernel.reshape(taps * n, c_out), precision=_HIGHEST).reshape(
      taps, b, c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _factors_vjp(kernel: jax.Array, ksize: tuple[int, ...], eps: float,
                 shard: tuple[Mesh | None, str] | None) -> jax.Array:
  return _factors_fwd(kernel, ksize, eps, shard)[0]


def _factors(kernel: jax.Array, ksize: tuple[int, ...], eps: float,
             shard: tuple[Mesh | None, str] | None) -> jax.Array:
  """AOL factors ``d_i = (sum_{s, j} |G[s, i, j]| + eps) ** -1/2`` of a ``(*ksize, in, out)``
  kernel (``ksize = ()`` for dense).

  Reverse mode keeps ``sign(G)`` as int8 (not ``G`` or the tap pairs) and spends one GEMM
  (:func:`_factor_rows_vjp`), as the forward does. With ``shard = (mesh, axis)`` or
  ``(None, axis)``, each device of ``axis`` (size ``n``) computes the Gram rows of its block
  of ``ceil(in / n)`` input features (the kernel zero-padded to a multiple of ``n``): ``1/n``
  of the forward and of the backward GEMM; the factors are all-gathered.

  * ``(mesh, axis)``: called with global arrays; a ``shard_map`` over ``mesh`` does the
    split and the kernel's gradient rows are all-gathered.
  * ``(None, axis)``: called inside a ``shard_map`` over ``axis``. The backward pass sums
    the factors' cotangent over ``axis`` and returns only this device's rows of the
    kernel's gradient (zeros elsewhere) for a kernel varying over ``axis``: the ``psum``
    that completes it is the transpose of the ``pcast`` that made it varying, the one that
    also sums the per-device gradients of the layer's batch share. An invariant kernel is
    made varying here.

  The backward pass keeps the kernel as it was given (the reshape to ``(taps, in, out)``
  happens inside, in both passes), so that its residual is the parameter itself and not a
  copy in another layout (on TPU, a leading unit axis is a new tiled buffer).
  """
  if shard is not None and shard[0] is None and shard[1] not in _varying_axes(kernel):
    kernel = jax.lax.pcast(kernel, shard[1], to="varying")
  return _factors_vjp(kernel, ksize, eps, shard)


def _varying_axes(x: jax.Array) -> frozenset[str]:
  return jax.typeof(x).manual_axis_type.varying


def _padded(x: jax.Array, n: int, axis: int) -> jax.Array:
  pad = -x.shape[axis] % n
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _block_start(x: jax.Array, axis_name: str, n_dev: int, axis: int) -> tuple[jax.Array, int]:
  b = -(-x.shape[axis] // n_dev)
  return jax.lax.axis_index(axis_name) * b, b


def _local_block(x: jax.Array, axis_name: str, n_dev: int, axis: int) -> jax.Array:
  """This device's block of ``x`` along ``axis`` (inside ``shard_map``), zero-padded so that
  ``n_dev`` equal blocks cover it."""
  start, b = _block_start(x, axis_name, n_dev, axis)
  return jax.lax.dynamic_slice_in_dim(_padded(x, n_dev, axis), start, b, axis)


def _local_factors(kernel, table, num_offsets, eps, axis, n_dev):
  rows = _local_block(kernel, axis, n_dev, 1)
  d_rows, sign_rows = _factor_rows(rows, kernel, table, num_offsets, eps)
  return jax.lax.all_gather(d_rows, axis, tiled=True)[:kernel.shape[1]], sign_rows


def _local_factors_vjp(kernel, sign_rows, c, table, axis, n_dev):
  rows, c_rows = _local_block(kernel, axis, n_dev, 1), _local_block(c, axis, n_dev, 0)
  return _factor_rows_vjp(rows, kernel, sign_rows, c_rows, c, table)


def _as_taps(kernel: jax.Array) -> jax.Array:
  return kernel.reshape(-1, *kernel.shape[-2:])


def _factors_fwd(kernel, ksize, eps, shard):
  residual, kernel = kernel, _as_taps(kernel)
  table, num_offsets = _offset_table(ksize)
  if shard is None:
    d, sign = _factor_rows(kernel, kernel, table, num_offsets, eps)
    return d, (residual, d, sign)
  mesh, axis = shard
  if mesh is None:
    d, sign = _local_factors(kernel, table, num_offsets, eps, axis, jax.lax.axis_size(axis))
    return d, (residual, d, sign)
  # Replicated in, replicated d out (gathered), sign(G) rows stay on their device.
  d, sign = jax.shard_map(
      lambda k: _local_factors(k, table, num_offsets, eps, axis, mesh.shape[axis]),
      mesh=mesh, in_specs=PartitionSpec(),
      out_specs=(PartitionSpec(), PartitionSpec(None, axis)), axis_names={axis},
      check_vma=False)(kernel)
  return d, (residual, d, sign)


def _factors_bwd(ksize, eps, shard, residuals, dd):
  original, d, sign = residuals
  kernel = _as_taps(original)
  table, _ = _offset_table(ksize)
  c = -0.5 * dd * d ** 3  # d(sums ** -1/2) = -1/2 d^3 d(sums)
  if shard is None:
    return (_factor_rows_vjp(kernel, kernel, sign, c, c, table).reshape(original.shape),)
  mesh, axis = shard
  if mesh is None:
    n_dev = jax.lax.axis_size(axis)
    # Every device's share of the batch adds to dL/dd; each then owns its kernel rows.
    dk_rows = _local_factors_vjp(kernel, sign, jax.lax.psum(c, axis), table, axis, n_dev)
    start, _ = _block_start(kernel, axis, n_dev, 1)
    dk = jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros_like(_padded(kernel, n_dev, 1)), dk_rows, start, 1)
    return (dk[:, :kernel.shape[1]].reshape(original.shape),)

  def local(kernel, sign_rows, c):
    dk_rows = _local_factors_vjp(kernel, sign_rows, c, table, axis, mesh.shape[axis])
    return jax.lax.all_gather(dk_rows, axis, axis=1, tiled=True)

  dk = jax.shard_map(
      local, mesh=mesh,
      in_specs=(PartitionSpec(), PartitionSpec(None, axis), PartitionSpec()),
      out_specs=PartitionSpec(), axis_names={axis}, check_vma=False)(kernel, sign, c)
  return (dk[:, :kernel.shape[1]].reshape(original.shape),)


_factors_vjp.defvjp(_factors_fwd, _factors_bwd)


def _check_shard(mesh: Mesh | None, axis_name: str | None) -> tuple[Mesh | None, str] | None:
  """The ``shard`` argument of :func:`_factors`, or None when nothing is split."""
  if mesh is None:
    return None if axis_name is None else (None, axis_name)
  axis_name = "data" if axis_name is None else axis_name
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh (axes "
                     f"{mesh.axis_names}); pass the name of the mesh axis to split the "
                     "rescaling over.")
  return (mesh, axis_name) if mesh.shape[axis_name] > 1 else None


def dense_factors(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                  mesh: Mesh | None = None, axis_name: str | None = None) -> jax.Array:
  """AOL factors of a dense kernel ``P`` of shape ``(in, out)``.

  ``d_i = (sum_j |P P^T|_ij q_j / q_i + eps) ** -1/2``, one per input feature; ``q=None``
  means ``q = 1`` (AOL, Theorem 1). ``diag(d) @ P`` has spectral norm <= 1 for every ``P``.

  Args:
    kernel: ``P``, ``(in, out)``.
    q: optional positive weights ``(in,)`` (SLL generalisation); ``None`` is AOL.
    eps: stabiliser added to each row sum.
    mesh, axis_name: with ``q=None``, split the Gram rows over a mesh axis of size ``n``;
      the result is the same. Given ``mesh`` (``axis_name`` default ``'data'``), called
      with global arrays: each device computes ``1/n`` of ``P P^T``, forward and backward,
      and the factors and the gradient rows are all-gathered. Given ``axis_name`` alone,
      called inside a ``jax.shard_map`` over that axis: the same split, and the kernel's
      cotangent is this device's rows, completed by the ``psum`` that transposes the
      kernel's ``jax.lax.pcast`` to varying (made here if the kernel is invariant), the same
      ``psum`` that sums the gradients of the devices' batch shares.

  Example:
    >>> dense_factors(jnp.eye(3)).round(5)  # orthogonal kernels keep factor 1 (to rounding)
    Array([1., 1., 1.], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  _check_kernel(kernel, 2, 2, "dense")
  q = _check_q(q, kernel.shape[0])
  shard = _check_shard(mesh, axis_name)
  p = kernel.astype(compute_dtype(kernel.dtype))
  if q is None:
    return _factors(p, (), float(eps), shard)
  gram = _outer_gram(p)
  return _factors_from_gram(gram, q.astype(p.dtype), eps)


def conv_factors(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                 feature_group_count: int = 1, method: GramMethod | None = None,
                 mesh: Mesh | None = None, axis_name: str | None = None) -> jax.Array:
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
      ``mesh`` splits; ``'conv'`` (the reference) and ``q`` are differentiated by autodiff.
    mesh, axis_name: with the ``'taps'`` Gram and ``q=None``, split each group's Gram rows
      (input channels) over a mesh axis, as :func:`dense_factors` does; the result is the
      same.

  Returns:
    ``(in,)`` factors, input channel ``c = group * (in // g) + i``.

  Example:
    >>> conv_factors(jnp.ones((1, 1, 2, 2))).round(4)  # |G| row sums 4: d = 1/2
    Array([0.5, 0.5], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  _check_kernel(kernel, 3, 5, "conv")
  _check_groups(kernel, feature_group_count)
  g = feature_group_count
  q = _check_q(q, kernel.shape[-2] * g)
  shard = _check_shard(mesh, axis_name)
  method = DEFAULT_GRAM_METHOD if method is None else method
  if method not in GRAM_METHODS:
    raise ValueError(f"Unknown Gram method {method!r}; choose one of {GRAM_METHODS}.")
  if q is None and method == "taps":
    k = kernel.astype(compute_dtype(kernel.dtype))
    ksize = k.shape[:-2]
    if g == 1:
      return _factors(k, ksize, float(eps), shard)
    grouped = k.reshape(*k.shape[:-1], g, k.shape[-1] // g)
    per_group = jax.vmap(lambda kg: _factors(kg, ksize, float(eps), shard), in_axes=-2)(grouped)
    return per_group.reshape(-1)
  gram = conv_gram(kernel, feature_group_count=g, method=method)
  if g == 1:
    return _factors_from_gram(gram, None if q is None else q.astype(gram.dtype), eps)
  qg = None if q is None else q.astype(gram.dtype).reshape(g, -1)
  per_group = jax.vmap(lambda gr, qq: _factors_from_gram(gr, qq, eps),
                       in_axes=(0, None if qg is None else 0))(gram, qg)
  return per_group.reshape(-1)


def rescale_dense(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                  mesh: Mesh | None = None, axis_name: str | None = None) -> jax.Array:
  """The 1-Lipschitz dense kernel ``diag(d) @ P`` (AOL, Theorem 1), in the dtype of ``kernel``.

  ``d_i = (sum_j |P P^T|_ij q_j / q_i + eps) ** -1/2`` (:func:`dense_factors`) scales row
  ``i`` (input feature ``i``) of ``P``; then ``||x @ (diag(d) P)||_2 <= ||x||_2`` for every
  ``P``. Prach & Lampert, ECCV 2022, Theorem 1; with ``q`` the SLL bound of Araujo et al.,
  ICLR 2023.

  Args:
    kernel: ``P``, ``(in, out)`` (Flax's dense layout), any floating dtype.
    q: optional positive weights ``(in,)``; ``None`` means ``q = 1`` (AOL).
    eps: stabiliser inside the factor.
    mesh, axis_name: split the Gram work over a mesh axis (see :func:`dense_factors`); the
      result does not change.

  Returns:
    ``diag(d) @ P``, shape and dtype of ``kernel``.

  Example:
    >>> rescale_dense(2 * jnp.eye(2)).round(4)  # twice an orthogonal matrix becomes it
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  d = dense_factors(kernel, q=q, eps=eps, mesh=mesh, axis_name=axis_name)
  return (kernel.astype(d.dtype) * d[:, None]).astype(kernel.dtype)


def rescale_conv(kernel: ArrayLike, *, q: ArrayLike | None = None, eps: float = 1e-6,
                 feature_group_count: int = 1, method: GramMethod | None = None,
                 mesh: Mesh | None = None, axis_name: str | None = None) -> jax.Array:
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
    mesh, axis_name: split the Gram work over a mesh axis (see :func:`conv_factors`); the
      result does not change.

  Returns:
    The rescaled kernel, shape and dtype of ``kernel``.

  Example:
    >>> rescale_conv(jnp.ones((1, 1, 2, 2)))[0, 0].round(4)  # every channel scaled by 1/2
    Array([[0.5, 0.5],
           [0.5, 0.5]], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  d = conv_factors(kernel, q=q, eps=eps, feature_group_count=feature_group_count,
                   method=method, mesh=mesh, axis_name=axis_name)
  g = feature_group_count
  c_in_g, c_out = kernel.shape[-2:]
  # Factor of (i, o): group of o is o // (c_out // g), input channel is group * c_in_g + i.
  scale = d.reshape(g, c_in_g).T  # (c_in_g, g)
  scale = jnp.repeat(scale, c_out // g, axis=1)  # (c_in_g, c_out)
  return (kernel.astype(d.dtype) * scale).astype(kernel.dtype)
