"""Rigorous upper bounds on the spectral norm of a frozen dense or conv kernel.

Both functions return a float ``b`` with ``b >= ||T||_2`` for the exact linear map ``T`` of the
stored kernel, the floating-point rounding of the computation of ``b`` itself included. They
run on the host in float64 (numpy and LAPACK), once per distinct kernel (memoised).

**Verified eigenvalue bound** (the core, :func:`_lambda_max_upper`). For a symmetric ``H`` and a
float ``s``, if the floating-point Cholesky factorisation of ``A = fl(s I - H)`` runs to
completion, then ``lambda_max(H) <= s + r`` with a rounding term ``r`` derived below (the
idea of Rump, "Verification of positive definiteness", BIT 46, 2006). ``s`` is an estimate of
``lambda_max(H)`` raised by a relative margin ``mu = 2^-20`` (multiplied by 4 until the
factorisation succeeds; past ``mu = 1`` the row-sum bound ``max_i sum_j |H_ij|`` is used), so
the bound is within about ``1e-6`` of ``lambda_max(H)``. The estimate only places ``s``: a
wrong one costs tightness or time, never soundness. This is
tighter for the same cost than the Gram iteration of Delattre, Barthelemy, Araujo & Allauzen,
"Efficient bound of Lipschitz constant for convolutional layers by Gram iteration", ICML
2023, whose ``||G_t||_F^(1/2^t)`` exceeds ``||W||`` by up to ``rank^(1/2^(t+1))`` (3 % after
7 squarings of a 4096-wide near-orthogonal kernel), and it needs one Gram product instead of
``t``.

Rounding (``u = 2^-53``, ``gamma_k = k u / (1 - k u)``; Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., Lemma 3.4 and Theorem 10.3), for any summation order,
blocking and fused multiply-add of the BLAS/LAPACK in use:

1. Gram: ``fl(X^T X) = X^T X + E`` with ``|E| <= gamma_k |X|^T |X|`` (``k`` the inner
   length), so ``||E||_2 <= ||E||_F <= gamma_k ||X||_F^2``. The same holds for any sum of
   ``k`` products computed in any order (a product of blocks, or blocks summed afterwards).
2. Shift: ``A = s I - H + D`` where only the diagonal is rounded: ``|D_ii| <= 2 u |A_ii|``.
3. Cholesky of the ``n x n`` ``A`` (LAPACK ``potrf`` reading the lower triangle) that runs to
   completion: ``R^T R = A + F``, ``|F| <= gamma_{n+1} |R|^T |R|``, so ``||F||_2 <= gamma_{n+1}
   ||R||_F^2`` and ``||R||_F^2 = tr(A + F) <= tr(A) / (1 - gamma_{n+1})``.
   ``A + F = R^T R >= 0`` gives ``lambda_max(H) <= s + 2 u max_i |A_ii| + gamma_{n+1} tr(A) /
   (1 - gamma_{n+1})``, ``H`` being the symmetric matrix of the lower triangle read.
4. Underflow (gradual or flushed to zero) adds at most ``2^-1021`` per operation; every matrix
   is scaled by a power of two to entries of order 1 first, and ``n^3 2^-1021`` per matrix
   covers it. Scaling by a power of two is exact except for entries that underflow, which
   move by at most ``2^-1074`` each.
5. Every scalar step on the host (``+``, ``*``, ``/``, ``sqrt``, correctly rounded in IEEE
   double) is followed by ``math.nextafter(., inf)``, so each stays an upper bound.

The rounding terms are about ``n^2 u`` relative (``2e-9`` at ``n = 4096``), three orders below
the margin ``mu``.

**Convolutions.** A conv with zero padding ('SAME', 'VALID', explicit) on any input size is
the bi-infinite conv restricted to the input support (an isometric embedding), then
restricted to the output positions and subsampled by the stride (a coordinate projection);
a circular conv on size ``n`` is diagonalised by the DFT. Both have norm at most
``S = sup_w ||K^(w)||_2``, the sup over the continuous torus of the symbol
``K^(w) = sum_t K_t exp(-i w.t)`` (a ``c_in/g x c_out/g`` matrix per group). Dilation ``r``
replaces ``K^(w)`` by ``K^(r w)`` (the same sup), and a grouped conv is block diagonal (the
max over groups). So one bound on ``S`` serves every padding, stride, dilation and input size.

``S`` is bounded from samples ``w_m = 2 pi m / N`` (the conjugate half is skipped,
``K^(-w)`` being the conjugate of ``K^(w)``): if the maximiser lies within ``pi / N`` of
``w_m`` in every coordinate, ``S <= ||K^(w_m)||_2 / (1 - theta^2 / 2)``,
``theta = (pi / N) sum_j (k_j - 1) / 2``,
``k_j`` the kernel size (after trimming all-zero border taps). Proof: let ``S`` be attained at
``w*`` with top singular vectors ``u, v``, and phase ``phi`` with
``exp(i phi) u^* K^(w*) v = S``. On the segment from ``w*`` to the nearest grid point
``w* + delta`` (``|delta_j| <= pi / N``), ``g(x) = Re(exp(i phi) u^* K^(w* + x delta / |delta|)
v exp(i (w* + x delta/|delta|).c))`` with ``c`` the kernel centre is a real trigonometric sum
with frequencies at most ``sigma = sum_j |delta_j| (k_j - 1) / (2 |delta|)`` in modulus,
bounded by ``S`` on the real line, maximal at ``x = 0``. Bernstein's inequality (twice) gives
``|g''| <= sigma^2 S``, so ``g(|delta|) >= S (1 - theta^2 / 2)``, and
``||K^(w* + delta)|| >= g(|delta|)``. Tiling the torus by boxes around samples, ``S`` is at
most the max over boxes of that bound; :func:`_symbol_bound` refines the boxes whose estimate
is above the target (within 0.2 % of the largest sample by default), worst first, then
verifies every box.

The samples are formed from the kernel's Gram taps. With ``K^(w)`` oriented so that
``a <= b`` (``a x b``; else its transpose, which has the same singular values),
``K^(w) K^(w)^* = sum_s G[s] exp(-i w.s) = P + i Q`` with ``G[s] = sum_{t - u = s} K_t K_u^T``
(``G[-s] = G[s]^T``), ``P = G[0] + sum_{s > 0} (G[s] + G[s]^T) cos(w.s)`` and
``Q = -sum_{s > 0} (G[s] - G[s]^T) sin(w.s)`` (``s > 0``: lexicographically; ``O`` such
offsets). The ``G[s]`` are computed once per kernel (each entry a sum of at most ``2 T b``
products, ``T`` taps; they also give the row-sum bound), and each sample is one row of a
matrix product with a twiddle table correct to ``2^-52`` (computed in 80-digit decimal
arithmetic): ``O(O a^2)`` per sample instead of a ``2 a x 2 b`` Gram. Entrywise the computed
``P`` and ``Q`` are within ``c M`` of the exact ones, ``M = A A^T``, ``A = sum_t |K_t|``,
``c = gamma_{2Tb} (1 + 2^-52) + 2^-52 + gamma_{O+2} (1 + gamma_{2Tb}) (1 + 2^-52)`` (item 1 for
the ``G[s]``, the twiddle error, item 1 for the product of length ``O + 1``; ``|cos|, |sin| <= 1
+ 2^-52``). The squared singular values of ``K^(w)`` are the eigenvalues of the real symmetric
``[[P, -Q], [Q, P]]`` (each twice); its computed lower triangle (blocks ``P^T`` and ``-Q^T``
may stand for ``P`` and ``Q``, being within ``c M`` of them as well) is within
``2 c ||M||_2 <= 2 c ||A||_F^2`` of it in norm (each block within ``c M`` entrywise), plus
``2 a (2 T b + O + 2) 2^-1021`` for underflow; items 2-5 bound its largest eigenvalue.

**Non-negative kernels** (``|W|``, as the certificate's rounding terms need). For ``W >= 0``
(``n x k``) and any ``q > 0``, ``||W||^2 = rho(W W^T) <= max_i (W W^T q)_i / q_i``
(Collatz-Wielandt), and ``y = fl(W fl(W^T q))`` is a sum of non-negative terms, so
``W W^T q <= (y + 2 n k 2^-1021) / ((1 - gamma_k) (1 - gamma_n))`` entrywise. Power iterates
``q`` drive that bound to ``||W||^2`` without forming a Gram (``4 n k`` flops per iterate);
:func:`dense_norm_bound` stops once it is within ``2^-20`` of the Rayleigh quotient
``||W^T q||^2 / ||q||^2`` (a lower estimate), and falls back to the Gram if it is not after
:data:`_POWER_ITERATIONS` iterates.

**Speed.** The per-sample work (forming ``P`` and ``Q``, a 12-step Lanczos estimate of the
top eigenvalue of ``P + i Q`` in complex64, the Cholesky factorisation in float64) runs in
chunks on up to :data:`_WORKERS` threads, with the BLAS itself limited to one thread
meanwhile (OpenBLAS's threads spin-wait on small factorisations: on a loaded 2-core machine a
batch of them ran 40 times slower with two BLAS threads than with one). The estimates
decide the refinement; then every box is verified against one target, the largest estimated
box bound ``T``: its sample's shift is placed at ``(T / factor)^2``, or at LAPACK's
eigenvalue where that factorisation fails. ``python -m benchmarks.bound_speed`` times it on
a perturbed AOL-Small.

Finally both functions return the minimum with the AOL row-sum (Schur) bound of
:func:`dense_row_sum_bound` and :func:`conv_row_sum_bound` (rigorous in float64), so they
never state more than it.
"""

from __future__ import annotations

import concurrent.futures
import decimal
import functools
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import scipy.linalg.lapack
import scipy.sparse.linalg
import threadpoolctl
from jax.typing import ArrayLike

from aol_jax._src import checks
from aol_jax._src import padding as padding_lib

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
"""``u`` for float32 (round to nearest): every rounded operation has relative error <= u."""

FLOAT64_UNIT_ROUNDOFF = 2.0 ** -53
"""``u`` for float64 (round to nearest)."""

FLOAT32_TINY = 2.0 ** -126
"""The smallest normal float32: a result (or an input) flushed to zero loses less than this."""

FLOAT64_TINY = 2.0 ** -1022
"""The smallest normal float64."""


class FloatFormat(NamedTuple):
  """An IEEE binary floating-point format with round to nearest, as a certificate uses it.

  Attributes:
    name: ``'float32'`` or ``'float64'``, the dtype's name.
    unit_roundoff: ``u``: a correctly rounded operation with a normal result has relative
      error at most ``u``.
    tiny: the smallest normal number: a result or an input that underflows (gradually, or
      flushed to zero) moves by less than this.
    limit: a magnitude far below the largest finite number (``2^100`` in float32, whose
      largest is about ``2^128``): a certificate keeps every value below it.
  """
  name: str
  unit_roundoff: float
  tiny: float
  limit: float


FLOAT32 = FloatFormat("float32", FLOAT32_UNIT_ROUNDOFF, FLOAT32_TINY, 2.0 ** 100)
FLOAT64 = FloatFormat("float64", FLOAT64_UNIT_ROUNDOFF, FLOAT64_TINY, 2.0 ** 900)


_U = FLOAT64_UNIT_ROUNDOFF
_UNDERFLOW = 2.0 ** -1021  # absolute error of one float64 operation that underflows (any mode)
_SUBNORMAL = 2.0 ** -1074  # largest change of an entry by an inexact power-of-two scaling
_TWIDDLE_ERROR = 2.0 ** -52  # |table value - exact cos or sin|, see _unit_circle_table
_FIRST_MARGIN = 2.0 ** -20  # relative margin of the shift s over the eigenvalue estimate
_DENSE_LANCZOS_FROM = 512  # eigenvalue estimate by Lanczos from this size on (eigvalsh below)


def _up(x: float) -> float:
  """The next float above ``x``: an upper bound on the exact value that ``x`` rounds."""
  return math.nextafter(float(x), math.inf)


def _vup(x: np.ndarray) -> np.ndarray:
  """:func:`_up` elementwise."""
  return np.nextafter(np.asarray(x, np.float64), np.inf)


def _gamma(k: int) -> float:
  """An upper bound on ``gamma_k = k u / (1 - k u)``."""
  if k * _U >= 0.01:
    raise ValueError(f"A dot product of length {k} is too long for these float64 error bounds.")
  return _up(_up(k * _U) / (1.0 - _up(k * _U)))


def _sum_up(values: np.ndarray) -> float:
  """Upper bound on the exact sum of the non-negative ``values``: a float sum of ``n`` terms is
  at least ``(1 - gamma_n)`` times the exact one, and ``1 / (1 - gamma) <= 1 + 2 gamma``."""
  values = np.asarray(values, np.float64).reshape(-1)
  s = float(np.sum(values))
  return _up(_up(s * _up(1.0 + 2.0 * _gamma(values.size + 1))) + values.size * _UNDERFLOW)


def _sq_frobenius_up(x: np.ndarray) -> float:
  """Upper bound on ``||x||_F^2`` (each square rounds once more: ``n + 1`` terms)."""
  x = np.asarray(x, np.float64).reshape(-1)
  return _sum_up(x * x) if x.size else 0.0


def _scaled(x: np.ndarray) -> tuple[np.ndarray, int]:
  """``(x * 2^-p, p)`` with ``max |x * 2^-p|`` in ``[1/2, 1)``; ``x`` must be nonzero."""
  p = int(np.frexp(np.max(np.abs(x)))[1])
  return np.ldexp(x, -p), p


def _unscale_up(value: float, p: int) -> float:
  """``value * 2^p`` rounded up (exact unless it leaves the normal range)."""
  out = math.ldexp(value, p)
  return out if 2.0 ** -1022 <= out < math.inf else _up(out)


def _as_float64(kernel: ArrayLike, what: str) -> np.ndarray:
  """The kernel as a float64 array (exact for every float dtype up to float64)."""
  arr = np.asarray(kernel)
  if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name in ("bfloat16",)):
    raise ValueError(f"{what}: kernel must be a floating-point array, got dtype {arr.dtype}.")
  if arr.dtype.itemsize > 8:
    raise ValueError(f"{what}: kernel dtype {arr.dtype} is wider than float64; pass float64 or "
                     "narrower (the bound is computed in float64).")
  out = arr.astype(np.float64)
  if 0 in out.shape:
    raise ValueError(f"{what}: kernel has a zero-sized dimension, shape {out.shape}.")
  if not np.all(np.isfinite(out)):
    raise ValueError(f"{what}: kernel has NaN or infinite entries; no finite bound exists.")
  return out




_WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))
"""Threads that bound chunks of symbol samples at once (numpy and LAPACK release the GIL)."""

_LANCZOS_STEPS = 12  # steps of the batched Lanczos estimate of a sample's top eigenvalue
_EIGVALSH_UP_TO = 32  # samples of side a <= this get LAPACK's eigenvalues as estimates instead
_POWER_ITERATIONS = 300  # power iterates of the non-negative path before it falls back
_POWER_TOLERANCE = 2.0 ** -20  # ... stopping within this of the Rayleigh quotient


def _one_blas_thread(fn):
  """Runs ``fn`` with the BLAS limited to one thread (see "Speed" in the module docstring)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
      return fn(*args, **kwargs)

  return wrapped


def _parallel_map(fn: Callable, items: Sequence) -> list:
  """``[fn(x) for x in items]`` on up to :data:`_WORKERS` threads."""
  if len(items) <= 1 or _WORKERS == 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(min(_WORKERS, len(items))) as pool:
    return list(pool.map(fn, items))


def _factors_to_completion(a: np.ndarray) -> bool:
  """Whether LAPACK's Cholesky (``potrf``) factors the symmetric matrix of the lower triangle
  of the Fortran-ordered ``a`` to completion with a finite factor (``a`` is overwritten)."""
  factor, info = scipy.linalg.lapack.dpotrf(a, lower=1, clean=0, overwrite_a=1)
  return info == 0 and bool(np.all(np.isfinite(factor)))


def _gershgorin_up(h: np.ndarray) -> float:
  """``lambda_max <= max_i sum_j |h_ij|`` of the symmetric matrix of ``h``'s lower triangle,
  rounded up: a fallback."""
  n = h.shape[0]
  rows = np.sum(np.abs(np.tril(h) + np.tril(h, -1).T), axis=1)
  return _up(_up(float(rows.max()) * _up(1.0 + 2.0 * _gamma(n + 1))) + n * _UNDERFLOW)


def _lambda_max_upper(load: Callable[[int, np.ndarray], None], diagonals: np.ndarray,
                      estimates: ArrayLike,
                      improve: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
  """Upper bounds on ``lambda_max`` of symmetric matrices ``H_b`` (``b < batch``), verified by
  Cholesky factorisations of ``fl(s_b I - H_b)`` (items 2-4 of the module docstring).

  ``load(b, out)`` writes ``-H_b`` into the Fortran-ordered ``(n, n)`` ``out``, of which the
  lower triangle is read (the upper one may hold anything finite); ``diagonals`` ``(batch,
  n)`` are the diagonals of the ``H_b`` (positive semi-definite: ``|H_ij| <= max_i H_ii``).
  ``estimates``: about ``lambda_max`` of each (or one for all); the shift is ``s_b =
  estimate_b + mu scale_b``. ``improve(indices)``, if given, returns better estimates for
  the matrices whose first factorisation failed.
  """
  batch, n = diagonals.shape
  est = np.abs(np.broadcast_to(np.asarray(estimates, np.float64), (batch,))).copy()
  scale = np.maximum(np.maximum(est, np.max(np.abs(diagonals), axis=1) * 2.0 ** -40), 2.0 ** -900)
  out = np.full(batch, np.inf)
  pending = np.arange(batch)
  g = _gamma(n + 1)
  sum_factor = _up(1.0 + 2.0 * _gamma(n + 1))
  buffer = np.zeros((n, n), order="F")
  idx = np.arange(n)
  margin = _FIRST_MARGIN
  while pending.size and margin <= 1.0:
    s = _vup(est[pending] + scale[pending] * margin)
    diag = s[:, None] - diagonals[pending]  # (len(pending), n), rounded once
    ok = np.empty(len(pending), bool)
    for j, b in enumerate(pending):
      load(b, buffer)
      buffer[idx, idx] = diag[j]
      ok[j] = _factors_to_completion(buffer)
    absdiag = np.abs(diag)
    d_term = _vup(2.0 * _U * np.max(absdiag, axis=1))
    trace = _vup(_vup(np.sum(absdiag, axis=1) * sum_factor) + n * _UNDERFLOW)
    f_term = _vup(_vup(g * trace) / (1.0 - g))
    bound = _vup(_vup(_vup(s + d_term) + f_term) + n ** 3 * _UNDERFLOW)
    out[pending[ok]] = bound[ok]
    pending = pending[~ok]
    if improve is not None and pending.size:
      est[pending] = np.maximum(est[pending], np.abs(improve(pending)))
      scale[pending] = np.maximum(scale[pending], est[pending])
      improve = None  # once: then the margin grows
    else:
      margin *= 4.0
  for b in pending:
    load(b, buffer)
    out[b] = _gershgorin_up(buffer)
  return out


def _estimate_lambda_max(h: np.ndarray) -> float:
  """A float estimate of ``lambda_max`` of the symmetric ``h`` (no guarantee either way)."""
  n = h.shape[0]
  if n < _DENSE_LANCZOS_FROM:
    return float(np.linalg.eigvalsh(h)[-1])
  v0 = np.ones(n) + np.linspace(0.0, 1.0, n)  # deterministic start
  try:
    return float(scipy.sparse.linalg.eigsh(h, k=1, which="LA", v0=v0, tol=1e-10,
                                           return_eigenvectors=False)[0])
  except scipy.sparse.linalg.ArpackNoConvergence:
    v = v0 / np.linalg.norm(v0)
    for _ in range(200):
      v = h @ v
      v /= max(float(np.linalg.norm(v)), 1e-300)
    return float(v @ h @ v)


def _gram_error(x: np.ndarray) -> float:
  """Item 1 for ``fl(x x^T)``: ``||E||_2 <= gamma_k ||x||_F^2`` plus underflow."""
  n, k = x.shape
  return _up(_up(_gamma(k) * _sq_frobenius_up(x)) + 2 * n * n * k * _UNDERFLOW)


def _smaller_side(w: np.ndarray) -> np.ndarray:
  """``w`` or ``w.T``, whichever has fewer rows: its Gram ``x x^T`` is the smaller one."""
  return w if w.shape[0] <= w.shape[1] else w.T


def _sigma_max_upper_gram(x: np.ndarray, gram: np.ndarray) -> float:
  """Rigorous upper bound on ``||x||_2`` (entries of order 1) from ``gram = fl(x x^T)``."""
  # gram.T is Fortran-ordered; its entries obey the same error bound as gram's.
  load = lambda b, out: np.negative(gram.T, out=out)
  lam = _lambda_max_upper(load, np.diagonal(gram)[None], _estimate_lambda_max(gram))[0]
  return _up(math.sqrt(_up(lam + _gram_error(x))))


def _sigma_max_upper_dense(w: np.ndarray) -> float:
  """Rigorous upper bound on ``||w||_2`` for a float64 ``w`` with entries of order 1."""
  x = _smaller_side(w)
  return _sigma_max_upper_gram(x, x @ x.T)


def _nonneg_norm_bound(w: np.ndarray, iterations: int = _POWER_ITERATIONS,
                       tolerance: float = _POWER_TOLERANCE) -> tuple[float, bool]:
  """Rigorous upper bound on ``||w||_2`` of a non-negative ``w`` (``n x k``, entries of order
  1) by Collatz-Wielandt on power iterates (module docstring), without a Gram; and whether
  it came within ``tolerance`` of the Rayleigh-quotient estimate."""
  n, k = w.shape
  correction = _up(_up(1.0 + 2.0 * _gamma(k)) * _up(1.0 + 2.0 * _gamma(n)))  # >= 1/((1-g)(1-g))
  absolute = 2.0 * n * k * _UNDERFLOW
  q = np.ones(n) + np.linspace(0.0, 1.0, n)  # > 0, deterministic
  best = math.inf
  for _ in range(iterations):
    v = w.T @ q
    y = w @ v
    ratio = float(np.max(_vup(_vup(y + absolute) / q)))
    best = min(best, _up(ratio * correction))
    rayleigh = float(v @ v) / float(q @ q)
    if best <= rayleigh * (1.0 + tolerance) or not np.any(y > 0):
      return _up(math.sqrt(best)), True
    q = np.maximum(y / y.max(), 2.0 ** -40)
  return _up(math.sqrt(best)), False


def gamma(n: int, unit_roundoff: float = FLOAT64_UNIT_ROUNDOFF) -> float:
  """``gamma_n = n u / (1 - n u)``: a float dot product of length ``n`` errs by at most
  ``gamma_n |x|^T |y|`` (products and sums, in any order)."""
  if n * unit_roundoff >= 0.5:
    raise ValueError(f"A dot product of length {n} is too long for a float64 error bound.")
  return n * unit_roundoff / (1 - n * unit_roundoff)


def inflate(value: float, operations: int) -> float:
  """``value`` times ``1 + 2 gamma_k``: covers the float64 rounding of computing ``value``
  itself from non-negative terms in ``operations`` steps."""
  return float(value) * (1.0 + 2.0 * gamma(operations + 2))


def _schur_bound(abs_gram: np.ndarray, slack: Callable[[np.ndarray], np.ndarray],
                 iterations: int = 1000, rtol: float = 1e-9,
                 enough: float = math.inf) -> float:
  """Rigorous ``min_q max_i ((A + E) q)_i / q_i`` over power-iteration vectors ``q`` of
  ``A = abs_gram``, with ``E q = slack(q)``.

  Every ``q > 0`` gives a valid bound (Collatz-Wielandt); the iterates approach ``A``'s
  Perron vector, where the bound approaches the Perron root (<= 1 for an AOL-rescaled
  kernel, AOL's own ``q = 1 / d`` being one such vector). The loop stops once the bound is
  within ``rtol`` of the lower estimate ``min_i (A q)_i / q_i``, or once that estimate is
  above ``enough`` (the caller has a smaller bound already: every later bound is above it).
  """
  n = abs_gram.shape[0]
  q = np.ones(n)
  best = np.inf
  for _ in range(iterations):
    aq = abs_gram @ q
    best = min(best, float(np.max((aq + slack(q)) / q)))
    lower = float(np.min(aq / q))
    if best <= lower * (1 + rtol) or lower > enough * (1 + 1e-12) or aq.max() <= 0:
      break
    q = aq / aq.max() + 1e-12
  return inflate(best, 2 * n + 4)


def abs_norm_bound(row_sums: np.ndarray, col_sums: np.ndarray, terms: int) -> float:
  """``|| |T| ||_2 <= sqrt(||T||_1 ||T||_inf)`` from non-negative row and column sums."""
  return inflate(math.sqrt(inflate(row_sums.max() * col_sums.max(), terms)), 2)


def _dense_schur_sq(side: np.ndarray, gram: np.ndarray, enough: float = math.inf) -> float:
  """The row-sum bound on ``||side||^2`` from ``gram = fl(side side^T)`` (see
  :func:`dense_row_sum_bound`)."""
  abss = np.abs(side)
  g = 2.0 * gamma(side.shape[1] + 2)
  return _schur_bound(np.abs(gram), lambda q: g * (abss @ (abss.T @ q)), enough=enough)


@_one_blas_thread
def dense_row_sum_bound(kernel: np.ndarray) -> float:
  """Rigorous bound on ``||W||_2`` of a dense kernel ``(in, out)``, computed in float64.

  The Gram over the smaller side, ``G = W W^T`` (AOL's own, ``in <= out``) or ``W^T W``,
  has the same nonzero spectrum ``||W||^2``. Each entry, a dot product of length ``k`` (the
  other side), errs by at most ``gamma_k (|W| |W|^T)_ij``, so ``||W||^2 <= max_i ((|G^| +
  gamma' |W| |W|^T) q)_i / q_i`` (``gamma' = 2 gamma_{k+2}`` also covers computing
  ``|W| |W|^T q``), which is <= 1 when ``W`` is AOL-rescaled.
  """
  side = _smaller_side(np.asarray(kernel, np.float64))
  return inflate(math.sqrt(_dense_schur_sq(side, side @ side.T)), 2)


def _offset_grams(taps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The Gram taps ``G[s] = sum_{t - u = s} K_t K_u^T`` of one group's ``taps`` ``(*k, a,
  b)``: ``(offsets, G[0], G[offsets])``, ``offsets`` ``(O, nd)`` the lexicographically
  positive ``s`` (``G[-s] = G[s]^T``), ``G[0]`` exactly symmetric. Each entry is one sum of
  at most ``T b`` products (``T`` taps)."""
  ksize = taps.shape[:-2]
  a, b = taps.shape[-2:]
  count = math.prod(ksize)
  flat = taps.reshape(count, a, b)
  pos = np.array(list(np.ndindex(*ksize)), np.int64).reshape(count, len(ksize))
  pairs: dict[tuple[int, ...], list[tuple[int, int]]] = {}
  for t in range(count):
    for u in range(t):  # row-major order: t > u exactly when pos[t] - pos[u] is positive
      pairs.setdefault(tuple(int(d) for d in pos[t] - pos[u]), []).append((t, u))
  offsets = sorted(pairs)
  positive = np.empty((len(offsets), a, a))
  for j, s in enumerate(offsets):
    left = np.concatenate([flat[t] for t, _ in pairs[s]], axis=1)
    right = np.concatenate([flat[u] for _, u in pairs[s]], axis=1)
    positive[j] = left @ right.T
  rows = flat.transpose(1, 0, 2).reshape(a, count * b)
  centre = rows @ rows.T
  centre = np.tril(centre) + np.tril(centre, -1).T  # exactly symmetric
  return np.array(offsets, np.int64).reshape(len(offsets), len(ksize)), centre, positive


def _conv_schur_sq(taps: np.ndarray, grams: tuple[np.ndarray, np.ndarray, np.ndarray],
                   enough: float = math.inf) -> float:
  """The row-sum bound on the squared norm of one group's conv, ``taps`` ``(*k, in_g,
  out_g)`` and their input-side ``grams`` (:func:`_offset_grams`); see
  :func:`conv_row_sum_bound`."""
  offsets, centre, positive = grams
  in_g, out_g = taps.shape[-2:]
  count = math.prod(taps.shape[:-2])
  # Each G[s] entry sums <= count * out_g products; |G| summed over 2 O + 1 offsets.
  err = 2.0 * gamma(count * out_g + 2 * len(offsets) + 2)
  abs_positive = np.abs(positive).sum(0)
  abs_gram = np.abs(centre) + abs_positive + abs_positive.T
  absk_sum = np.abs(taps.reshape(count, in_g, out_g)).sum(0)  # (in_g, out_g): sum over taps
  # sum_{s, j} (sum_{t - u = s} |K_t| |K_u|^T)_ij q_j = (sum_t |K_t|) (sum_u |K_u|)^T q.
  slack = lambda q: err * (absk_sum @ (absk_sum.T @ q))
  return _schur_bound(abs_gram, slack, enough=enough)


@_one_blas_thread
def conv_row_sum_bound(kernel: np.ndarray, *, feature_group_count: int) -> float:
  """Rigorous bound on the l2 norm of a convolution with kernel ``(*k, in // g, out)``.

  Per group, the Gram ``G[s] = sum_{t - u = s} K_t K_u^T`` is computed in float64 with the
  same error term as :func:`dense_row_sum_bound` (``gamma'`` over the ``T out_g`` products
  of an entry and the ``2 O + 1`` offsets summed); the Schur test on ``sum_s |G[s]|``
  bounds the conv's norm for zero and circular padding, any input size, stride and
  dilation (AOL Theorem 2).
  """
  k = np.asarray(kernel, np.float64)
  g = feature_group_count
  c_out_g = k.shape[-1] // g
  lip_sq = 0.0
  for group in range(g):
    kg = k[..., group * c_out_g:(group + 1) * c_out_g]
    lip_sq = max(lip_sq, _conv_schur_sq(kg, _offset_grams(kg)))
  return inflate(math.sqrt(lip_sq), 2)


_MEMO: dict = {}
_MEMO_SIZE = 4096


def _memoised(fn):
  """``fn(kernel, **options)`` computed once per distinct kernel (its bytes, shape and dtype)
  and options: a trained model's layers are bounded once, however often they are asked."""

  @functools.wraps(fn)
  def memoised(kernel: ArrayLike, **options) -> float:
    arr = np.ascontiguousarray(np.asarray(kernel))
    key = (fn.__name__, arr.shape, str(arr.dtype), hashlib.sha256(arr.tobytes()).hexdigest(),
           repr(sorted(options.items())))
    if key not in _MEMO:
      if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.clear()
      _MEMO[key] = fn(arr, **options)
    return _MEMO[key]

  return memoised


def _schur_dense(side: np.ndarray, gram: np.ndarray, enough: float) -> float:
  """The row-sum bound on ``||side||`` (a hook: the tests replace it to check the tight bound
  alone)."""
  return inflate(math.sqrt(_dense_schur_sq(side, gram, enough)), 2)


@_memoised
@_one_blas_thread
def dense_norm_bound(kernel: ArrayLike) -> float:
  """A rigorous upper bound on the spectral norm ``||W||_2`` of a 2-D kernel.

  ``||W||_2^2 = lambda_max(W^T W)`` (the Gram over the smaller side), bounded by the
  Cholesky-verified shift of the module docstring: for the kernel scaled by ``2^-p`` to
  entries of order 1, ``||W||^2 <= s + 2 u max|A_ii| + gamma_{n+1} tr(A) / (1 - gamma_{n+1})
  + gamma_k ||W||_F^2`` (plus underflow terms) whenever the float64 Cholesky factorisation of
  ``A = fl(s I - fl(W^T W))`` succeeds; ``s`` is a Lanczos or LAPACK estimate of
  ``lambda_max`` raised by ``2^-20`` relative. A kernel of one sign (such as ``|W|``) is
  bounded without a Gram, by Collatz-Wielandt on power iterates (module docstring), in
  ``O(n k)`` per iterate. The result is at least the exact norm of the kernel as stored
  (whatever its float dtype; rounding of this computation included) and typically within
  ``1e-5`` relative of it; it is never above the AOL row-sum (Schur) bound (for a kernel of
  one sign the power bound is that bound, computed without the Gram). An all-zero kernel
  gives 0.

  Args:
    kernel: a 2-D floating-point array (``(in, out)`` or any orientation), finite.

  Returns:
    The bound, a Python float.

  Example:
    >>> import numpy as np
    >>> w = np.diag([3.0, 2.0, 1.0])
    >>> b = dense_norm_bound(w)
    >>> 3.0 <= b <= 3.0 * (1 + 1e-5)
    True
  """
  w = _as_float64(kernel, "dense_norm_bound")
  if w.ndim != 2:
    raise ValueError(f"dense_norm_bound: kernel must be 2-D, got shape {w.shape}; for a conv "
                     "kernel use conv_norm_bound.")
  if not np.any(w):
    return 0.0
  scaled, p = _scaled(w)
  side = _smaller_side(scaled)
  subnormal = math.sqrt(w.size) * _SUBNORMAL  # entries lost to underflow in the scaling
  if np.all(side >= 0) or np.all(side <= 0):
    # One sign: ||W|| = ||-W||; the power bound is also the row-sum bound of |G| = G.
    power, converged = _nonneg_norm_bound(np.abs(side))
    if converged:
      return _unscale_up(_up(power + subnormal), p)
  else:
    power = math.inf
  gram = side @ side.T
  sigma = min(power, _sigma_max_upper_gram(side, gram))
  # The row-sum bound as dense_row_sum_bound computes it (its inflation covers the
  # subnormal term).
  schur = _schur_dense(side, gram, enough=sigma * sigma)
  return min(_unscale_up(_up(sigma + subnormal), p), _unscale_up(schur, p))

def _decimal_cos_sin(x: decimal.Decimal) -> tuple[decimal.Decimal, decimal.Decimal]:
  """cos and sin of ``|x| <= 7`` by their Taylor series, in the current decimal context."""
  cos, sin = decimal.Decimal(0), decimal.Decimal(0)
  term, k = decimal.Decimal(1), 0  # x^k / k!
  tiny = decimal.Decimal(10) ** -75
  while True:
    if k % 4 == 0:
      cos += term
    elif k % 4 == 1:
      sin += term
    elif k % 4 == 2:
      cos -= term
    else:
      sin -= term
    k += 1
    term = term * x / k
    if k > 20 and abs(term) < tiny:
      return cos, sin


_PI = decimal.Decimal("3.14159265358979323846264338327950288419716939937510582097494459230781")


@functools.lru_cache(maxsize=32)
def _unit_circle_table(n: int) -> tuple[np.ndarray, np.ndarray]:
  """``cos(2 pi l / n)``, ``sin(2 pi l / n)`` for ``l < n``, each within ``2^-52`` of exact.

  Computed in 80-digit decimal arithmetic (Taylor series truncated below ``1e-75``; the
  decimal rounding and the truncation of ``pi`` are below ``1e-60``), then rounded to the
  nearest double (``float(Decimal)`` rounds correctly): error at most ``2^-53 + 1e-60``.
  The platform's ``cos``/``sin`` are not used, so no libm accuracy is assumed.
  """
  cos, sin = np.empty(n), np.empty(n)
  with decimal.localcontext() as ctx:
    ctx.prec = 80
    for l in range(n):
      c, s = _decimal_cos_sin(2 * _PI * l / n)
      cos[l], sin[l] = float(c), float(s)
  return cos, sin


def _grid_factor(degrees: Sequence[int], n: int) -> float:
  """``1 / (1 - theta^2 / 2)`` rounded up, ``theta = (pi / n) sum_j d_j / 2``."""
  spread = sum(degrees)
  theta = _up(_up(_up(math.pi * (1 + 2 * _U)) * spread) / (2 * n))  # math.pi < pi
  t2 = _up(_up(theta * theta) / 2.0)
  if t2 >= 0.5:
    raise ValueError(f"grid_size={n} is too small for a kernel spanning {tuple(degrees)} taps "
                     f"beyond the first: use at least {math.ceil(math.pi * spread)}.")
  return _up(1.0 / (1.0 - t2) * (1 + 4 * _U))  # covers the rounding of 1 - t2 and of /


def _samples(nd: int, n: int) -> np.ndarray:
  """Grid indices ``m`` in ``[0, n)^nd``, one of each pair ``{m, -m mod n}``."""
  grid = np.stack(np.meshgrid(*[np.arange(n)] * nd, indexing="ij"), -1).reshape(-1, nd)
  flat = np.ravel_multi_index(grid.T, (n,) * nd)
  neg = np.ravel_multi_index(((-grid) % n).T, (n,) * nd)
  return grid[flat <= neg]


_CHUNK_ENTRIES = 2 ** 20  # entries of P per chunk of samples (8 MiB: malloc reuses it)
_TOLERANCE = 2e-3  # default: refine boxes until the bound is within 0.2 % of the largest sample
_SAMPLE_BUDGET = 2.0 ** 32  # default cost of one group's symbol samples, in (2 side)^3 units


def default_max_samples(first_level: int, spatial_dims: int, side: int) -> int:
  """The default sample budget of one group of :func:`conv_norm_bound`.

  Each sample costs a Cholesky factorisation of size ``2 side`` (``side = min(c_in / g,
  c_out / g)``), about ``(2 side)^3 / 3`` flops. The budget is ``2^32`` units of
  ``(2 side)^3``, at least the ``first_level`` boxes (which must all be sampled) and at most
  enough to split each of them once (``3^d first_level``). A narrow kernel thus gets the
  second level (within 1.02 % of the sup), a wide one fewer refinements: a 3x3 kernel of
  side 192 gets only its 113 first-level samples (within 10 %), side 128 gets 256 samples,
  side 64 all 1017.
  """
  affordable = int(_SAMPLE_BUDGET // (2 * side) ** 3)
  return max(first_level, min(3 ** spatial_dims * first_level, affordable))


class _SymbolGram:
  """``K^(w) K^(w)^* = P + i Q`` of one group's taps ``(*k, a, b)``, ``a <= b``, from its
  Gram taps, with the norm error of the computed ``[[P, -Q], [Q, P]]`` (module docstring)."""

  def __init__(self, taps: np.ndarray,
               grams: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
    a, b = taps.shape[-2:]
    self.offsets, centre, positive = _offset_grams(taps) if grams is None else grams
    self.side = a
    count, num = math.prod(taps.shape[:-2]), len(self.offsets)
    transposed = np.swapaxes(positive, 1, 2)
    # [G[0]; G[s] + G[s]^T] and [G[s] - G[s]^T], flattened: each sample is one row of a
    # product with them.
    self.even = np.concatenate([centre[None], positive + transposed]).reshape(num + 1, a * a)
    self.odd = (positive - transposed).reshape(num, a * a)
    # float32 copies for the estimates, which need no rigour and half the memory traffic.
    self.even32, self.odd32 = self.even.astype(np.float32), self.odd.astype(np.float32)
    dots = 2 * count * b
    g = _gamma(dots)
    c = _up(_up(_up(g * (1 + _TWIDDLE_ERROR)) + _TWIDDLE_ERROR) +
            _up(_up(_gamma(num + 2) * (1 + g)) * (1 + _TWIDDLE_ERROR)))
    abs_sum = np.sum(np.abs(taps.reshape(count, a, b)), axis=0)  # A, rounded down by <= gamma_T
    a_sq = _up(_sq_frobenius_up(abs_sum) * _up(1.0 + 2.0 * _gamma(count)) ** 2)
    self.error = _up(_up(2.0 * _up(c * a_sq)) + 2 * a * (dots + num + 2) * _UNDERFLOW)

  def blocks(self, points: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``P``, ``Q`` ``(S, a, a)`` at ``w = 2 pi points / n`` (``points`` ``(S, nd)``)."""
    even, odd = self._twiddles(points, n)
    a = self.side
    return (even @ self.even).reshape(-1, a, a), (odd @ self.odd).reshape(-1, a, a)

  def hermitian32(self, points: np.ndarray, n: int) -> np.ndarray:
    """``P + i Q`` ``(S, a, a)`` in complex64, for the estimates (no rigour needed)."""
    even, odd = self._twiddles(points, n)
    h = np.empty((len(points), self.side ** 2), np.complex64)
    np.matmul(even.astype(np.float32), self.even32, out=h.real)
    np.matmul(odd.astype(np.float32), self.odd32, out=h.imag)
    return h.reshape(-1, self.side, self.side)

  def _twiddles(self, points: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``[1, cos(w.s)]`` and ``[-sin(w.s)]`` of each sample's product."""
    cos, sin = _unit_circle_table(n)
    phase = (points @ self.offsets.T) % n  # exact integers: (S, O)
    return np.concatenate([np.ones((len(points), 1)), cos[phase]], axis=1), -sin[phase]

  def chunks(self, count: int) -> list[np.ndarray]:
    size = max(1, _CHUNK_ENTRIES // self.side ** 2)
    return [np.arange(i, min(i + size, count)) for i in range(0, count, size)]


def _lanczos_top(h: np.ndarray, steps: int) -> np.ndarray:
  """Lanczos estimates (Ritz values, from below) of ``lambda_max`` of the Hermitian ``h``
  ``(batch, a, a)``."""
  batch, a, _ = h.shape
  start = (np.ones(a) + 1j * np.linspace(0.0, 1.0, a)).astype(h.dtype)
  v = np.tile(start / np.linalg.norm(start), (batch, 1))
  previous = np.zeros_like(v)
  real = np.finfo(h.dtype).dtype
  beta = np.zeros(batch, real)
  alphas, betas = [], []
  for _ in range(steps):
    w = (h @ v[..., None])[..., 0]
    alpha = np.einsum("bi,bi->b", v.conj(), w).real
    w -= alpha[:, None] * v + beta[:, None] * previous
    beta = np.linalg.norm(w, axis=1)
    alphas.append(alpha)
    betas.append(beta)
    previous, v = v, w / np.maximum(beta, 1e-30)[:, None]
  tri = np.zeros((batch, steps, steps), real)
  i = np.arange(steps)
  tri[:, i, i] = np.stack(alphas, axis=1)
  off = np.stack(betas[:-1], axis=1) if steps > 1 else np.zeros((batch, 0))
  tri[:, i[:-1], i[1:]] = off
  tri[:, i[1:], i[:-1]] = off
  return np.linalg.eigvalsh(tri)[:, -1]


def _estimate_batch_lambda_max(h: np.ndarray, exact: bool = False) -> np.ndarray:
  """Float estimates of ``lambda_max`` of each Hermitian ``h[i] = P + i Q`` (no guarantee
  either way): LAPACK's eigenvalues if ``exact`` or the side is small, else
  :func:`_lanczos_top`."""
  if exact or h.shape[-1] <= _EIGVALSH_UP_TO:
    return np.linalg.eigvalsh(h)[:, -1].astype(np.float64)
  return _lanczos_top(h, _LANCZOS_STEPS).astype(np.float64)


def _symbol_estimates(symbol: _SymbolGram, points: np.ndarray, n: int) -> np.ndarray:
  """Float estimates of ``||K^(2 pi m / n)||_2`` for each row ``m`` of ``points``."""

  def chunk(index):
    return _estimate_batch_lambda_max(symbol.hermitian32(points[index], n))

  parts = _parallel_map(chunk, symbol.chunks(len(points)))
  return np.sqrt(np.maximum(np.concatenate(parts), 0.0))


def _sample_bounds(symbol: _SymbolGram, points: np.ndarray, n: int,
                   targets: np.ndarray) -> np.ndarray:
  """Rigorous upper bounds on ``||K^(2 pi m / n)||_2`` for each row ``m`` of ``points``,
  each about ``max(target, the norm) (1 + 2^-21)``: the shift of a sample is placed at its
  ``target`` squared, or at LAPACK's eigenvalue if that factorisation fails."""

  def chunk(index):
    p, q = symbol.blocks(points[index], n)
    a = symbol.side

    def load(b, out):
      # -[[P, -Q], [Q, P]] from the transposed (Fortran-ordered) blocks: P is symmetric and Q
      # antisymmetric, so -P^T and Q^T obey the error bounds of -P and -Q.
      np.negative(p[b].T, out=out[:a, :a])
      np.copyto(out[a:, :a], q[b].T)
      np.negative(p[b].T, out=out[a:, a:])

    diagonal = np.diagonal(p, axis1=1, axis2=2)
    improve = lambda failed: _estimate_batch_lambda_max(p[failed] + 1j * q[failed], exact=True)
    lam = _lambda_max_upper(load, np.concatenate([diagonal, diagonal], axis=1),
                            np.square(targets[index]), improve)
    return _vup(np.sqrt(_vup(lam + symbol.error)))

  return np.concatenate(_parallel_map(chunk, symbol.chunks(len(points))))


def _symbol_bound(taps: np.ndarray, grid_size: int | None, tolerance: float,
                  max_samples: int | None,
                  grams: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> float:
  """Rigorous upper bound on ``sup_w ||K^(w)||_2`` (one group, ``a <= b``; every spatial size
  ``> 1``; ``grams``: its :func:`_offset_grams` if already computed).

  With ``grid_size``: the uniform grid and its factor. Otherwise cells: the torus is tiled by
  boxes of half-width ``pi / N_L`` around samples; if ``w*`` lies in a box, the box's sample
  gives ``S <= sigma(sample) / (1 - theta_L^2 / 2)`` (the grid argument needs only the
  nearest sample), so ``S <= max_boxes`` of that. A box whose estimated bound exceeds
  ``(1 + tolerance)`` times the largest estimate is split into ``3^d`` boxes (the centre
  sample is kept), from ``N_0`` with factor ``<= 1.1`` down to factor ``<= 1 + tolerance /
  2``, while at most ``max_samples`` samples are spent (default :func:`default_max_samples`).
  Then every box is verified at the largest estimated box bound. Boxes of one half of the
  torus suffice (``||K^(-w)|| = ||K^(w)||``).
  """
  ksize = taps.shape[:-2]
  nd = len(ksize)
  degrees = [k - 1 for k in ksize]
  symbol = _SymbolGram(taps, grams)
  if grid_size is not None:
    points = _samples(nd, grid_size)
    factor = _grid_factor(degrees, grid_size)
    values = _symbol_estimates(symbol, points, grid_size)
    bounds = _sample_bounds(symbol, points, grid_size, np.full(len(points), values.max()))
    return _up(float(bounds.max()) * factor)
  spread = sum(degrees) / 2
  n0 = max(2, math.ceil(math.pi * spread / math.sqrt(2 * (1 - 1 / 1.1))))
  levels = 0
  while _grid_factor(degrees, n0 * 3 ** levels) > 1 + tolerance / 2:
    levels += 1
  n = n0 * 3 ** levels  # the finest grid; box centres are integer points on it
  factors = np.array([_grid_factor(degrees, n0 * 3 ** level) for level in range(levels + 1)])
  centres = _samples(nd, n0) * 3 ** levels
  values = _symbol_estimates(symbol, centres, n)
  level = np.zeros(len(values), int)
  spent = len(values)
  if max_samples is None:
    max_samples = default_max_samples(len(values), nd, min(taps.shape[-2:]))
  offsets = np.array(list(np.ndindex(*(3,) * nd))) - 1
  offsets = offsets[np.any(offsets != 0, axis=1)]
  while True:
    estimated = values * factors[level]
    candidates = np.flatnonzero((estimated > values.max() * (1 + tolerance)) & (level < levels))
    room = (max_samples - spent) // len(offsets)
    if not candidates.size or not room:
      break
    candidates = candidates[np.argsort(-estimated[candidates], kind="stable")[:room]]
    split = np.zeros(len(values), bool)
    split[candidates] = True
    step = 3 ** (levels - level[split] - 1)  # child spacing on the finest grid
    children = (centres[split][:, None, :] + offsets[None] * step[:, None, None]).reshape(-1, nd)
    children %= n
    level[split] += 1
    centres = np.concatenate([centres, children])
    values = np.concatenate([values, _symbol_estimates(symbol, children, n)])
    level = np.concatenate([level, np.repeat(level[split], len(offsets))])
    spent += len(children)
  box_factors = factors[level]
  target = float(np.max(values * box_factors))
  bounds = _sample_bounds(symbol, centres, n, target / box_factors)
  return _up(float(np.max(bounds * box_factors)) * (1 + 2 * _U))


def _schur_conv(taps: np.ndarray, grams: tuple[np.ndarray, np.ndarray, np.ndarray],
                enough: float) -> float:
  """The row-sum bound of one group's conv (a hook: the tests replace it to check the tight
  bound alone)."""
  return inflate(math.sqrt(_conv_schur_sq(taps, grams, enough)), 2)


def _trimmed(kernel: np.ndarray, nd: int) -> np.ndarray:
  """The kernel without all-zero border taps (the symbol only gains a unimodular phase)."""
  nonzero = np.any(kernel != 0, axis=(-2, -1))
  index = []
  for j in range(nd):
    along = np.any(nonzero, axis=tuple(i for i in range(nd) if i != j))
    hits = np.flatnonzero(along)
    index.append(slice(hits[0], hits[-1] + 1))
  return kernel[tuple(index)]


@_memoised
@_one_blas_thread
def conv_norm_bound(kernel: ArrayLike, *, strides: int | Sequence[int] = 1,
                    kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
                    padding: padding_lib.PaddingLike = "SAME",
                    tolerance: float = _TOLERANCE, max_samples: int | None = None,
                    grid_size: int | None = None) -> float:
  """A rigorous upper bound on the l2 operator norm of a convolution, for any input size.

  The conv is the one of :class:`aol_jax.AOLConv`: ``kernel`` ``(*k, c_in / g, c_out)``
  (1 to 3 spatial dims), zero padding ('SAME', 'VALID', explicit) or 'CIRCULAR', any
  ``strides`` and ``kernel_dilation``, ``g = feature_group_count`` groups. All of them have
  norm at most ``S = max_groups sup_w ||sum_t K_t exp(-i w.t)||_2`` (module docstring), and
  ``S <= ||K^(w_B)||_2 / (1 - theta_B^2 / 2)`` for the box ``B`` of half-width ``pi / N_B``
  around the sample ``w_B`` that contains the maximiser, ``theta_B = (pi / N_B) sum_j (k_j - 1)
  / 2``; the bound is the max of that over a tiling of the torus by boxes, refined (split
  3^d-fold) where it exceeds ``1 + tolerance`` times the largest sample, each sample bounded
  rigorously in float64 (Cholesky-verified, rounding included). The first level has
  ``1 / (1 - theta^2 / 2) <= 1.1``, the second ``<= 1.0102``: unrefined, the result is within
  10 % of ``S``; once every box near the maximum is split once (``3^d - 1`` new samples per
  box) within 1.02 %, and within ``tolerance`` if ``max_samples`` allows further splits.
  The default budget (:func:`default_max_samples`) is capped by the cost of a sample, so a
  narrow kernel gets the second level and a wide one (side 192) the first only. A spent
  budget only loosens the bound, never voids it. Strides are not exploited (the bound is
  that of stride 1). The result is never above the AOL row-sum (Schur) bound; an all-zero
  kernel gives 0.

  Args:
    kernel: ``(*k, c_in / g, c_out)``, floating point, finite.
    strides, kernel_dilation: positive ints, one per spatial dim or one for all.
    feature_group_count: ``g``, dividing ``c_out``.
    padding: 'SAME', 'VALID', 'CIRCULAR', or explicit zero padding
      (:func:`aol_jax.padding.normalize_padding`); reflect-type paddings are refused.
    tolerance: relative target above the largest sample (default 0.2 %), reached only if
      ``max_samples`` allows.
    max_samples: symbol samples per group at most (each costs a Cholesky factorisation
      of size ``2 min(c_in / g, c_out / g)``); default :func:`default_max_samples` (between the
      113 first-level and 1017 samples for a 3x3 kernel, fewer the wider it is); a larger
      budget lets ``tolerance`` be approached.
    grid_size: if given, one uniform grid of that size with its factor, no refinement.

  Returns:
    The bound, a Python float.

  Example:
    >>> import numpy as np
    >>> k = np.zeros((3, 3, 2, 2)); k[1, 1] = np.eye(2); k[0, 0] = 0.5 * np.eye(2)
    >>> b = conv_norm_bound(k)  # symbol I (1 + 0.5 exp(-i w.(1, 1))): sup 1.5
    >>> 1.5 <= b <= 1.5 * 1.011
    True
  """
  k = _as_float64(kernel, "conv_norm_bound")
  nd = k.ndim - 2
  if not 1 <= nd <= 3:
    raise ValueError(f"conv_norm_bound: kernel must be (*spatial, c_in/g, c_out) with 1 to 3 "
                     f"spatial dims, got shape {k.shape}.")
  for name, value in (("strides", strides), ("kernel_dilation", kernel_dilation)):
    checks.positive_ints(value, nd, f"conv_norm_bound: {name}")
  padding_lib.normalize_padding(padding, nd)  # refuses paddings that void the bound
  g = checks.feature_groups(feature_group_count, "conv_norm_bound", c_out=k.shape[-1])
  if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
    raise ValueError(f"conv_norm_bound: tolerance must be in (0, 1), got {tolerance!r}.")
  if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
    raise ValueError(f"conv_norm_bound: max_samples must be a positive int, got "
                     f"{max_samples!r}.")
  if grid_size is not None and (not isinstance(grid_size, int) or grid_size < 2):
    raise ValueError(f"conv_norm_bound: grid_size must be an int >= 2, got {grid_size!r}.")
  if not np.any(k):
    return 0.0
  scaled, p = _scaled(k)
  trimmed = _trimmed(scaled, nd)
  ksize = tuple(d for d in trimmed.shape[:nd] if d > 1)
  taps = trimmed.reshape(*ksize, *trimmed.shape[nd:])
  c_in_g, c_out_g = k.shape[-2], k.shape[-1] // g
  # Gram taps of the input side give the row-sum bound; when the kernel needs no trimming
  # and the input side is the smaller one, they give the symbol's samples too.
  share = ksize == k.shape[:nd] and c_in_g <= c_out_g
  subnormal = math.sqrt(k.size) * _SUBNORMAL  # entries lost to underflow in the scaling
  bound = 0.0
  for group in range(g):
    kg = taps[..., group * c_out_g:(group + 1) * c_out_g]
    if not np.any(kg):
      continue
    grams = _offset_grams(kg) if share else None
    if not ksize:
      sigma = _sigma_max_upper_dense(kg)
    elif c_in_g <= c_out_g:
      sigma = _symbol_bound(kg, grid_size, tolerance, max_samples, grams)
    else:
      sigma = _symbol_bound(np.swapaxes(kg, -1, -2), grid_size, tolerance, max_samples)
    # The row-sum bound of the group as conv_row_sum_bound computes it (its inflation covers
    # the subnormal term); each group's norm is at most the smaller of the two bounds.
    scaled_g = scaled[..., group * c_out_g:(group + 1) * c_out_g]
    schur = _schur_conv(scaled_g, grams if share else _offset_grams(scaled_g),
                        enough=sigma * sigma)
    bound = max(bound, min(_unscale_up(_up(sigma + subnormal), p), _unscale_up(schur, p)))
  return bound
