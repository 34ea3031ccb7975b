"""Worst-case rounding bounds: the margin slack of ``rounding='float64'``.

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

from aol_jax._src import spectral_bounds

UNDERFLOW_ALLOWANCE = 1e-250
"""Absolute error covering underflow (flushed to zero or gradual) in the float64 evaluation:
each operation loses at most ``2^-1022 < 2.3e-308`` to it, so 1e-250 covers any network of
fewer than 10^50 operations whose Lipschitz constants stay below 10^7."""


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
    g = spectral_bounds.gamma(dot_length)
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
  return WorstCaseTerms(lipschitz=spectral_bounds.inflate(a, k), offset=spectral_bounds.inflate(b, k),
                        error_slope=2.0 * p, error_intercept=2.0 * q + UNDERFLOW_ALLOWANCE)


def dense_kernel_terms(kernel: ArrayLike, bias: ArrayLike | None, *,
                       lipschitz: float | None = None) -> WorstCaseTerms:
  """:class:`WorstCaseTerms` of ``y = x @ W + b`` with the stored kernel ``W`` ``(in, out)``;
  ``lipschitz`` (default :func:`aol_jax.dense_row_sum_bound`) a rigorous bound on ``||W||``."""
  w = np.asarray(kernel, np.float64)
  n_in, n_out = w.shape
  lip = spectral_bounds.dense_row_sum_bound(w) if lipschitz is None else lipschitz
  absw = np.abs(w)
  abs_norm = spectral_bounds.abs_norm_bound(absw.sum(0), absw.sum(1), max(n_in, n_out))
  bias_norm = 0.0 if bias is None else spectral_bounds.inflate(np.linalg.norm(np.asarray(bias, np.float64)),
                                                n_out)
  return WorstCaseTerms.affine(lip, abs_norm, bias_norm, n_in + (bias is not None))


def conv_kernel_terms(kernel: ArrayLike, bias: ArrayLike | None, *, feature_group_count: int,
                      output_positions: int, lipschitz: float | None = None) -> WorstCaseTerms:
  """:class:`WorstCaseTerms` of a convolution with the stored kernel ``(*k, in // g, out)``.

  ``lipschitz`` defaults to :func:`aol_jax.conv_row_sum_bound`. ``|| |T| ||`` is bounded by
  its row sums (per output channel) and column sums (per input channel), and the bias
  broadcast over ``output_positions`` has norm ``sqrt(output_positions) ||b||``.
  """
  k = np.asarray(kernel, np.float64)
  nd = k.ndim - 2
  taps = math.prod(k.shape[:nd])
  c_in_g, c_out = k.shape[-2:]
  g = feature_group_count
  lip = (spectral_bounds.conv_row_sum_bound(k, feature_group_count=g) if lipschitz is None
         else lipschitz)
  absk = np.abs(k)
  rows = absk.sum(axis=tuple(range(nd)) + (nd,))  # per output channel: sum over taps, inputs
  cols = absk.reshape(taps, c_in_g, g, c_out // g).sum(axis=(0, 3)).reshape(-1)
  abs_norm = spectral_bounds.abs_norm_bound(rows, cols, taps * max(c_in_g, c_out))
  bias_norm = 0.0
  if bias is not None:
    bias_norm = spectral_bounds.inflate(math.sqrt(output_positions) * np.linalg.norm(
        np.asarray(bias, np.float64)), c_out + 2)
  return WorstCaseTerms.affine(lip, abs_norm, bias_norm, taps * c_in_g + (bias is not None))


def normalisation_terms(mean: Sequence[float] | None, std: Sequence[float] | None,
                        input_shape: Sequence[int]) -> WorstCaseTerms:
  """``(x - mean) / std`` per channel (last axis), two roundings per element in float64."""
  channels = input_shape[-1]
  pixels = math.prod(input_shape[:-1])
  mean = np.zeros(channels) if mean is None else np.broadcast_to(np.asarray(mean, np.float64),
                                                                 (channels,))
  std = np.ones(channels) if std is None else np.broadcast_to(np.asarray(std, np.float64),
                                                              (channels,))
  inv = spectral_bounds.inflate(np.max(1.0 / std), 1)
  mean_norm = spectral_bounds.inflate(math.sqrt(pixels) * np.linalg.norm(mean), channels + 2)
  g = spectral_bounds.gamma(2)
  return WorstCaseTerms(lipschitz=inv, offset=spectral_bounds.inflate(inv * mean_norm, 1),
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
  r = jnp.asarray(input_norm) * (1.0 + 2.0 * spectral_bounds.gamma(input_size + 2))
  eps = jnp.asarray(eps, r.dtype)
  allow = math.sqrt(2) * (terms.error_slope * (2 * r + eps) + 2 * terms.error_intercept)
  return allow + 16 * spectral_bounds.FLOAT64_UNIT_ROUNDOFF * (math.sqrt(2) * terms.lipschitz * eps + allow)
