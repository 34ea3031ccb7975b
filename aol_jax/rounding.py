"""The probabilistic float32 rounding model: the margin slack of ``rounding='probabilistic'``.

A certificate ``m > sqrt(2) L eps`` is exact-arithmetic; this module adds the slack ``A`` that
keeps it true for the float32 evaluation of the network at ``x`` and at every ``x'`` of the
ball, under the probabilistic rounding model of Higham & Mary (SIAM J. Sci. Comput. 2019).
The rigorous, worst-case alternative is :mod:`aol_jax.worst_case`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
"""``u`` for float32 (round to nearest): every rounded operation has relative error <= u."""


@dataclasses.dataclass(frozen=True)
class RoundingTerms:
  """Sums ``S = sum_k sqrt(n_k)`` over the layers of a network, for :func:`rounding_allowance`.

  Each layer states its own (``layer.rounding_terms()``, :mod:`aol_jax.bounds`); a map that
  float arithmetic evaluates exactly (a permutation, max/min, a reshape) states zeros.

  Attributes:
    forward: ``sum_k sqrt(n_k + 1)`` with ``n_k`` the fan-in of affine layer ``k`` (+1 for
      the bias), plus 2 for an input normalisation (one subtraction, one division).
    rescale: ``sum_k sqrt(a_k + b_k)``, with ``a_k`` the length of one Gram entry's dot
      product and ``b_k`` the number of Gram entries summed into one AOL factor.
  """
  forward: float = 0.0
  rescale: float = 0.0

  def __add__(self, other: RoundingTerms) -> RoundingTerms:
    return RoundingTerms(self.forward + other.forward, self.rescale + other.rescale)


def rounding_allowance(terms: RoundingTerms, activation_norm: ArrayLike, eps: ArrayLike, *,
                       lipschitz_constant: float = 1.0,
                       unit_roundoff: float = FLOAT32_UNIT_ROUNDOFF) -> jax.Array:
  """Margin slack ``A`` so that ``m > sqrt(2) L eps + A`` survives float32 rounding.

  ``A = sqrt(2) u [S_f (2 M + L' eps) + S_r L eps]``, with ``u = 2^-24``, ``S_f, S_r`` the
  :class:`RoundingTerms` of the network (:func:`aol_jax.rounding_terms`, summed over what
  each layer states), ``M = max_k ||x_k||_2`` the largest activation
  norm of the float32 forward pass at ``x`` (``AOLNetwork.logits_and_activation_norm``)
  and ``L' = max(L, 1)``.

  Derivation. Let ``f`` be the network in exact arithmetic with the frozen float32 kernels
  ``W~_k``, and ``f^`` its float32 evaluation. (i) Forward rounding: layer ``k`` computes
  ``W~ x_k + b`` with one rounding per product and per partial sum. Each partial sum over
  the first ``j`` inputs is ``W~ P_j x_k`` (``P_j`` a coordinate projection), of l2 norm
  <= ``||x_k||`` because ``||W~|| <= 1``, and the last one (with the bias) is the layer
  output, of norm <= ``M``. With independent zero-mean rounding errors (the probabilistic
  model of Higham & Mary, SIAM J. Sci. Comput. 2019) the error vector of layer ``k`` has
  RMS norm <= ``u sqrt(n_k + 1) M``. Later layers are 1-Lipschitz and do not amplify it;
  MaxMin, pooling, flattening and channel selection are exact. Summing the per-layer
  errors linearly (not in quadrature, which leaves a factor ``sqrt(depth)`` of headroom
  for the tails) gives ``||f^(z) - f(z)||_2 <= u S_f M(z)``. (ii) Rescaling rounding: the
  float32 factor ``d_i`` of each AOL layer has relative error ``~ u sqrt(a + b)`` under the
  same model, so ``Lip(f) <= L (1 + u S_r)`` to first order. (iii) The margin is
  ``sqrt(2)``-Lipschitz in the logits (l2), and every activation of ``x'`` is within
  ``L' eps`` of that of ``x``, so ``M(x') <= M(x) + L' eps``. Hence, for
  ``||x' - x|| <= eps``::

    m(f^(x')) >= m(f(x')) - sqrt(2) u S_f M(x')
              >= m(f(x)) - sqrt(2) L (1 + u S_r) eps - sqrt(2) u S_f (M(x) + L' eps)
              >= m(f^(x)) - sqrt(2) u S_f M(x) - sqrt(2) L (1 + u S_r) eps
                 - sqrt(2) u S_f (M(x) + L' eps)
               = m(f^(x)) - sqrt(2) L eps - A,

  so ``m(f^(x)) > sqrt(2) L eps + A`` implies ``m(f^(x')) > 0``: the float32 forward pass
  at ``x'`` still puts the label strictly first.

  This is a model-based bound, not a worst-case one: the deterministic bound
  ``gamma_n |W| |x|`` grows like ``n`` and, for these depths, exceeds the margins
  themselves. It assumes true float32 products (``jax.default_matmul_precision`` 'highest',
  not TF32 or bfloat16 passes), which :func:`certify_dataset` enforces. Measured against a
  float64 evaluation of the same frozen kernels, the float32 logit error stays below
  ``u S_f M`` by a factor of about 10 on a small AOL net trained on scikit-learn's digits
  (dense trained kernels accumulate real rounding in every layer), by 350 to 4000 at
  initialisation and 4400 to 8500 with randomly perturbed kernels at small widths, and by
  2500 (init) to 10^5 (perturbed) for the full-size models on 32x32x3 inputs
  (``tests/test_certify.py``, ``tests/test_attacks.py``). The allowance is twice that bound
  times ``sqrt(2)``, since it covers the rounding at both ``x`` and ``x'``.
  """
  m = jnp.asarray(activation_norm, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  lip_eps = lipschitz_constant * eps
  return math.sqrt(2) * unit_roundoff * (
      terms.forward * (2 * m + max(lipschitz_constant, 1.0) * eps) + terms.rescale * lip_eps)
