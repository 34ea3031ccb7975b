"""Worst-case rounding bounds: the margin slack of ``rounding='worst_case'``.

The certified network is evaluated in float64 on its frozen float32 parameters. Two rigorous
bounds make the certificate hold for that evaluation whatever the rounding errors are:

* the Lipschitz constant of each frozen float32 kernel, from the AOL row-sum (Schur) test
  re-checked in float64 with its own error term (:func:`dense_kernel_terms`,
  :func:`conv_kernel_terms`): ``||T||^2 <= max_i (sum_{s, j} |G[s, i, j]| q_j) / q_i`` for
  every ``q > 0`` (AOL, Theorems 1-2; Collatz-Wielandt), with ``G`` the Gram of the kernel;
* the float64 forward error, from the deterministic bound ``|fl(w^T x + b) - (w^T x + b)| <=
  gamma_n (|w|^T |x| + |b|)``, ``gamma_n = n u / (1 - n u)``, ``u = 2^-53`` (Higham,
  "Accuracy and Stability of Numerical Algorithms", 2nd ed., Section 3.1), which holds for
  any summation order, blocking and fused multiply-add.

Every layer states its part as :class:`WorstCaseTerms`; :func:`compose` chains them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from aol_jax.gram import offset_table

FLOAT64_UNIT_ROUNDOFF = 2.0 ** -53
"""``u`` for float64 (round to nearest)."""

UNDERFLOW_ALLOWANCE = 1e-250
"""Absolute error covering underflow (flushed to zero or gradual) in the float64 evaluation:
each operation loses at most ``2^-1022 < 2.3e-308`` to it, so 1e-250 covers any network of
fewer than 10^50 operations whose Lipschitz constants stay below 10^7."""


def gamma(n: int, unit_roundoff: float = FLOAT64_UNIT_ROUNDOFF) -> float:
  """``gamma_n = n u / (1 - n u)``: a float dot product of length ``n`` errs by at most
  ``gamma_n |x|^T |y|`` (products and sums, in any order)."""
  if n * unit_roundoff >= 0.5:
    raise ValueError(f"A dot product of length {n} is too long for a float64 error bound.")
  return n * unit_roundoff / (1 - n * unit_roundoff)


def _inflate(value: float, operations: int) -> float:
  """``value`` times ``1 + 2 gamma_k``: covers the float64 rounding of computing ``value``
  itself from non-negative terms in ``operations`` steps."""
  return float(value) * (1.0 + 2.0 * gamma(operations + 2))


@dataclasses.dataclass(frozen=True)
class WorstCaseTerms:
  """What a layer ``f`` states about itself for the worst-case certificate.

  For every input ``x`` and its float64 evaluation ``fl(f(x))``:
  ``||f(x) - f(y)|| <= lipschitz ||x - y||``, ``||f(0)|| <= offset`` and
  ``||fl(f(x)) - f(x)|| <= error_slope ||x|| + error_intercept`` (l2 norms, exact arithmetic
  for ``f``, the float32 parameters as stored).

  Attributes:
    lipschitz: rigorous upper bound on the l2 Lipschitz constant of ``f``.
    offset: upper bound on ``||f(0)||_2`` (an affine layer: its broadcast bias).
    error_slope, error_intercept: the float64 evaluation error bound above.
  """
  lipschitz: float
  offset: float = 0.0
  error_slope: float = 0.0
  error_intercept: float = 0.0

  @classmethod
  def exact(cls, lipschitz: float) -> WorstCaseTerms:
    """A map that float64 evaluates exactly and that maps 0 to 0 (permutations, max/min)."""
    return cls(lipschitz=float(lipschitz))

  @classmethod
  def affine(cls, lipschitz: float, abs_norm: float, bias_norm: float,
             dot_length: int) -> WorstCaseTerms:
    """``f(x) = T x + b`` computed as sums of at most ``dot_length`` terms (the bias counted).

    ``abs_norm`` bounds ``|| |T| ||_2`` (``T`` with every entry made non-negative) and
    ``bias_norm`` bounds ``||b||_2``, so ``gamma_n (|T| |x| + |b|)`` has l2 norm at most
    ``gamma_n (abs_norm ||x|| + bias_norm)``.
    """
    g = gamma(dot_length)
    return cls(lipschitz=float(lipschitz), offset=float(bias_norm), error_slope=g * abs_norm,
               error_intercept=g * bias_norm)


def compose(terms: Sequence[WorstCaseTerms]) -> WorstCaseTerms:
  """The :class:`WorstCaseTerms` of the layers applied in order.

  With ``M_k`` the exact activation norm and ``e_k`` the float64 error entering layer ``k``:
  ``M_{k+1} <= L_k M_k + c_k`` and ``e_{k+1} <= L_k e_k + s_k (M_k + e_k) + i_k``. Both are
  affine in the input norm ``r``; the result is the network's ``L = prod L_k``, offset,
  slope and intercept. Every coefficient is a non-negative float64 sum; the slope and the
  intercept are doubled and the product inflated to cover their own rounding.
  """
  a, b, p, q = 1.0, 0.0, 0.0, 0.0  # M = a r + b, e = p r + q
  for t in terms:
    lip, off, s, i = t.lipschitz, t.offset, t.error_slope, t.error_intercept
    p, q = lip * p + s * (a + p), lip * q + s * (b + q) + i
    a, b = lip * a, lip * b + off
  k = 4 * len(terms) + 2
  return WorstCaseTerms(lipschitz=_inflate(a, k), offset=_inflate(b, k),
                        error_slope=2.0 * p, error_intercept=2.0 * q + UNDERFLOW_ALLOWANCE)


def _schur_bound(abs_gram: np.ndarray, slack: Callable[[np.ndarray], np.ndarray],
                 iterations: int = 1000, rtol: float = 1e-9) -> float:
  """Rigorous ``min_q max_i ((A + E) q)_i / q_i`` over power-iteration vectors ``q`` of
  ``A = abs_gram``, with ``E q = slack(q)``.

  Every ``q > 0`` gives a valid bound (Collatz-Wielandt); the iterates approach ``A``'s
  Perron vector, where the bound approaches the Perron root (<= 1 for an AOL-rescaled
  kernel, AOL's own ``q = 1 / d`` being one such vector). The loop stops once the bound is
  within ``rtol`` of the lower estimate ``min_i (A q)_i / q_i``.
  """
  n = abs_gram.shape[0]
  q = np.ones(n)
  best = np.inf
  for _ in range(iterations):
    aq = abs_gram @ q
    best = min(best, float(np.max((aq + slack(q)) / q)))
    if best <= float(np.min(aq / q)) * (1 + rtol) or aq.max() <= 0:
      break
    q = aq / aq.max() + 1e-12
  return _inflate(best, 2 * n + 4)


def _abs_norm_bound(row_sums: np.ndarray, col_sums: np.ndarray, terms: int) -> float:
  """``|| |T| ||_2 <= sqrt(||T||_1 ||T||_inf)`` from non-negative row and column sums."""
  return _inflate(math.sqrt(_inflate(row_sums.max() * col_sums.max(), terms)), 2)


def dense_kernel_norm_bound(kernel: np.ndarray) -> float:
  """Rigorous bound on ``||W||_2`` of a dense kernel ``(in, out)``, computed in float64.

  The Gram over the smaller side, ``G = W W^T`` (AOL's own, ``in <= out``) or ``W^T W``,
  has the same nonzero spectrum ``||W||^2``. Each entry, a dot product of length ``k`` (the
  other side), errs by at most ``gamma_k (|W| |W|^T)_ij``, so ``||W||^2 <= max_i ((|G^| +
  gamma' |W| |W|^T) q)_i / q_i`` (``gamma' = 2 gamma_{k+2}`` also covers computing
  ``|W| |W|^T q``), which is <= 1 when ``W`` is AOL-rescaled.
  """
  w = np.asarray(kernel, np.float64)
  side = w if w.shape[0] <= w.shape[1] else w.T
  abss = np.abs(side)
  g = 2.0 * gamma(side.shape[1] + 2)
  gram = np.abs(side @ side.T)
  return _inflate(math.sqrt(_schur_bound(gram, lambda q: g * (abss @ (abss.T @ q)))), 2)


def conv_kernel_norm_bound(kernel: np.ndarray, *, feature_group_count: int) -> float:
  """Rigorous bound on the l2 norm of a convolution with kernel ``(*k, in // g, out)``.

  Per group, the Gram ``G[s] = sum_{t - u = s} K_t K_u^T`` is computed in float64 with the
  same error term as :func:`dense_kernel_norm_bound`; the Schur test on ``sum_s |G[s]|``
  bounds the conv's norm for zero and circular padding, any input size, stride and
  dilation (AOL Theorem 2).
  """
  k = np.asarray(kernel, np.float64)
  nd = k.ndim - 2
  ksize = k.shape[:nd]
  taps = math.prod(ksize)
  c_in_g, c_out = k.shape[-2:]
  g = feature_group_count
  c_out_g = c_out // g
  flat = k.reshape(taps, c_in_g, g, c_out_g)
  table, count = offset_table(ksize)
  err = 2.0 * gamma(taps * c_out_g + 2)  # products per Gram entry, at most
  lip_sq = 0.0
  for group in range(g):
    kg = flat[:, :, group, :]  # (taps, in_g, out_g)
    rows = kg.reshape(taps * c_in_g, c_out_g)
    pairs = (rows @ rows.T).reshape(taps, c_in_g, taps, c_in_g).transpose(0, 2, 1, 3)
    per_offset = np.zeros((count, c_in_g, c_in_g))
    np.add.at(per_offset, table, pairs)
    abs_gram = np.abs(per_offset).sum(0)
    absk_sum = np.abs(kg).sum(0)  # (in_g, out_g): sum over taps
    # sum_{s, j} (sum_{t - u = s} |K_t| |K_u|^T)_ij q_j = (sum_t |K_t|) (sum_u |K_u|)^T q.
    slack = lambda q, a=absk_sum: err * (a @ (a.T @ q))
    lip_sq = max(lip_sq, _schur_bound(abs_gram, slack))
  return _inflate(math.sqrt(lip_sq), 2)


def dense_kernel_terms(kernel: ArrayLike, bias: ArrayLike | None, *,
                       lipschitz: float | None = None) -> WorstCaseTerms:
  """:class:`WorstCaseTerms` of ``y = x @ W + b`` with the stored kernel ``W`` ``(in, out)``;
  ``lipschitz`` (default :func:`dense_kernel_norm_bound`) a rigorous bound on ``||W||``."""
  w = np.asarray(kernel, np.float64)
  n_in, n_out = w.shape
  lip = dense_kernel_norm_bound(w) if lipschitz is None else lipschitz
  absw = np.abs(w)
  abs_norm = _abs_norm_bound(absw.sum(0), absw.sum(1), max(n_in, n_out))
  bias_norm = 0.0 if bias is None else _inflate(np.linalg.norm(np.asarray(bias, np.float64)),
                                                n_out)
  return WorstCaseTerms.affine(lip, abs_norm, bias_norm, n_in + (bias is not None))


def conv_kernel_terms(kernel: ArrayLike, bias: ArrayLike | None, *, feature_group_count: int,
                      output_positions: int, lipschitz: float | None = None) -> WorstCaseTerms:
  """:class:`WorstCaseTerms` of a convolution with the stored kernel ``(*k, in // g, out)``.

  ``lipschitz`` defaults to :func:`conv_kernel_norm_bound`. ``|| |T| ||`` is bounded by
  its row sums (per output channel) and column sums (per input channel), and the bias
  broadcast over ``output_positions`` has norm ``sqrt(output_positions) ||b||``.
  """
  k = np.asarray(kernel, np.float64)
  nd = k.ndim - 2
  taps = math.prod(k.shape[:nd])
  c_in_g, c_out = k.shape[-2:]
  g = feature_group_count
  lip = (conv_kernel_norm_bound(k, feature_group_count=g) if lipschitz is None
         else lipschitz)
  absk = np.abs(k)
  rows = absk.sum(axis=tuple(range(nd)) + (nd,))  # per output channel: sum over taps, inputs
  cols = absk.reshape(taps, c_in_g, g, c_out // g).sum(axis=(0, 3)).reshape(-1)
  abs_norm = _abs_norm_bound(rows, cols, taps * max(c_in_g, c_out))
  bias_norm = 0.0
  if bias is not None:
    bias_norm = _inflate(math.sqrt(output_positions) * np.linalg.norm(
        np.asarray(bias, np.float64)), c_out + 2)
  return WorstCaseTerms.affine(lip, abs_norm, bias_norm, taps * c_in_g + (bias is not None))


def dense_layer_terms(layer, input_shape: Sequence[int]) -> WorstCaseTerms:
  """:class:`WorstCaseTerms` of an ``AOLDense`` with the kernel it applies (freeze it first)."""
  from aol_jax.certification import kernel_bounds  # noqa: PLC0415  (it imports this module)
  del input_shape
  return dense_kernel_terms(kernel_bounds.applied_kernel(layer), _bias(layer),
                            lipschitz=kernel_bounds.applied_kernel_bound(layer))


def conv_layer_terms(layer, input_shape: Sequence[int]) -> WorstCaseTerms:
  """:class:`WorstCaseTerms` of an ``AOLConv`` with the kernel it applies, for one example
  of ``input_shape``."""
  from aol_jax.certification import kernel_bounds  # noqa: PLC0415  (it imports this module)
  out = jax.eval_shape(layer, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return conv_kernel_terms(kernel_bounds.applied_kernel(layer), _bias(layer),
                           feature_group_count=layer.feature_group_count,
                           output_positions=math.prod(out.shape[1:-1]),
                           lipschitz=kernel_bounds.applied_kernel_bound(layer))


def _bias(layer):
  return None if layer.bias is None else layer.bias[...]


def normalisation_terms(mean: Sequence[float] | None, std: Sequence[float] | None,
                        input_shape: Sequence[int]) -> WorstCaseTerms:
  """``(x - mean) / std`` per channel (last axis), two roundings per element in float64."""
  channels = input_shape[-1]
  pixels = math.prod(input_shape[:-1])
  mean = np.zeros(channels) if mean is None else np.broadcast_to(np.asarray(mean, np.float64),
                                                                 (channels,))
  std = np.ones(channels) if std is None else np.broadcast_to(np.asarray(std, np.float64),
                                                              (channels,))
  inv = _inflate(np.max(1.0 / std), 1)
  mean_norm = _inflate(math.sqrt(pixels) * np.linalg.norm(mean), channels + 2)
  g = gamma(2)
  return WorstCaseTerms(lipschitz=inv, offset=_inflate(inv * mean_norm, 1),
                        error_slope=g * inv, error_intercept=g * inv * mean_norm)


def worst_case_allowance(terms: WorstCaseTerms, input_norm: ArrayLike, eps: ArrayLike, *,
                         input_size: int) -> jax.Array:
  """Margin slack for the float64 evaluation, computed in float64 (under ``enable_x64``).

  ``A = sqrt(2) [S (2 r + eps) + 2 I]`` with ``S, I`` the network's ``error_slope,
  error_intercept`` and ``r`` the input norm: the float64 logits at ``x`` and at any ``x'``
  with ``||x' - x|| <= eps`` (so ``||x'|| <= r + eps``) are within ``S r + I`` and
  ``S (r + eps) + I`` of the exact ones, and the margin is ``sqrt(2)``-Lipschitz in the
  logits. ``input_norm`` is the float64 norm of the ``input_size`` entries, inflated here by
  its own rounding; ``16 u (sqrt(2) L eps + A)`` is added so that comparing the computed
  margin with the computed threshold decides the exact comparison.

  Returns ``A`` plus those terms, per example, for :func:`aol_jax.certify`.
  """
  r = jnp.asarray(input_norm) * (1.0 + 2.0 * gamma(input_size + 2))
  eps = jnp.asarray(eps, r.dtype)
  allow = math.sqrt(2) * (terms.error_slope * (2 * r + eps) + 2 * terms.error_intercept)
  return allow + 16 * FLOAT64_UNIT_ROUNDOFF * (math.sqrt(2) * terms.lipschitz * eps + allow)
