"""Gram matrices of AOL kernels, the offset table, and the precision the products run at.

Kernel layouts are Flax's: dense ``(in, out)``, conv ``(*spatial, in // g, out)``. A dense
kernel is a conv kernel with one tap.

The Gram of a conv kernel is symmetric under offset reversal, ``G[-s] = G[s]^T`` (and
``P P^T`` is symmetric), so the ``'taps'`` formulation computes one triangle: the pairs of
taps ``(t, u)`` with ``u > t`` (the offsets ``s < 0``) and the centre offset ``G[0]``, itself
a symmetric product formed by blocks of one triangle (:func:`sym_outer`); the rest is its
mirror image.
"""

from __future__ import annotations

import functools
import inspect
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from aol_jax._src import checks

GramPrecision = Literal["default", "high", "highest", "bfloat16"]
# The one table of Gram precisions: the type above, the validation and the docs read it.
GRAM_PRECISIONS: dict[str, str] = {
    "default": "the platform's fast path: bfloat16 passes on TPU, TF32 on GPU, float32 on CPU",
    "high": "jax.lax.Precision.HIGH (3 bfloat16 passes on TPU)",
    "highest": "full float32 (jax.lax.Precision.HIGHEST); what freeze() and certification use",
    "bfloat16": "operands cast to bfloat16, products accumulated in float32 (a TPU's rounding "
                "on any platform)",
}
_LAX_PRECISION = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
                  "highest": jax.lax.Precision.HIGHEST}

GramMethod = Literal["conv", "taps"]
GRAM_METHODS: tuple[str, ...] = ("conv", "taps")
# Chosen by `python -m benchmarks.gram` (see the README's benchmark table).
DEFAULT_GRAM_METHOD: GramMethod = "taps"

# Row blocks of the symmetric product X X^T (sym_outer): b (b + 1) / 2 of the b^2 blocks are
# formed, 0.625 of the products at 4. Below _MIN_ROWS_PER_BLOCK rows a block is too small to
# be worth a GEMM of its own.
_SYM_BLOCKS, _MIN_ROWS_PER_BLOCK = 4, 32


def compute_dtype(dtype: DTypeLike) -> jnp.dtype:
  """The dtype the rescaling is computed in: float32, or the parameter dtype if wider.

  Example:
    >>> compute_dtype(jnp.bfloat16)
    dtype('float32')
  """
  return jnp.promote_types(dtype, jnp.float32)


def check_positive_q(q: ArrayLike) -> None:
  """``ValueError`` unless every weight of a concrete ``q`` is positive."""
  if not np.all(np.asarray(q) > 0):
    raise ValueError("q must be strictly positive (the SLL bound divides by q); "
                     f"got min(q) = {float(np.min(q))}.")


def one_program_when_eager(fn):
  """``fn`` called eagerly (no ``axis_name``, neither ``kernel`` nor ``q`` traced) runs as
  one compiled program per shape and setting, as inside ``jax.jit``, instead of dispatching
  and compiling its operations one by one (65 programs for the factors of a conv kernel);
  traced, it is inlined as written. The arguments are checked as ``fn`` checks them: ``q``'s
  sign before compiling (a traced ``q`` cannot be), the rest while tracing."""
  static = tuple(p for p in inspect.signature(fn).parameters if p not in ("kernel", "q"))
  jitted = jax.jit(fn, static_argnames=static)

  @functools.wraps(fn)
  def wrapper(kernel, **kwargs):
    q = kwargs.get("q")
    if (kwargs.get("axis_name") is not None
        or any(isinstance(v, jax.core.Tracer) for v in (kernel, q))):
      return fn(kernel, **kwargs)
    if "eps" in kwargs:
      kwargs["eps"] = float(kwargs["eps"])
    try:
      hash(tuple(kwargs.get(name) for name in static))
    except TypeError:  # an unhashable setting: fn's own check names it
      return fn(kernel, **kwargs)
    # Host arrays go to jit as they are: jnp.asarray would compile a conversion program.
    as_array = lambda x: x if isinstance(x, jax.Array) else np.asarray(x)
    if q is not None:
      kwargs["q"] = q = as_array(q)
      check_positive_q(q)
    return jitted(as_array(kernel), **kwargs)

  return wrapper


def check_kernel(kernel: jax.Array, min_ndim: int, max_ndim: int, what: str) -> None:
  """``ValueError`` unless ``kernel`` is a floating array of rank ``min_ndim..max_ndim``
  with no zero-sized dimension."""
  if not min_ndim <= kernel.ndim <= max_ndim:
    raise ValueError(
        f"{what} kernel must have rank {min_ndim}..{max_ndim} "
        f"({'(*spatial, in, out)' if what == 'conv' else '(in, out)'}), got shape {kernel.shape}.")
  if 0 in kernel.shape:
    raise ValueError(f"{what} kernel has a zero-sized dimension: shape {kernel.shape}. "
                     "Every kernel dimension must be at least 1.")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"{what} kernel must be a floating-point array, got dtype {kernel.dtype}.")


def check_groups(kernel: jax.Array, feature_group_count: int) -> None:
  """``ValueError`` unless ``feature_group_count`` divides the kernel's output channels."""
  checks.feature_groups(feature_group_count, "the Gram of a grouped conv",
                        output_channels=kernel.shape[-1])


def check_precision(gram_precision: str) -> str:
  """``gram_precision`` if it names a row of :data:`GRAM_PRECISIONS`, else ``ValueError``."""
  if gram_precision not in GRAM_PRECISIONS:
    raise ValueError(f"gram_precision={gram_precision!r} is not one of "
                     f"{tuple(GRAM_PRECISIONS)}: " + "; ".join(
                         f"{k!r}: {v}" for k, v in GRAM_PRECISIONS.items()) + ".")
  return gram_precision


def check_method(method: str | None) -> str:
  """``method`` (``None``: :data:`DEFAULT_GRAM_METHOD`) if it is a Gram method, else ``ValueError``."""
  method = DEFAULT_GRAM_METHOD if method is None else method
  if method not in GRAM_METHODS:
    raise ValueError(f"Unknown Gram method {method!r}; choose one of {GRAM_METHODS}.")
  return method


def dot(a: jax.Array, b: jax.Array, precision: str,
        contract: tuple[int, int] = (1, 0)) -> jax.Array:
  """The 2-D product contracting axis ``contract[0]`` of ``a`` with ``contract[1]`` of ``b``,
  at a Gram precision; the result has ``a``'s dtype (float32 at least in this package)."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  if precision == "bfloat16":
    return jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
                               preferred_element_type=a.dtype)
  return jax.lax.dot_general(a, b, dims, precision=_LAX_PRECISION[precision])


def offset_table(ksize: tuple[int, ...]) -> tuple[np.ndarray, int]:
  """Offset index of each pair of taps ``(t, u)`` (row-major taps) and the offset count.

  Pair ``(t, u)`` contributes ``K[t] K[u]^T`` to the Gram at offset ``pos[t] - pos[u]``;
  offsets are numbered row-major over ``[-(k - 1), k - 1]`` per spatial dim, so the centre
  ``s = 0`` is index ``(count - 1) // 2``, ``-s`` is ``count - 1 - index(s)``, and ``u > t``
  exactly when the offset's index is below the centre's. A dense kernel (``ksize == ()``)
  has one tap and one offset.

  Example:
    >>> table, count = offset_table((2,))
    >>> table.tolist(), count
    ([[1, 0], [2, 1]], 3)
  """
  if not ksize:
    return np.zeros((1, 1), np.int32), 1
  nd = len(ksize)
  pos = np.array(list(np.ndindex(*ksize))).reshape(-1, nd)
  gram_shape = tuple(2 * k - 1 for k in ksize)
  offsets = pos[:, None] - pos[None, :] + np.array(ksize) - 1  # (taps, taps, nd)
  table = np.ravel_multi_index(tuple(np.moveaxis(offsets, -1, 0)), gram_shape)
  return table.astype(np.int32), int(np.prod(gram_shape))


def sym_outer(x: jax.Array, precision: str) -> jax.Array:
  """``x @ x.T`` from the blocks on and above the diagonal, the rest mirrored.

  ``x`` ``(n, k)`` is cut into up to :data:`_SYM_BLOCKS` row blocks ``X_I`` (zero-padded to
  equal size); block row ``I`` is one product ``X_I [X_I; ...; X_last]^T``.
  """
  n = x.shape[0]
  blocks = max(1, min(_SYM_BLOCKS, n // _MIN_ROWS_PER_BLOCK))
  if blocks == 1:
    return dot(x, x, precision, (1, 1))
  r = -(-n // blocks)
  xp = jnp.pad(x, ((0, blocks * r - n), (0, 0)))
  upper = [dot(xp[i * r:(i + 1) * r], xp[i * r:], precision, (1, 1)) for i in range(blocks)]
  rows = []
  for i in range(blocks):
    left = [upper[j][:, (i - j) * r:(i - j + 1) * r].T for j in range(i)]
    rows.append(jnp.concatenate([*left, upper[i]], axis=1))
  return jnp.concatenate(rows, axis=0)[:n, :n]


def _features_first(kernel: jax.Array) -> jax.Array:
  """``(taps, n, out)`` -> ``(n, taps * out)``: feature ``i``'s row holds all its taps."""
  taps, n, c_out = kernel.shape
  return kernel.transpose(1, 0, 2).reshape(n, taps * c_out)


def half_gram_rows(rows: jax.Array, kernel: jax.Array, table: np.ndarray, precision: str,
                   *, whole: bool) -> jax.Array:
  """Rows ``i`` of the Gram at the offsets ``s <= 0``: ``H[s, i, j] = G[s, i, j]``.

  ``kernel`` is ``(taps, n, out)``, ``rows`` ``(taps, b, out)`` a block of its input
  features (all of them, ``whole``, when nothing is split). The pairs ``(t, u > t)`` are one
  product per tap ``t``, ``K[t, rows] [K[t + 1]; ...]^T``, summed into their offsets; the
  centre ``G[0] = sum_t K[t] K[t]^T`` is one product of the ``(n, taps * out)`` kernel with
  itself (by :func:`sym_outer` when ``whole``). ``taps^2`` pair products become
  ``taps (taps - 1) / 2`` plus the centre's ``taps``.

  Returns:
    ``(centre + 1, b, n)``: offsets ``0 .. centre`` in :func:`offset_table`'s numbering.
  """
  taps, b, c_out = rows.shape
  if whole:
    g0 = sym_outer(_features_first(kernel), precision)
  else:
    g0 = dot(_features_first(rows), _features_first(kernel), precision, (1, 1))
  if taps == 1:
    return g0[None]
  n = kernel.shape[1]
  centre = int(table[0, 0])
  cross = [dot(rows[t], kernel[t + 1:].reshape(-1, c_out), precision, (1, 1))
           .reshape(b, taps - t - 1, n).transpose(1, 0, 2) for t in range(taps - 1)]
  segment = np.concatenate([table[t, t + 1:] for t in range(taps - 1)])
  half = jax.ops.segment_sum(jnp.concatenate(cross), segment, num_segments=centre,
                             indices_are_sorted=False)
  return jnp.concatenate([half, g0[None]])


def mirror(half: jax.Array) -> jax.Array:
  """The whole Gram ``(offsets, n, n)`` from its offsets ``s <= 0``: ``G[-s] = G[s]^T``."""
  if half.shape[0] == 1:
    return half
  return jnp.concatenate([half, jnp.swapaxes(half[:-1][::-1], -1, -2)])


def _conv_gram_selfconv(kernel: jax.Array, precision: str) -> jax.Array:
  """Reference Gram: the kernel cross-correlated with itself by conv_general_dilated."""
  nd = kernel.ndim - 2
  ksize = kernel.shape[:nd]
  spatial = "DHW"[3 - nd:]
  # c_in becomes the batch axis, c_out the feature axis; the same kernel with its two
  # channel axes swapped is the filter (c_out features in, c_in features out).
  lhs = jnp.moveaxis(kernel, nd, 0)  # (in, *spatial, out)
  rhs = jnp.swapaxes(kernel, -1, -2)  # (*spatial, out, in)
  kw = dict(window_strides=(1,) * nd, padding=[(k - 1, k - 1) for k in ksize],
            dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  if precision == "bfloat16":
    out = jax.lax.conv_general_dilated(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16),
                                       preferred_element_type=kernel.dtype, **kw)
  else:
    out = jax.lax.conv_general_dilated(lhs, rhs, precision=_LAX_PRECISION[precision], **kw)
  return jnp.moveaxis(out, 0, nd)  # (*(2k-1), in, in)


def _conv_gram_taps(kernel: jax.Array, precision: str) -> jax.Array:
  """The same Gram from products of pairs of taps (one triangle of them, mirrored)."""
  ksize = kernel.shape[:-2]
  table, count = offset_table(ksize)
  k = kernel.reshape(-1, *kernel.shape[-2:])
  gram = mirror(half_gram_rows(k, k, table, precision, whole=True))
  return gram.reshape(*(2 * n - 1 for n in ksize), *gram.shape[-2:])


@one_program_when_eager
def conv_gram(kernel: ArrayLike, *, feature_group_count: int = 1,
              method: GramMethod | None = None,
              gram_precision: GramPrecision = "highest") -> jax.Array:
  """Gram kernel of a convolution: the kernel convolved with itself.

  ``G[s, i, j] = sum_{p, o} K[p + s, i, o] * K[p, j, o]`` for every offset ``s`` in
  ``[-(k-1), k-1]`` per spatial dim, so ``sum_{s, j} |G[s, i, j]|`` bounds the row sums of
  the conv operator's ``|A^T A|``.

  Args:
    kernel: ``(*spatial, in // g, out)`` with 1, 2 or 3 spatial dims.
    feature_group_count: ``g``; each group's Gram is computed on its own.
    method: ``'conv'`` (self-convolution by ``jax.lax.conv_general_dilated``, the reference)
      or ``'taps'`` (products of the pairs of taps ``(t, u)``, one triangle of them, each
      pair's block summed into its offset, the other half mirrored).
      ``None`` takes ``DEFAULT_GRAM_METHOD``.
    gram_precision: a key of :data:`GRAM_PRECISIONS`.

  Returns:
    ``(*(2k - 1), in // g, in // g)`` in the compute dtype for ``g == 1``, and with a
    leading group axis ``(g, *(2k - 1), in // g, in // g)`` for ``g > 1``.

  Example:
    >>> conv_gram(jnp.ones((3, 3, 2, 4))).shape
    (5, 5, 2, 2)
  """
  kernel = jnp.asarray(kernel)
  check_kernel(kernel, 3, 5, "conv")
  check_groups(kernel, feature_group_count)
  method = check_method(method)
  precision = check_precision(gram_precision)
  fn = _conv_gram_selfconv if method == "conv" else _conv_gram_taps
  kernel = kernel.astype(compute_dtype(kernel.dtype))
  if feature_group_count == 1:
    return fn(kernel, precision)
  g = feature_group_count
  grouped = kernel.reshape(*kernel.shape[:-1], g, kernel.shape[-1] // g)
  return jax.vmap(lambda k: fn(k, precision), in_axes=-2)(grouped)


@one_program_when_eager
def dense_gram(kernel: ArrayLike, *, gram_precision: GramPrecision = "highest") -> jax.Array:
  """``P P^T`` of a dense kernel ``P`` ``(in, out)``, in the compute dtype, by one triangle
  of row blocks (:func:`sym_outer`).

  Example:
    >>> dense_gram(jnp.ones((2, 3)))
    Array([[3., 3.],
           [3., 3.]], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  check_kernel(kernel, 2, 2, "dense")
  return sym_outer(kernel.astype(compute_dtype(kernel.dtype)), check_precision(gram_precision))
