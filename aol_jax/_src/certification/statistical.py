"""The statistical float32 rounding model: the margin slack of ``'float32_statistical'``.

A certificate ``m > sqrt(2) L eps`` is exact-arithmetic; this module adds the slack ``A`` that
keeps it true for the float32 evaluation of the network at ``x`` and at every ``x'`` of the
ball **under a statistical assumption**: the probabilistic rounding model of Higham & Mary
(SIAM J. Sci. Comput. 2019), independent zero-mean rounding errors, plus a deterministic
absolute term for underflow. The assumption is the model author's to break (long chains of
equal products round the same way); the rigorous modes (:mod:`.rigorous`) hold for every
summation order. It also holds the per-layer counting formulas (:func:`dense_terms`,
:func:`conv_terms`) that the layers delegate to.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from aol_jax._src.spectral_bounds import FLOAT32_TINY, FLOAT32_UNIT_ROUNDOFF

SELF_ROUNDING = 2.0 ** -10
"""Relative inflation of ``A`` covering the float32 rounding of computing ``A`` and ``M``
themselves, and weights flushed to zero (at most ``2^-102`` of the modelled error)."""


@dataclasses.dataclass(frozen=True)
class StatisticalTerms:
  """What a map ``f`` states about its float32 evaluation, for :func:`statistical_allowance`.

  With ``M`` the largest l2 norm of a value ``f`` computes (its input, output and every
  partial sum inside it) and ``u = 2^-24``:

  Attributes:
    lipschitz: ``L``, an upper bound on the l2 Lipschitz constant of ``f`` (exact
      arithmetic, the kernels it applies), at least what ``f.lipschitz_bound()`` states.
    forward: ``S_f``: the float32 output errs by at most ``u S_f M`` (probabilistic model,
      normal range). A dense or conv layer states ``sqrt(n + 1) max(1, L)``, ``n`` its
      fan-in (+1 the bias); an input normalisation 2; an exact map 0.
    rescale: ``S_r``: the rescaling computed in float32 at each call makes ``f``
      ``L (1 + u S_r)``-Lipschitz. 0 for a frozen layer (its ``L`` bounds the stored kernel).
    prefix: ``P >= 1``: every value ``f`` computes is a ``P``-Lipschitz function of its
      input (the input itself, with constant 1, included).
    amplification: ``K >= 1``: an absolute error anywhere inside ``f`` reaches its output
      multiplied by at most ``K`` (``prod max(1, L_k)`` over its steps).
  """
  lipschitz: float
  forward: float = 0.0
  rescale: float = 0.0
  prefix: float = 1.0
  amplification: float = 1.0

  @classmethod
  def exact(cls, lipschitz: float) -> StatisticalTerms:
    """A map that float arithmetic evaluates exactly (a permutation, max / min, a reshape)."""
    lip = float(lipschitz)
    return cls(lipschitz=lip, prefix=max(1.0, lip), amplification=max(1.0, lip))

  @classmethod
  def affine(cls, lipschitz: float, fan_in: int, *, rescale: float = 0.0) -> StatisticalTerms:
    """``f(x) = T x + b``, each output a sum of ``fan_in`` products and the bias."""
    lip = float(lipschitz)
    grow = max(1.0, lip)
    return cls(lipschitz=lip, forward=math.sqrt(fan_in + 1) * grow, rescale=float(rescale),
               prefix=grow, amplification=grow)


def compose(terms: Sequence[StatisticalTerms]) -> StatisticalTerms:
  """The :class:`StatisticalTerms` of the maps applied in order.

  ``L = prod L_k``; each forward term is multiplied by ``max(1, prod_{j > k} L_j)``, the
  maps after it, which carry its error to the output; ``S_r`` adds up (to first order,
  ``prod (1 + u s_k) <= 1 + u sum s_k``); ``P = max_k (prod_{j < k} L_j) P_k``;
  ``K = prod K_k``.
  """
  lip, prefix, rescale, amplification = 1.0, 1.0, 0.0, 1.0
  for t in terms:
    prefix = max(prefix, lip * t.prefix)
    lip *= t.lipschitz
    rescale += t.rescale
    amplification *= t.amplification
  forward, after = 0.0, 1.0
  for t in reversed(terms):
    forward += max(after, 1.0) * t.forward
    after *= t.lipschitz
  return StatisticalTerms(lipschitz=lip, forward=forward, rescale=rescale, prefix=prefix,
                       amplification=amplification)


def dense_terms(in_features: int, out_features: int, lipschitz: float, *,
                frozen: bool) -> StatisticalTerms:
  """A dense layer ``(in -> out)``: fan-in ``n = in``; unfrozen, the rescaling's Gram entries
  have length ``a = out`` and ``b = in`` of them are summed per factor, ``S_r = sqrt(a + b)``."""
  rescale = 0.0 if frozen else math.sqrt(out_features + in_features)
  return StatisticalTerms.affine(lipschitz, in_features, rescale=rescale)


def conv_terms(kernel_size: Sequence[int], in_features: int, out_features: int,
               feature_group_count: int, lipschitz: float, *, frozen: bool) -> StatisticalTerms:
  """A conv with kernel ``(*k, c_in/g, c_out)``: ``n = prod(k) c_in/g``; unfrozen,
  ``a = prod(k) c_out/g``, ``b = prod(2k - 1) c_in/g``."""
  g = feature_group_count
  taps = math.prod(kernel_size)
  a = taps * out_features // g
  b = math.prod(2 * k - 1 for k in kernel_size) * in_features // g
  return StatisticalTerms.affine(lipschitz, taps * in_features // g,
                              rescale=0.0 if frozen else math.sqrt(a + b))


def normalisation_terms(lipschitz: float) -> StatisticalTerms:
  """``(x - mean) / std`` with ``max(1 / std) = lipschitz``: one subtraction and one division
  per element, so ``S_f = 2``."""
  lip = float(lipschitz)
  grow = max(1.0, lip)
  return StatisticalTerms(lipschitz=lip, forward=2.0, prefix=grow, amplification=grow)


def operation_count(fn: Callable[..., Any], *args) -> int:
  """An upper bound on the number of floating-point values ``fn(*args)`` computes or reads,
  each partial sum of a dot product or convolution counted: its float inputs, every float
  output of every operation of its jaxpr (nested ones too), times the contraction length
  for ``dot_general`` and the kernel size for ``conv_general_dilated``."""
  closed = jax.make_jaxpr(fn)(*args)

  def size(v) -> int:
    aval = getattr(v, "aval", None)
    dtype = getattr(aval, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      return 0
    return math.prod(aval.shape)

  def walk(jaxpr, times: int) -> int:
    count = 0
    for eqn in jaxpr.eqns:
      out = sum(size(v) for v in eqn.outvars)
      if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out *= math.prod(lhs[d] for d in contract) + 1
      elif eqn.primitive.name == "conv_general_dilated":
        out *= math.prod(eqn.invars[1].aval.shape) + 1
      count += out
      inner_times = times * int(eqn.params.get("length", 1))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            count += walk(inner, inner_times)
    return count * times

  return walk(closed.jaxpr, 1) + sum(size(v) for v in closed.jaxpr.invars)


def statistical_allowance(terms: StatisticalTerms, activation_norm: ArrayLike, eps: ArrayLike, *,
                       operations: int,
                       unit_roundoff: float = FLOAT32_UNIT_ROUNDOFF) -> jax.Array:
  """Margin slack ``A`` so that ``m > sqrt(2) L eps + A`` survives float32 rounding.

  ``A = {sqrt(2) u [S_f (2 M + P eps) + S_r L eps] + 2 sqrt(2) K N 2^-126} (1 + 2^-10)``, with
  ``L, S_f, S_r, P, K`` the network's :class:`StatisticalTerms`, ``M`` an upper bound on the
  largest l2 norm of a value the float32 forward pass at ``x`` computes (nested networks
  included), and ``N`` = ``operations``, the :func:`operation_count` of one example's
  forward pass.

  Derivation. Let ``f`` be the network in exact arithmetic with the kernels it applies and
  ``f^`` its float32 evaluation. (i) Forward rounding: a layer's error is at most
  ``u S_{f,k} M`` (:class:`StatisticalTerms`; independent zero-mean rounding errors, Higham &
  Mary 2019) and reaches the logits multiplied by the Lipschitz constant of the layers
  after it, which :func:`compose` includes; summed linearly. (ii) Underflow: float32 may
  flush a subnormal result or input to zero, an absolute error below ``2^-126`` per value,
  which no relative model covers; each of the ``N`` values' errors reaches the logits
  multiplied by at most ``K``. (iii) Rescaling rounding: ``Lip(f) <= L (1 + u S_r)``.
  (iv) Every value at ``x'`` is within ``P eps`` of its value at ``x``, so
  ``M(x') <= M(x) + P eps``. With the margin ``sqrt(2)``-Lipschitz in the logits (l2), for
  ``||x' - x|| <= eps``::

    m(f^(x')) >= m(f(x')) - sqrt(2) (u S_f M(x') + K N 2^-126)
              >= m(f(x)) - sqrt(2) L (1 + u S_r) eps - sqrt(2) (u S_f (M + P eps) + K N 2^-126)
              >= m(f^(x)) - sqrt(2) L eps - A,

  so ``m(f^(x)) > sqrt(2) L eps + A`` implies ``m(f^(x')) > 0``: the float32 forward pass
  at ``x'`` still puts the label strictly first. The rule's own comparison is made exact
  by :func:`aol_jax.certify`.

  This is a model-based bound, not a worst-case one: the deterministic bound
  ``gamma_n |W| |x|`` grows like ``n`` and, for these depths, exceeds the margins
  themselves. It assumes true float32 products (``jax.default_matmul_precision``
  'highest', not TF32 or bfloat16 passes), which :func:`aol_jax.certify_dataset` enforces.
  Measured against a float64 evaluation of the same frozen kernels, the float32 logit
  error stays below ``u S_f M`` by a factor of 10 or more
  (``tests/test_certification_probabilistic.py``).
  """
  m = jnp.asarray(activation_norm, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  relative = math.sqrt(2) * unit_roundoff * (1 + SELF_ROUNDING) * (
      terms.forward * (2 * m + terms.prefix * eps) + terms.rescale * terms.lipschitz * eps)
  absolute = 2 * math.sqrt(2) * terms.amplification * operations * FLOAT32_TINY
  return relative + absolute * (1 + SELF_ROUNDING)
