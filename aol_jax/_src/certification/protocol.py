"""The certification protocol: what a layer states about itself, and the checks that it may.

A network is certified as a sequence of **steps** (:func:`flatten`): its layers in order, a
network inside a network expanded into its own steps, an input normalisation a step of its
own. A step may be certified only if it states, about itself:

* ``lipschitz_bound() -> float``: an upper bound ``L`` on its l2 Lipschitz constant in exact
  arithmetic, for the parameters it holds: ``||f(x) - f(y)||_2 <= L ||x - y||_2``.
* ``rounding_error(x, fmt) -> (y, bound)`` (the rigorous modes ``'float32'`` and
  ``'float64'``): ``y`` its output evaluated in the format ``fmt``
  (:class:`~aol_jax._src.spectral_bounds.FloatFormat`) and, per example, a bound on
  ``||F(x) - f(x)||_2`` for every evaluation ``F`` of the step in that format (any summation
  order, with or without fused multiply-add, with or without flushing subnormals to zero);
* ``rounding_error_slope(fmt) -> float``: ``s`` such that the bound at any ``x'`` is at most
  the bound at ``x`` plus ``s ||x' - x||_2``.
* ``statistical_terms() -> StatisticalTerms``: its part of the statistical rounding model
  (:mod:`aol_jax._src.certification.statistical`), for ``'float32_statistical'`` only.

A container (:class:`aol_jax.AOLNetwork`) states ``certification_steps()`` instead: the
``(path, step)`` pairs its forward pass applies, in order.

A parameter-free layer that float arithmetic evaluates exactly and that maps 0 to 0 inherits
all four from :class:`ExactMap`; a function or a class you cannot edit with those properties
is declared with :func:`register_exact_map` (``jax.nn.relu`` is). Anything else,
``nnx.Linear``, ``nnx.Conv`` or an unknown module included, is refused with
:class:`UndeclaredBoundError`, which names the layer's class, its path and the fix. So is a
module that computes something other than what its stated bound covers: a subclass that
overrides its forward pass but not the bound asked for, an instance attribute that replaces
a method, a parameter inside an exact map.

Example::

  class Halve(aol_jax.certification.ExactMap, nnx.Module):  # y = x / 2: exact in binary
    lipschitz = 0.5
    def __call__(self, x): return x / 2
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aol_jax._src import checks
from aol_jax._src.certification import rigorous, statistical
from aol_jax._src.certification.statistical import StatisticalTerms
from aol_jax._src.spectral_bounds import FloatFormat

Path = tuple[Any, ...]

_EXACT_MAPS: list[tuple[Any, float]] = []  # (function or class, L), matched by identity

# The methods a certificate asks a step for, by mode.
BOUND_METHODS = ("lipschitz_bound", "rounding_error", "rounding_error_slope",
                 "statistical_terms", "certification_steps")


class UndeclaredBoundError(TypeError):
  """A layer of a network to be certified does not state what certification needs, or
  computes something its stated bound does not cover."""

  def __init__(self, path: Path, layer: Any, method: str, reason: str | None = None):
    self.path, self.layer, self.method, self.reason = path, layer, method, reason
    name = getattr(layer, "__name__", None) or type(layer).__name__
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    why = reason or f"states no {method}()"
    super().__init__(
        f"{name} at path {path} (model{where}) {why}, so no certificate can use it. A "
        "certified network may only contain layers that state their l2 Lipschitz constant "
        "and rounding. Fix: use the AOL counterpart (nnx.Linear -> aol_jax.AOLDense, nnx.Conv "
        "-> aol_jax.AOLConv); for your own layer define lipschitz_bound(), "
        "rounding_error(x, fmt), rounding_error_slope(fmt) and statistical_terms() (see "
        "aol_jax.certification), or call aol_jax.certification.register_exact_map(fn, "
        "lipschitz) for a function that floating point evaluates exactly.")


def register_exact_map(fn_or_type: Any, lipschitz: float) -> None:
  """Declares ``fn_or_type`` a certifiable layer: l2 ``lipschitz``-Lipschitz, ``f(0) = 0``
  and evaluated exactly by floating-point arithmetic (no rounding at all).

  ``fn_or_type`` is a function used as a layer (``jax.nn.relu``) or a class whose instances
  all have those properties and that states nothing itself. The claim is yours: a wrong one
  voids certificates. A class that states its own bound (an AOL layer, a block) cannot be
  re-declared, and an instance holding parameters is refused when certified.
  """
  checks.non_negative(lipschitz, f"register_exact_map({fn_or_type!r}, lipschitz)")
  if isinstance(fn_or_type, type) and any(hasattr(fn_or_type, m) for m in BOUND_METHODS):
    raise ValueError(f"register_exact_map({fn_or_type.__name__}): the class states its own "
                     "bound (it has " + ", ".join(m for m in BOUND_METHODS
                                                  if hasattr(fn_or_type, m))
                     + "); a registration would override it. Register only functions and "
                     "classes that state nothing.")
  _EXACT_MAPS[:] = [(k, v) for k, v in _EXACT_MAPS if k is not fn_or_type]
  _EXACT_MAPS.append((fn_or_type, float(lipschitz)))


def unregister_exact_map(fn_or_type: Any) -> None:
  """Withdraws a :func:`register_exact_map` declaration."""
  _EXACT_MAPS[:] = [(k, v) for k, v in _EXACT_MAPS if k is not fn_or_type]


register_exact_map(jax.nn.relu, 1.0)


def _registered(layer: Any) -> float | None:
  """The constant registered for ``layer`` itself or its exact class (by identity: an object
  that merely compares equal to a registered function is not it)."""
  for key, lip in _EXACT_MAPS:
    if layer is key or type(layer) is key:
      return lip
  return None


def _exact_error(x: jax.Array, fmt: FloatFormat) -> jax.Array:
  """Per example, the error of a map evaluated exactly up to subnormals flushed to zero:
  each of its ``m`` outputs moves by less than ``tiny``, so ``sqrt(m) tiny`` (rounded up)."""
  m = math.prod(x.shape[1:])
  bound = math.nextafter(math.sqrt(m) * fmt.tiny * (1 + 2 ** -20), math.inf)
  return jnp.full((x.shape[0],), bound, jnp.dtype(fmt.name))


class ExactMap:
  """Mixin for a parameter-free layer that float arithmetic evaluates exactly, ``f(0) = 0``.

  Subclasses set the class attribute ``lipschitz`` (default 1) and get the protocol's
  methods. The constant is read from the class, never from an instance; an instance that
  holds parameters or sub-modules is refused when certified.
  """
  lipschitz: float = 1.0

  def lipschitz_bound(self) -> float:
    return checks.non_negative(type(self).lipschitz, f"{type(self).__name__}.lipschitz")

  def statistical_terms(self) -> StatisticalTerms:
    return StatisticalTerms.exact(self.lipschitz_bound())

  def rounding_error(self, x: jax.Array, fmt: FloatFormat) -> tuple[jax.Array, jax.Array]:
    return self(x), _exact_error(x, fmt)

  def rounding_error_slope(self, fmt: FloatFormat) -> float:
    del fmt
    return 0.0


class _RegisteredMap:
  """A registered function (or an instance of a registered class) as a step."""

  def __init__(self, fn: Any, lipschitz: float):
    self.fn, self.lipschitz = fn, lipschitz

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fn(x)

  def lipschitz_bound(self) -> float:
    return self.lipschitz

  def statistical_terms(self) -> StatisticalTerms:
    return StatisticalTerms.exact(self.lipschitz)

  def rounding_error(self, x: jax.Array, fmt: FloatFormat) -> tuple[jax.Array, jax.Array]:
    return self.fn(x), _exact_error(x, fmt)

  def rounding_error_slope(self, fmt: FloatFormat) -> float:
    del fmt
    return 0.0


_LIBRARY: dict[type, dict[str, Any]] = {}  # class -> what it defined when it was created
_SNAPSHOT_NAMES = ("__call__", "lipschitz", "_FORWARD_METHODS", *BOUND_METHODS)


def library_class(cls: type) -> type:
  """Class decorator: marks ``cls`` as this library's, and records the forward methods, the
  bound methods and the constant it defines, so that a class patched later is refused."""
  names = set(_SNAPSHOT_NAMES) | set(vars(cls).get("_FORWARD_METHODS", ()))
  _LIBRARY[cls] = {name: vars(cls)[name] for name in names if name in vars(cls)}
  return cls


def _is_library_class(klass: type) -> bool:
  """A concrete class of this library (``ExactMap``, a declaration mixin, is not one)."""
  return klass in _LIBRARY and klass is not ExactMap


def _check_unpatched(cls: type, path: Path, layer: Any, method: str) -> None:
  for klass in cls.__mro__:
    recorded = _LIBRARY.get(klass)
    if recorded is None:
      continue
    names = set(_SNAPSHOT_NAMES) | set(recorded.get("_FORWARD_METHODS", ()))
    for name in names:
      if vars(klass).get(name, _MISSING) is not recorded.get(name, _MISSING):
        raise UndeclaredBoundError(path, layer, method, f"is a {klass.__name__} whose class "
                                   f"was changed after the library defined it ({name})")


_MISSING = object()
library_class(ExactMap)


def _library_forward_methods(cls: type) -> set[str]:
  """``__call__`` and the methods each library class in ``cls``'s MRO lists in its own
  ``_FORWARD_METHODS``: what its forward pass calls (a subclass cannot hide them)."""
  names = {"__call__"}
  for klass in cls.__mro__:
    if _is_library_class(klass):
      names.update(vars(klass).get("_FORWARD_METHODS", ()))
  return names


def _defining_class(cls: type, name: str) -> type | None:
  for klass in cls.__mro__:
    if name in vars(klass):
      return klass
  return None


def check_declared(module: Any, path: Path, method: str) -> None:
  """Refuses ``module`` where what it computes may differ from what ``method`` states.

  * An instance attribute that replaces a method of the class (``layer.rescale = f``).
  * A forward method (``__call__``, or one a library base class lists in
    ``_FORWARD_METHODS``) overridden below the class that makes the statement: the most
    derived library class in the MRO, or a subclass that defines ``method`` itself. The
    inherited statement covers the inherited forward pass, not the new one. (Subclassing
    :class:`ExactMap` is itself the statement, wherever ``__call__`` is defined.)
  * An :class:`ExactMap` holding a variable or a sub-module, or an instance ``lipschitz``.
  """
  cls = type(module)
  _check_unpatched(cls, path, module, method)
  if isinstance(module, nnx.Module):
    shadowing = sorted(name for name in vars(module)
                       if callable(getattr(cls, name, None)) and not name.startswith("__"))
    if shadowing:
      raise UndeclaredBoundError(path, module, method, f"has an instance attribute "
                                 f"{shadowing[0]!r} that replaces the method of its class")
  library = next((k for k in cls.__mro__ if _is_library_class(k)), None)
  stated_by = _defining_class(cls, method)
  owner = library
  if stated_by is not None and stated_by is not ExactMap and (
      library is None or issubclass(stated_by, library)):
    owner = stated_by
  if owner is not None:
    for name in sorted(_library_forward_methods(cls)):
      definer = _defining_class(cls, name)
      # The statement covers the forward methods of the stating class and its ancestors;
      # one defined in a subclass or in a class mixed in before it is not covered.
      if definer is not None and not issubclass(owner, definer):
        raise UndeclaredBoundError(path, module, method, f"overrides {name} (in "
                                   f"{definer.__name__}) but not {method}(), which "
                                   f"{owner.__name__} states for its own forward pass")
  if isinstance(module, ExactMap):
    if "lipschitz" in vars(module):
      raise UndeclaredBoundError(path, module, method, "sets lipschitz on the instance; an "
                                 "exact map's constant is its class's")
    inside = _held_state(module)
    if inside:
      raise UndeclaredBoundError(path, module, method, f"is an exact map but holds "
                                 f"{inside[0]!r} (an exact map has no parameters, arrays or "
                                 "sub-modules)")


def _held_state(module: Any) -> list[Path]:
  """Paths of the variables, arrays and sub-modules ``module`` holds (not itself)."""
  if not isinstance(module, nnx.Module):
    return []
  return [p for p, node in nnx.iter_graph(module) if p and isinstance(
      node, (nnx.Variable, nnx.Module, jax.Array, np.ndarray))]


def _method(layer: Any, name: str, path: Path) -> Callable:
  fn = getattr(layer, name, None)
  if fn is None:
    raise UndeclaredBoundError(path, layer, name)
  if not callable(fn):
    raise UndeclaredBoundError(path, layer, name, f"has {name} = {fn!r}, an attribute "
                               f"where a method {name}() is needed")
  check_declared(layer, path, name)
  return fn


def flatten(model: Any, path: Path = ()) -> list[tuple[Path, Any]]:
  """The steps ``model`` applies, in order, each with its path: a container's
  ``certification_steps()`` expanded, a registered function wrapped. Refuses (with
  :class:`UndeclaredBoundError` naming the path) a module that states nothing or computes
  something its statement does not cover."""
  lip = _registered(model)
  if lip is not None:
    if _held_state(model):
      raise UndeclaredBoundError(path, model, "lipschitz_bound", "is registered as an exact "
                                 "map but holds parameters or sub-modules")
    return [(path, _RegisteredMap(model, lip))]
  if hasattr(model, "certification_steps"):
    steps = _method(model, "certification_steps", path)()
    out = []
    for sub_path, step in steps:
      out += flatten(step, path + tuple(sub_path))
    return out
  _method(model, "lipschitz_bound", path)
  return [(path, model)]


def _stated_float(step: Any, name: str, path: Path, *args) -> float:
  value = _method(step, name, path)(*args)
  return checks.non_negative(value, f"{type(step).__name__}.{name}() at path {path}")


def lipschitz_bound(model: Any, path: Path = ()) -> float:
  """The l2 Lipschitz constant ``model`` states: the product over its steps, rounded up.

  Raises :class:`UndeclaredBoundError` if a step states none."""
  lip = 1.0
  for step_path, step in flatten(model, path):
    lip = rigorous.mul_up(lip, _stated_float(step, "lipschitz_bound", step_path))
  return lip


def rounding_error_slope(step: Any, fmt: FloatFormat, path: Path = ()) -> float:
  """The slope ``step`` states for its rounding-error bound in ``fmt``."""
  return _stated_float(step, "rounding_error_slope", path, fmt)


def rounding_error(step: Any, x: jax.Array, fmt: FloatFormat,
                   path: Path = ()) -> tuple[jax.Array, jax.Array]:
  """``(y, bound)`` that ``step`` states for input ``x`` in ``fmt``, shapes checked."""
  out = _method(step, "rounding_error", path)(x, fmt)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(f"{type(step).__name__}.rounding_error() at path {path} must return "
                    f"(output, bound), got {type(out).__name__}.")
  y, bound = out
  bound = jnp.asarray(bound)
  if bound.shape != (x.shape[0],):
    raise TypeError(f"{type(step).__name__}.rounding_error() at path {path} must return one "
                    f"bound per example, shape ({x.shape[0]},), got {bound.shape}.")
  # A negative or NaN bound would shrink the allowance: it counts as no bound at all.
  return y, jnp.where(bound >= 0, bound, jnp.inf)


def statistical_terms(model: Any, path: Path = ()) -> StatisticalTerms:
  """The :class:`StatisticalTerms` of ``model``: its steps' terms composed in order."""
  from_steps = []
  for step_path, step in flatten(model, path):
    terms = _method(step, "statistical_terms", step_path)()
    if not isinstance(terms, StatisticalTerms):
      raise TypeError(f"{type(step).__name__}.statistical_terms() at path {step_path} must "
                      f"return a StatisticalTerms, got {type(terms).__name__}.")
    lip = _stated_float(step, "lipschitz_bound", step_path)
    if not terms.lipschitz >= lip:
      raise ValueError(f"{type(step).__name__} at path {step_path} states lipschitz "
                       f"{terms.lipschitz!r} in statistical_terms() but {lip!r} in "
                       "lipschitz_bound(); the terms must use at least that constant.")
    from_steps.append(terms)
  return statistical.compose(from_steps)
