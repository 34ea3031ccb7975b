"""The certification protocol: how a layer states its Lipschitz constant and its rounding.

A layer may sit in a certified network (:class:`aol_jax.AOLNetwork`,
:func:`aol_jax.certify_dataset`) only if it states, about itself, three things:

* ``lipschitz_bound() -> float``: an upper bound ``L`` on its l2 Lipschitz constant in exact
  arithmetic, ``||f(x) - f(y)||_2 <= L ||x - y||_2`` for all inputs. AOL layers and the
  blocks state 1; ``AOLNetwork`` states the product over its layers (and ``max(1 / std)``
  for its input normalisation).
* ``rounding_terms() -> RoundingTerms``: its part of the probabilistic float32 rounding model
  (:mod:`aol_jax.certification.probabilistic`); ``RoundingTerms.exact(L)`` for a map that
  float arithmetic evaluates exactly (a permutation, max / min, a reshape, a channel
  selection).
* ``worst_case_terms(input_shape) -> WorstCaseTerms``: its rigorous float64 terms
  (:mod:`aol_jax.certification.worst_case`), needed only by ``rounding='float64'``. ``input_shape`` is
  the shape of one example entering the layer.

To certify with a layer of your own, write those methods on your ``nnx.Module``; a
parameter-free layer that float arithmetic evaluates exactly and that maps 0 to 0 can inherit
them from :class:`ExactMap` (set ``lipschitz`` on the class). A plain function or a class you
cannot edit with those properties is declared with :func:`register_exact_map`; ``jax.nn.relu``
(also ``nnx.relu``) is registered. Anything else, ``nnx.Linear``, ``nnx.Conv`` or an unknown
module included, is refused with :class:`UndeclaredBoundError`, which names the layer's
class, its path in the model and this fix.

Example::

  class Halve(nnx.Module):  # y = x / 2: exact in binary floating point
    def lipschitz_bound(self): return 0.5
    def rounding_terms(self): return aol_jax.RoundingTerms.exact(0.5)
    def worst_case_terms(self, input_shape): return aol_jax.WorstCaseTerms.exact(0.5)
    def __call__(self, x): return x / 2
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import math

import jax
import numpy as np

from aol_jax._src.certification.probabilistic import RoundingTerms
from aol_jax._src.certification.worst_case import WorstCaseTerms

Path = tuple[Any, ...]

_EXACT_MAPS: dict[Any, float] = {}


def _check_lipschitz(value: Any, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      math.isfinite(value) and value >= 0):
    raise ValueError(f"{what} must be a finite number >= 0, got {value!r}.")
  return float(value)


def register_exact_map(fn_or_type: Any, lipschitz: float) -> None:
  """Declares ``fn_or_type`` a certifiable layer: l2 ``lipschitz``-Lipschitz, ``f(0) = 0``
  and evaluated exactly by floating-point arithmetic (no rounding at all).

  ``fn_or_type`` is a function used as a layer (``jax.nn.relu``) or a module class whose
  instances all have those properties. The claim is yours: a wrong one voids certificates.
  """
  _check_lipschitz(lipschitz, f"register_exact_map({fn_or_type!r}, lipschitz)")
  _EXACT_MAPS[fn_or_type] = float(lipschitz)


register_exact_map(jax.nn.relu, 1.0)


class ExactMap:
  """Mixin for a parameter-free layer that float arithmetic evaluates exactly, ``f(0) = 0``.

  Subclasses set ``lipschitz`` (default 1) and get the three protocol methods.
  """
  lipschitz: float = 1.0

  def lipschitz_bound(self) -> float:
    return float(self.lipschitz)

  def rounding_terms(self) -> RoundingTerms:
    return RoundingTerms.exact(self.lipschitz)

  def worst_case_terms(self, input_shape: Sequence[int]) -> WorstCaseTerms:
    del input_shape
    return WorstCaseTerms.exact(self.lipschitz)


class UndeclaredBoundError(TypeError):
  """A layer of a network to be certified does not state what certification needs."""

  def __init__(self, path: Path, layer: Any, method: str, reason: str | None = None):
    self.path, self.layer, self.method, self.reason = path, layer, method, reason
    name = getattr(layer, "__name__", None) or type(layer).__name__
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    why = reason or f"states no {method}()"
    super().__init__(
        f"{name} at path {path} (model{where}) {why}, so no certificate "
        "can use it. A certified network may only contain layers that state their l2 "
        "Lipschitz constant and rounding. Fix: use the AOL counterpart (nnx.Linear -> "
        "aol_jax.AOLDense, nnx.Conv -> aol_jax.AOLConv); for your own layer define "
        "lipschitz_bound(), rounding_terms() and worst_case_terms(input_shape) (see "
        "aol_jax.certification.protocol), or call aol_jax.register_exact_map(fn, lipschitz) for a function "
        "that floating point evaluates exactly.")

  def within(self, prefix: Path) -> UndeclaredBoundError:
    """The same error for the layer's path inside an enclosing model at ``prefix``."""
    return UndeclaredBoundError(tuple(prefix) + self.path, self.layer, self.method,
                                self.reason)


def _registered(layer: Any) -> float | None:
  for key in (layer, type(layer)):
    try:
      if key in _EXACT_MAPS:
        return _EXACT_MAPS[key]
    except TypeError:  # unhashable
      continue
  return None


def _stated(layer: Any, method: str, path: Path, kind: type, *args) -> Any:
  fn: Callable | None = getattr(layer, method, None)
  if fn is None:
    raise UndeclaredBoundError(path, layer, method)
  if not callable(fn):
    raise UndeclaredBoundError(path, layer, method, f"has {method} = {fn!r}, an attribute "
                               f"where a method {method}() is needed")
  try:
    value = fn(*args)
  except UndeclaredBoundError as e:  # a container reporting one of its own layers
    raise e.within(path) from None
  if kind is float:
    if isinstance(value, np.generic):
      value = value.item()
    return _check_lipschitz(value, f"{type(layer).__name__}.{method}() at path {path}")
  if not isinstance(value, kind):
    raise TypeError(f"{type(layer).__name__}.{method}() at path {path} must return a "
                    f"{kind.__name__}, got {type(value).__name__}.")
  return value


def lipschitz_bound(layer: Any, path: Path = ()) -> float:
  """The l2 Lipschitz constant ``layer`` states; ``UndeclaredBoundError`` if it states none."""
  lip = _registered(layer)
  return lip if lip is not None else _stated(layer, "lipschitz_bound", path, float)


def rounding_terms(layer: Any, path: Path = ()) -> RoundingTerms:
  """The :class:`RoundingTerms` ``layer`` states (for a network: composed over its layers)."""
  lip = _registered(layer)
  if lip is not None:
    return RoundingTerms.exact(lip)
  terms = _stated(layer, "rounding_terms", path, RoundingTerms)
  lip = lipschitz_bound(layer, path)
  if not terms.lipschitz >= lip:
    raise ValueError(f"{type(layer).__name__} at path {path} states lipschitz "
                     f"{terms.lipschitz!r} in rounding_terms() but {lip!r} in "
                     "lipschitz_bound(); the rounding terms must use at least that constant.")
  return terms


def worst_case_terms(layer: Any, input_shape: Sequence[int], path: Path = ()) -> WorstCaseTerms:
  """The :class:`WorstCaseTerms` ``layer`` states for one example of ``input_shape``."""
  lip = _registered(layer)
  if lip is not None:
    return WorstCaseTerms.exact(lip)
  return _stated(layer, "worst_case_terms", path, WorstCaseTerms, tuple(input_shape))
