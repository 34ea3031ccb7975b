"""The certification modes: one table holding what each certifies and how.

A mode names the evaluation its certificates hold for and how the rounding of that
evaluation is bounded. Each row holds the behaviour, not only its text: the evaluation's
format, the constants prepared once per model, the evaluation of a batch with its per-example
bounds, the allowance, whether the mode can be exported, and the platforms whose arithmetic
it covers. The drivers (:mod:`.certifier` and above) read the row; nothing else branches on a
mode's name.

* ``'float32'`` (the default): the float32 evaluation, rigorous for every summation order
  (:mod:`.rigorous`).
* ``'float64'``: the float64 evaluation of the float32 weights, rigorous the same way.
* ``'float32_statistical'``: the float32 evaluation under the statistical rounding model of
  :mod:`.statistical` (independent zero-mean errors); its name says it is statistical.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aol_jax._src.certification import protocol, rigorous, statistical
from aol_jax._src.spectral_bounds import FLOAT32, FLOAT64, FloatFormat

OVERFLOW_GUARD = 2.0 ** 100
"""The statistical mode certifies no example whose activations are bounded above this inside
the ball (float32 could overflow there)."""


class Bounds(NamedTuple):
  """Per example, what a batch's evaluation gives the allowance: ``a`` and ``b`` with
  ``A(eps) = allowance(a, b, eps)``, whether every value computed was finite, and the largest
  radius at which no evaluation inside the ball can overflow (nothing beyond is certified)."""
  a: jax.Array
  b: jax.Array
  finite: jax.Array
  limit: jax.Array


def _norm(z: jax.Array) -> jax.Array:
  """Per example, the l2 norm of ``z`` in its own format (``inf`` where a square overflows)."""
  flat = z.reshape(z.shape[0], -1)
  return jnp.sqrt(jnp.sum(flat * flat, axis=1))


def _walk(steps, x: jax.Array, apply: Callable) -> tuple[jax.Array, list, jax.Array]:
  """``apply(step, z) -> (z, extra)`` over the steps; returns the output, the extras and
  whether every activation was finite, per example."""
  finite = jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
  extras = []
  for path, step in steps:
    x, extra = apply(path, step, x)
    finite &= jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    extras.append(extra)
  return x, extras, finite


class RigorousConstants(NamedTuple):
  steps: tuple[rigorous.StepConstants, ...]
  chain: rigorous.ChainConstants


@dataclasses.dataclass(frozen=True)
class _Rigorous:
  """The rigorous rounding model in one format (:mod:`.rigorous`)."""
  fmt: FloatFormat

  def constants(self, model: Any, image_shape: tuple[int, ...]) -> RigorousConstants:
    del image_shape
    steps = tuple(rigorous.StepConstants(
        lipschitz=protocol.lipschitz_bound(step, path),
        slope=protocol.rounding_error_slope(step, self.fmt, path))
        for path, step in protocol.flatten(model))
    return RigorousConstants(steps, rigorous.chain_constants(steps))

  def lipschitz(self, constants: RigorousConstants) -> float:
    return constants.chain.lipschitz

  def static(self, constants: RigorousConstants) -> None:
    """Nothing: the evaluation reads the constants as traced :meth:`scalars` only."""
    del constants

  def scalars(self, constants: RigorousConstants) -> rigorous.ChainScalars:
    return rigorous.chain_scalars(constants.steps, constants.chain, self.fmt)

  def evaluate(self, static: None, scalars: rigorous.ChainScalars, model: Any, x: jax.Array
               ) -> tuple[jax.Array, Bounds]:
    norms = []

    def apply(path, step, z):
      norms.append(_norm(z))
      return protocol.rounding_error(step, z, self.fmt, path)

    logits, errors, finite = _walk(protocol.flatten(model), x.astype(self.fmt.name), apply)
    norms.append(_norm(logits))
    e, alpha, limit = rigorous.chain(errors, norms, scalars, self.fmt)
    finite &= jnp.isfinite(e) & jnp.isfinite(alpha)
    return logits, Bounds(e, alpha, finite, limit)

  def allowance(self, static: None, scalars: rigorous.ChainScalars, bounds: Bounds,
                eps: jax.Array) -> jax.Array:
    return rigorous.allowance(bounds.a, bounds.b, scalars.beta, eps, self.fmt)


class StatisticalConstants(NamedTuple):
  terms: statistical.StatisticalTerms
  operations: int
  zero_norm: float


@dataclasses.dataclass(frozen=True)
class _Statistical:
  """The statistical float32 rounding model (:mod:`.statistical`)."""
  fmt: FloatFormat = FLOAT32

  def _norms(self, model: Any, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The float32 forward pass through the steps (each step's own call), the largest
    activation norm per example, and finiteness."""
    norm = lambda a: jnp.linalg.norm(a.reshape(a.shape[0], -1).astype(jnp.float32), axis=-1)
    apply = lambda path, step, z: (step(z), None)
    norms = [norm(x)]

    def tracked(path, step, z):
      y, _ = apply(path, step, z)
      norms.append(norm(y))
      return y, None

    logits, _, finite = _walk(protocol.flatten(model), x, tracked)
    return logits, jnp.max(jnp.stack(norms), axis=0), finite

  def constants(self, model: Any, image_shape: tuple[int, ...]) -> StatisticalConstants:
    terms = protocol.statistical_terms(model)
    terms = dataclasses.replace(terms, lipschitz=max(terms.lipschitz,
                                                     protocol.lipschitz_bound(model)))
    graphdef, state = nnx.split(model)
    forward = lambda s, v: nnx.merge(graphdef, s)(v)
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    operations = statistical.operation_count(forward, state, x)
    zeros = jnp.zeros((1, *image_shape), jnp.float32)
    zero_norm = float(jax.jit(lambda s: self._norms(nnx.merge(graphdef, s), zeros)[1][0])(state))
    return StatisticalConstants(terms, operations, zero_norm)

  def lipschitz(self, constants: StatisticalConstants) -> float:
    return constants.terms.lipschitz

  def static(self, constants: StatisticalConstants) -> StatisticalConstants:
    """All of them: the evaluation reads them as constants of the compiled program."""
    return constants

  def scalars(self, constants: StatisticalConstants) -> tuple[()]:
    del constants
    return ()

  def evaluate(self, constants: StatisticalConstants, scalars: tuple[()], model: Any,
               x: jax.Array) -> tuple[jax.Array, Bounds]:
    logits, _, finite = self._norms(model, x.astype(jnp.float32))
    terms = constants.terms
    growth = terms.prefix * (1.0 + self.fmt.unit_roundoff * terms.rescale)
    act_norm = growth * jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1) + constants.zero_norm
    limit = (OVERFLOW_GUARD - act_norm) / terms.prefix * (1 - 2.0 ** -10)
    return logits, Bounds(act_norm, act_norm, finite, limit)

  def allowance(self, constants: StatisticalConstants, scalars: tuple[()], bounds: Bounds,
                eps: jax.Array) -> jax.Array:
    return statistical.statistical_allowance(constants.terms, bounds.a, eps,
                                             operations=constants.operations)


@dataclasses.dataclass(frozen=True)
class Mode:
  """One row of :data:`ROUNDING_MODES`: what a mode certifies, and the behaviour that does it.

  Attributes:
    name: the key.
    fmt: the floating-point format of the certified evaluation.
    statistical: whether the allowance rests on a statistical assumption (else it holds
      for every summation order, rounding and underflow of that format).
    exportable: whether :func:`aol_jax.export_certified` can ship it (the artifact runs a
      float32 evaluation).
    platforms: where the format's arithmetic is what the bound assumes (IEEE products and
      sums at the format's precision; no TF32, no bfloat16 passes).
    evaluation, guarantee, use: the text of the docs and the results table.
    model: the behaviour: the constants prepared once per model, the part of them a
      compiled evaluation holds as constants (``static``) and the rest as traced arrays
      (``scalars``), the evaluation and the allowance.
  """
  name: str
  fmt: FloatFormat
  statistical: bool
  exportable: bool
  platforms: tuple[str, ...]
  evaluation: str
  guarantee: str
  use: str
  model: Any

  def arithmetic(self) -> contextlib.AbstractContextManager:
    """The context to prepare and evaluate in: every matmul traced at precision 'highest'
    (true products of the format: no TF32, no bfloat16 passes), and 64-bit types enabled
    for a float64 mode."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.default_matmul_precision("highest"))
    if self.fmt.unit_roundoff < 2.0 ** -24:  # wider than float32: 64-bit types
      stack.enter_context(jax.enable_x64(True))
    return stack

  def describe(self) -> str:
    """``'<evaluation>: <guarantee>'``, the line under a results table."""
    return f"{self.evaluation}: {self.guarantee}"


_PLATFORMS = ("cpu", "cuda")

ROUNDING_MODES: dict[str, Mode] = {
    "float32": Mode(
        name="float32", fmt=FLOAT32, statistical=False, exportable=True, platforms=_PLATFORMS,
        evaluation="the float32 evaluation of the frozen network",
        guarantee="rigorous for every summation order, with or without fused multiply-add, "
                  "subnormals flushed or not (Higham's gamma_n bound per layer, evaluated "
                  "per example)",
        use="serving a float32 model or an export_certified artifact; the default",
        model=_Rigorous(FLOAT32)),
    "float64": Mode(
        name="float64", fmt=FLOAT64, statistical=False, exportable=False, platforms=_PLATFORMS,
        evaluation="the float64 evaluation of the frozen float32 weights",
        guarantee="rigorous for every summation order, as 'float32' with float64's unit "
                  "roundoff",
        use="a statement about exact arithmetic and a float64 evaluation; allowance about "
            "1e-9 of float32's",
        model=_Rigorous(FLOAT64)),
    "float32_statistical": Mode(
        name="float32_statistical", fmt=FLOAT32, statistical=True, exportable=True,
        platforms=_PLATFORMS,
        evaluation="the float32 evaluation of the frozen network",
        guarantee="statistical: assumes independent zero-mean rounding errors (Higham & Mary "
                  "2019), which long chains of equal products can break",
        use="comparison with the literature's probabilistic certificates; not a guarantee",
        model=_Statistical()),
}
"""The certification modes, by name."""

DEFAULT_ROUNDING = "float32"
"""The mode of :func:`aol_jax.certify_dataset`, :func:`aol_jax.certified_radii`,
:func:`aol_jax.export_certified` and the experiments when none is named."""

Rounding = Literal[tuple(ROUNDING_MODES)]  # type: ignore[valid-type]


def get_mode(rounding: str) -> Mode:
  """The row of :data:`ROUNDING_MODES` named ``rounding``, else ``ValueError`` listing them."""
  if not isinstance(rounding, str) or rounding not in ROUNDING_MODES:
    raise ValueError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {rounding!r}: "
                     + "; ".join(f"{name!r}: {mode.evaluation}, {mode.use}"
                                 for name, mode in ROUNDING_MODES.items()) + ".")
  return ROUNDING_MODES[rounding]
