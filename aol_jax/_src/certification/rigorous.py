"""The rigorous rounding model: the margin slack of the modes ``'float32'`` and ``'float64'``.

A certificate ``m > sqrt(2) L eps`` holds in exact arithmetic. This module bounds, for every
example, how far the floating-point evaluation ``F`` of the network can be from the exact map
``f`` of the parameters it holds, at ``x`` and at every ``x'`` of the ball, **whatever the
summation order**, with or without fused multiply-add, with gradual underflow or subnormals
flushed to zero (no statistical assumption). The network is a sequence of steps (its layers;
:func:`aol_jax._src.certification.protocol.flatten`); step ``k`` states, for the input ``z``
it is given in the format ``fmt`` (unit roundoff ``u``, smallest normal ``t``):

* ``L_k``: its Lipschitz constant in exact arithmetic;
* ``d_k(z)``: a bound on ``||F_k(z) - f_k(z)||``, computed from the ``z`` at hand;
* ``s_k``: a slope, ``d_k(z') <= d_k(z) + s_k ||z' - z||`` for every ``z'``.

**An affine step** ``y = T z + b`` (a dense or conv layer), each output a sum of ``n``
products and the bias (``N = n + 1`` terms): for any order of evaluation
``|F(z)_j - f(z)_j| <= gamma_N A_j + tau`` with ``A = |T| |z| + |b|``,
``gamma_N = N u / (1 - N u)`` (Higham, "Accuracy and Stability of Numerical Algorithms",
2nd ed., Lemma 3.4 and eq. 3.5; a fused multiply-add only removes roundings) and
``tau = t (4 N + 1 + n max|T|)`` covering every result that underflows (each of the ``2N``
operations loses less than ``t``, carried through later additions by at most a factor 2) and
every subnormal input flushed to zero (``|w z| < t |w|``). Weights are never subnormal: the
certifier refuses a kernel with subnormal entries.
``A`` itself is evaluated in the same format (one more pass of the layer with ``|T|`` and
``|z|``): ``A_j <= (A^_j + tau) / (1 - gamma_N)``, and the l2 norm ``nu^`` of ``A^`` in
floats satisfies ``||A^|| <= (nu^ / (1 - 8 u) + 2 sqrt((m + 1) t)) / (1 - gamma_{m+1})`` for
``m`` outputs (squares and sums rounded, squares that underflow lost, ``sqrt`` within four
ulps: a GPU's approximate square root included). So ``d(z) = c_r nu^ + c_0 + c_w max|T|`` (:func:`affine_error`). Since
``|z'| <= |z| + |z' - z|`` entrywise, ``s = gamma_N B`` with ``B >= || |T| ||_2``, the norm
of the layer with every weight made non-negative.

**An exact map** (max / min, a permutation, a reshape, a projection): ``d = sqrt(m) t``
(subnormals flushed), ``s = 0``. **The normalisation** ``(z - mu) / sigma``: a subtraction and
a division per element, which a compiler may turn into a multiplication by ``1 / sigma``
(XLA:CPU does) and a GPU may divide to within two ulps: at most ``gamma_6`` relative,
``d(z) = gamma_6 ||(|z| + |mu|) / sigma|| + sqrt(m) t (1 + 3 / min sigma)``,
``s = gamma_6 max(1 / sigma)``.

**The chain** (:func:`chain`, :func:`chain_constants`). With ``z_k`` the computed and
``a_k`` the exact activations from the same input, ``e_k = ||z_k - a_k||`` obeys
``e_{k+1} <= d_k(z_k) + L_k e_k``. At ``x'`` with ``||x' - x|| <= r``: the exact activations
differ by ``||a'_k - a_k|| <= P_k r`` (``P_k = prod_{j<k} L_j``), so
``||z'_k - z_k|| <= e'_k + P_k r + e_k`` and
``e'_{k+1} <= d_k(z_k) + s_k (e'_k + P_k r + e_k) + L_k e'_k``, affine in ``r``:
``e'_K <= alpha + beta r`` with ``alpha`` computed per example and ``beta`` a constant.
The margin is ``sqrt(2)``-Lipschitz in the logits (l2), so for every ``x'`` of the ball::

  m(F(x')) >= m(f(x')) - sqrt(2) e'_K >= m(f(x)) - sqrt(2) (L r + alpha + beta r)
           >= m(F(x)) - sqrt(2) L r - sqrt(2) (e_K + alpha + beta r),

and ``m(F(x)) > sqrt(2) L r + A(r)``, ``A(r) = sqrt(2) (e_K + alpha + beta r)``
(:func:`allowance`), keeps the label of every evaluation at every ``x'`` of the ball. The
rule's own comparison is made exact by :func:`aol_jax.certify`.

**Own rounding.** Host constants are computed in float64 and rounded up (``math.nextafter``)
at every step, then cast to the format rounding up. Every traced quantity above is a sum or
product of non-negative numbers: after ``k`` roundings it is at least ``(1 - u)^k`` times
the exact value (less ``k t`` for underflow), so :func:`_finish` multiplies by
``1 + 2 (k + 2) u`` and adds ``(k + 2) t``. An overflow gives ``inf`` or NaN, which the
comparison never certifies; every activation is also required to be finite.
"""

from __future__ import annotations

import fractions
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from aol_jax._src.spectral_bounds import FloatFormat


def up(x: float) -> float:
  """The next float64 above ``x``: an upper bound on the exact value ``x`` rounds."""
  return math.nextafter(float(x), math.inf)


def _exact_or_up(value: float, exact) -> float:
  """``value`` if it is at least ``exact()`` (a Fraction), else the next float above; an
  overflow (``inf``) stays ``inf``, an upper bound too."""
  if not math.isfinite(value):
    return math.inf
  return value if fractions.Fraction(value) >= exact() else up(value)


def mul_up(a: float, b: float) -> float:
  """``a * b`` rounded up: the float product where it is exact, else the next float above."""
  return _exact_or_up(float(a) * float(b),
                      lambda: fractions.Fraction(a) * fractions.Fraction(b))


def div_up(a: float, b: float) -> float:
  """``a / b`` rounded up, as :func:`mul_up` (``b`` finite and > 0)."""
  return _exact_or_up(float(a) / float(b),
                      lambda: fractions.Fraction(a) / fractions.Fraction(b))


def add_up(a: float, b: float) -> float:
  """``a + b`` rounded up, as :func:`mul_up`."""
  return _exact_or_up(float(a) + float(b),
                      lambda: fractions.Fraction(a) + fractions.Fraction(b))


def gamma(n: int, fmt: FloatFormat) -> float:
  """An upper bound on ``gamma_n = n u / (1 - n u)`` for ``fmt``'s unit roundoff."""
  nu = n * fmt.unit_roundoff  # exact: an integer times a power of two
  if nu >= 0.25:
    raise ValueError(f"A dot product of {n} terms is too long for a {fmt.name} error bound "
                     f"(n u = {nu} >= 1/4).")
  return up(nu / (1.0 - nu))


def _host_up(value: float, fmt: FloatFormat) -> np.ndarray:
  """``value`` as a host scalar of ``fmt``, rounded up."""
  v = np.asarray(value, fmt.name)
  if float(v) < value:
    v = np.nextafter(v, np.asarray(np.inf, fmt.name))
  return v


def _in_format(value: float, fmt: FloatFormat) -> jax.Array:
  """``value`` as a scalar of ``fmt``, rounded up."""
  return jnp.asarray(_host_up(value, fmt))


def _underflow_term(roundings: int, fmt: FloatFormat, amplification: float) -> np.ndarray:
  """The absolute term of :func:`_finish`, rounded up into ``fmt``."""
  return _host_up(up(up((roundings + 2) * fmt.tiny) * amplification), fmt)


def _finish(value: jax.Array, roundings: int, fmt: FloatFormat,
            amplification: float = 1.0, underflow: jax.Array | None = None) -> jax.Array:
  """``value``, computed from non-negative terms with at most ``roundings`` roundings, made an
  upper bound on its exact counterpart (module docstring, own rounding); ``amplification``
  bounds the factor by which later operations carry an underflow loss (``underflow``: that
  term already computed by :func:`_underflow_term`, possibly traced)."""
  k = roundings + 2
  factor = _in_format(up(1.0 + 2.0 * k * fmt.unit_roundoff), fmt)
  if underflow is None:
    underflow = _underflow_term(roundings, fmt, amplification)
  return value * factor + jnp.asarray(underflow, fmt.name)


def _norm(v: jax.Array) -> jax.Array:
  """Per example, the l2 norm of ``v`` ``(batch, ...)`` in its own format."""
  flat = v.reshape(v.shape[0], -1)
  return jnp.sqrt(jnp.sum(flat * flat, axis=1))


def _norm_up_factors(m: int, fmt: FloatFormat) -> tuple[float, float]:
  """``(a, b)`` with ``||v|| <= a nu^ + b`` for ``nu^`` the computed norm of ``m`` values."""
  denominator = 1.0 - gamma(m + 1, fmt)
  a = up(up(1.0 / (1.0 - 8 * fmt.unit_roundoff)) / denominator)
  b = up(up(2.0 * math.sqrt(up((m + 1) * fmt.tiny))) / denominator)
  return a, b


def affine_error(abs_out: jax.Array, *, products: int, has_bias: bool,
                 max_abs_weight: jax.Array, fmt: FloatFormat,
                 abs_products: int | None = None) -> jax.Array:
  """Per example, the bound ``d(z)`` of an affine step (module docstring).

  Args:
    abs_out: an evaluation in ``fmt`` of ``A' >= A = |T| |z| + |b|`` entrywise (the step
      applied to ``|z|`` with every weight and bias made non-negative, or an upper bound of
      it), ``(batch, ...)``.
    products: ``n``, the products per output of the step (its dot length).
    has_bias: whether a bias is added (``N = n + 1`` terms, else ``n``).
    max_abs_weight: the largest ``|weight|`` and ``|bias|`` of the step (a scalar).
    fmt: the format of the evaluation.
    abs_products: the most roundings a term of ``A'`` goes through, less the bias's
      (default ``n``): ``A' <= (A'^ + tau) / (1 - gamma)`` with that ``gamma``.
  """
  n = int(products)
  terms = n + int(has_bias)
  abs_terms = (n if abs_products is None else int(abs_products)) + int(has_bias)
  m = math.prod(abs_out.shape[1:])
  g = gamma(terms, fmt)
  g_abs = gamma(abs_terms, fmt)
  # |F - f| <= gamma_N A + tau and A <= A' <= (A'^ + tau') / (1 - gamma_abs), tau' <= tau.
  ratio = up(g / (1.0 - g_abs))
  a, b = _norm_up_factors(m, fmt)
  carry = up(up(math.sqrt(m)) * up(1.0 + ratio))  # sqrt(m) (1 + ratio): how tau reaches
  c_r = up(ratio * a)
  tau_terms = max(terms, abs_terms)
  c_0 = up(up(ratio * b) + up(carry * up(fmt.tiny * (4 * tau_terms + 1))))
  c_w = up(carry * up(fmt.tiny * max(n, abs_terms)))  # subnormal inputs flushed
  dtype = jnp.dtype(fmt.name)
  nu = _norm(abs_out.astype(dtype))
  weight = jnp.asarray(max_abs_weight, dtype)
  value = nu * _in_format(c_r, fmt) + (_in_format(c_0, fmt) + _in_format(c_w, fmt) * weight)
  return _finish(value, 5, fmt)


def affine_slope(abs_norm: float, *, products: int, has_bias: bool,
                 fmt: FloatFormat) -> float:
  """``s = gamma_N B`` of an affine step, ``abs_norm = B >= || |T| ||_2``."""
  g = gamma(int(products) + int(has_bias), fmt)
  return up(g * float(abs_norm))


def normalisation_error(x: jax.Array, mean: Sequence[float], std: Sequence[float],
                        fmt: FloatFormat) -> jax.Array:
  """Per example, ``d(z)`` of ``(z - mu) / sigma`` per channel (last axis), ``mu`` and
  ``sigma`` as the evaluation holds them (values of ``fmt``).

  Per entry ``|F - f| <= gamma_6 q + t (1 + 3 / sigma)`` with ``q = (|z| + |mu|) / sigma``
  (module docstring), and ``q`` evaluated in ``fmt`` gives
  ``q^ >= (1 - gamma_6) q - t (1 + 1 / sigma)``.
  """
  dtype = jnp.dtype(fmt.name)
  mu = jnp.abs(jnp.asarray(mean, dtype))
  sigma = jnp.asarray(std, dtype)
  q = (jnp.abs(x.astype(dtype)) + mu) / sigma
  m = math.prod(x.shape[1:])
  g2 = gamma(_DIVISION_ROUNDINGS, fmt)
  a, b = _norm_up_factors(m, fmt)
  inv = up(1.0 / min(float(s) for s in np.asarray(std, fmt.name).reshape(-1)))
  root_m = up(math.sqrt(m))
  scale = up(g2 / (1.0 - g2))
  c_r = up(scale * a)
  c_0 = up(up(scale * up(b + up(root_m * up(fmt.tiny * up(1.0 + inv)))))
           + up(root_m * up(fmt.tiny * up(1.0 + 3.0 * inv))))
  value = _norm(q) * _in_format(c_r, fmt) + _in_format(c_0, fmt)
  return _finish(value, 2, fmt)


def normalisation_slope(lipschitz: float, fmt: FloatFormat) -> float:
  """``s = gamma_6 max(1 / sigma)``."""
  return up(gamma(_DIVISION_ROUNDINGS, fmt) * float(lipschitz))


# A subtraction and a division: one rounding each if correctly rounded, three if the
# division becomes a multiplication by a rounded reciprocal, up to five with a GPU's
# two-ulp division; six covers them all.
_DIVISION_ROUNDINGS = 6


class StepConstants(NamedTuple):
  """What a step states on the host: its Lipschitz constant ``L_k`` and slope ``s_k``."""
  lipschitz: float
  slope: float


class ChainConstants(NamedTuple):
  """The chain's host constants (rounded up): ``L = prod L_k``, ``beta``, and before each
  step ``k`` its prefix ``P_k`` and ``beta_k`` (the ``beta`` of the steps before it); and
  how much the steps can multiply an underflow loss, ``prod max(1, L_k + 2 s_k)``."""
  lipschitz: float
  beta: float
  prefixes: tuple[float, ...] = ()
  betas: tuple[float, ...] = ()
  amplification: float = 1.0


def chain_constants(steps: Sequence[StepConstants]) -> ChainConstants:
  """``L``, ``beta`` and the per-step prefixes of the chain (module docstring), in float64
  rounded up."""
  prefix, beta, prefixes, betas, amplification = 1.0, 0.0, [], [], 1.0
  for step in steps:
    prefixes.append(prefix)
    betas.append(beta)
    beta = add_up(mul_up(step.slope, add_up(beta, prefix)), mul_up(step.lipschitz, beta))
    prefix = mul_up(prefix, step.lipschitz)
    amplification = up(amplification * max(1.0, up(step.lipschitz + 2.0 * step.slope)))
  return ChainConstants(lipschitz=prefix, beta=beta, prefixes=(*prefixes, prefix),
                        betas=(*betas, beta), amplification=amplification)


class ChainScalars(NamedTuple):
  """What :func:`chain` and :func:`allowance` compute with, from the host constants, each
  rounded up into the evaluation's format: arrays, so one compiled evaluation serves every
  network of one architecture (they are traced arguments, not constants of the program).
  Before each step ``k``: ``grow_k = beta_k + P_k``, its slope and Lipschitz constant; then
  the output's ``grow``, the underflow term of ``e_K`` and ``alpha``, and ``beta``."""
  grow: tuple[np.ndarray, ...]
  slope: tuple[np.ndarray, ...]
  lipschitz: tuple[np.ndarray, ...]
  underflow: np.ndarray
  beta: np.ndarray


def chain_scalars(steps: Sequence[StepConstants], constants: ChainConstants,
                  fmt: FloatFormat) -> ChainScalars:
  """The :class:`ChainScalars` of a chain's host constants, on the host."""
  return ChainScalars(
      grow=tuple(_host_up(add_up(b, p), fmt)
                 for b, p in zip(constants.betas, constants.prefixes, strict=True)),
      slope=tuple(_host_up(step.slope, fmt) for step in steps),
      lipschitz=tuple(_host_up(step.lipschitz, fmt) for step in steps),
      underflow=_underflow_term(_chain_roundings(len(steps)), fmt, constants.amplification),
      beta=_host_up(constants.beta, fmt))


def _chain_roundings(num_steps: int) -> int:
  return 5 * num_steps


def chain(bounds: Sequence[jax.Array], norms: Sequence[jax.Array], scalars: ChainScalars,
          fmt: FloatFormat) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per example, ``(e_K, alpha, limit)`` from the steps' bounds ``d_k(z_k)``, the norms of
  their inputs ``||z_k||`` and of the output (``norms``, one more than the steps), and the
  chain's scalars (:func:`chain_scalars`; traced or not).

  ``limit`` is the largest radius at which no value of any evaluation at any ``x'`` of the
  ball can overflow: activations stay below the format's ``limit``,
  ``||z'_k|| <= ||z_k|| + r_k`` with ``r_k = alpha_k + e_k + (beta_k + P_k) eps``, and so do
  the sums inside an affine step (``d_k + s_k r_k >= gamma_N || |T| |z'_k| + |b| ||``, which
  bounds them, below ``u`` times the limit). Beyond ``limit`` nothing is certified.
  """
  if not len(bounds) == len(scalars.slope) == len(scalars.lipschitz) == len(scalars.grow) - 1:
    raise ValueError(f"{len(bounds)} steps' bounds for the scalars of a chain of "
                     f"{len(scalars.slope)} steps.")
  e = alpha = jnp.zeros_like(bounds[0])
  dtype = e.dtype
  top = _in_format(fmt.limit / 2, fmt)
  inside = _in_format(fmt.limit * fmt.unit_roundoff / 2, fmt)
  slack = _in_format(up(1.0 + 2.0 ** -10), fmt)
  limit = jnp.full_like(e, jnp.inf)
  as_format = lambda v: jnp.asarray(v, dtype)

  def tighten(limit, c0, c1, bound):
    """``limit`` lowered to the largest ``eps`` with ``c0 + c1 eps <= bound`` (rounded
    conservatively: both sides carry 2^-10 of slack, far above their rounding)."""
    c0, c1 = c0 * slack, c1 * slack
    eps = jnp.where(c1 > 0, (bound - c0) / jnp.where(c1 > 0, c1, 1) / slack,
                    jnp.where(c0 <= bound, jnp.inf, -1))
    return jnp.minimum(limit, jnp.where(c0 <= bound, eps, -1).astype(dtype))

  for k, d in enumerate(bounds):
    grow = as_format(scalars.grow[k])
    limit = tighten(limit, norms[k] + alpha + e, grow, top)
    slope = as_format(scalars.slope[k])
    limit = tighten(limit, d + slope * (alpha + e), slope * grow, inside)
    lip = as_format(scalars.lipschitz[k])
    alpha = d + slope * (alpha + e) + lip * alpha
    e = d + lip * e
  roundings = _chain_roundings(len(bounds))
  e = _finish(e, roundings, fmt, underflow=scalars.underflow)
  alpha = _finish(alpha, roundings, fmt, underflow=scalars.underflow)
  limit = tighten(limit, norms[-1] + alpha + e, as_format(scalars.grow[-1]), top)
  return e, alpha, limit


def allowance(e: jax.Array, alpha: jax.Array, beta: ArrayLike, eps: jax.Array,
              fmt: FloatFormat) -> jax.Array:
  """``A(eps) = sqrt(2) (e_K + alpha + beta eps)``, rounded up, per example; ``beta`` in
  ``fmt``, rounded up already (:class:`ChainScalars`), or a float rounded up here."""
  eps = jnp.asarray(eps, e.dtype)
  beta = _in_format(beta, fmt) if isinstance(beta, float) else jnp.asarray(beta, e.dtype)
  value = _in_format(up(math.sqrt(2)), fmt) * (e + alpha + beta * eps)
  return _finish(value, 4, fmt, amplification=2.0)
