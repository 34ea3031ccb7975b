"""Certifying a whole dataset: freeze into float32, one forward pass per batch, count.

:func:`certify_dataset` drives the pieces: the rule (:mod:`.rule`), the rounding allowance of
the chosen mode (:mod:`.probabilistic` or :mod:`.worst_case`), what each layer states
(:mod:`.protocol`) and the table (:mod:`.results`). :data:`ROUNDING_MODES` is the one table
of modes: it feeds the ``Rounding`` type, the validation, the ``results.md`` text and the
docs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from aol_jax._src.certification import protocol
from aol_jax._src.certification.margins import check_labels, margins
from aol_jax._src.certification.probabilistic import (FLOAT32_UNIT_ROUNDOFF, RoundingTerms,
                                                 operation_count, rounding_allowance)
from aol_jax._src.certification.modes import DEFAULT_ROUNDING, ROUNDING_MODES, Rounding
from aol_jax._src.certification.results import CertificationResult
from aol_jax._src.certification.rule import STANDARD_RADII, certify
from aol_jax._src.certification.worst_case import WorstCaseTerms, worst_case_allowance
from aol_jax._src.freeze import freeze


OVERFLOW_GUARD = 2.0 ** 100
"""Activations bounded above this are never certified: float32 could overflow inside the ball."""


@functools.partial(jax.jit, static_argnums=(0, 2))
def _zero_input_activation_norm(graphdef, state, image_shape) -> jax.Array:
  """``M(0) = max_k ||x_k||`` for the all-zero image."""
  zeros = jnp.zeros((1, *image_shape), jnp.float32)
  return nnx.merge(graphdef, state).logits_and_activation_norm(zeros)[1][0]


def _probabilistic_certified(terms: RoundingTerms, operations: int, logits, y, act_norm, shift,
                             e):
  """The probabilistic mode's decision at the float32 radius ``e``, per example.

  ``shift`` per example is ``||x - x32||`` (rounded up) for float64 images rounded to
  float32: the ball of radius ``e`` around ``x`` lies in that of ``e + shift`` around
  ``x32``. Non-increasing in ``e`` (every operation is a rounded monotone one), which
  :func:`_largest_certified` relies on. Returns ``(certified, allowance)``.
  """
  radius = e + shift
  allow = rounding_allowance(terms, act_norm, radius, operations=operations)
  ok = certify(logits, y, radius, lipschitz_constant=terms.lipschitz, allowance=allow)
  return ok & (act_norm + terms.prefix * radius < OVERFLOW_GUARD), allow


def _activation_norm(terms: RoundingTerms, x, zero_norm):
  """``M <= P (1 + u S_r) ||x|| + M(0)``: every value computed at ``x`` is within
  ``P (1 + u S_r) ||x||`` of its value at the zero image."""
  growth = terms.prefix * (1.0 + FLOAT32_UNIT_ROUNDOFF * terms.rescale)
  return growth * jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1) + zero_norm


def _probabilistic_decisions(graphdef, terms: RoundingTerms, operations: int, state, x, shift,
                             zero_norm):
  """Logits, predictions, the largest certified float32 radius of the prediction and whether
  radius 0 is certified, and the allowance at radius ``e`` (a function), for one batch."""
  logits = nnx.merge(graphdef, state)(x)
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  act_norm = _activation_norm(terms, x, zero_norm)
  decide = lambda e: _probabilistic_certified(terms, operations, logits, pred, act_norm,
                                              shift, e)[0]
  radius, at_zero = _largest_certified(decide, jnp.float32)
  allowance = lambda e: rounding_allowance(terms, act_norm, e + shift, operations=operations)
  return logits, pred, radius, at_zero, allowance


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _probabilistic_counts(graphdef, terms: RoundingTerms, operations: int, state, x, shift, y,
                          valid, eps_arr, zero_norm):
  """Correct count, certified count per radius and largest allowance, for one batch.

  An example is certified at ``e`` when its label is the prediction and ``e`` is at most the
  largest certified radius of :func:`_largest_certified`: the one decision that
  :func:`certified_radii` reports, so both agree at every radius by construction.
  """
  logits, pred, radius, at_zero, allowance = _probabilistic_decisions(
      graphdef, terms, operations, state, x, shift, zero_norm)
  cert = (pred == y) & at_zero & (radius[None, :] >= eps_arr[:, None])
  return _counts(logits, y, valid, cert, jax.vmap(allowance)(eps_arr))


def _worst_case_certified(terms: WorstCaseTerms, logits, y, norm, input_size: int, e):
  """The worst-case mode's decision at the float64 radius ``e`` (non-increasing in ``e``)."""
  allow = worst_case_allowance(terms, norm, e, input_size=input_size)
  return certify(logits, y, e, lipschitz_constant=terms.lipschitz, allowance=allow), allow


def _worst_case_decisions(graphdef, terms: WorstCaseTerms, state, x):
  """As :func:`_probabilistic_decisions`, for the float64 evaluation (under ``enable_x64``)."""
  logits = nnx.merge(graphdef, state)(x)
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  norm = jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1)
  size = math.prod(x.shape[1:])
  decide = lambda e: _worst_case_certified(terms, logits, pred, norm, size, e)[0]
  radius, at_zero = _largest_certified(decide, jnp.float64)
  allowance = lambda e: worst_case_allowance(terms, norm, e, input_size=size)
  return logits, pred, radius, at_zero, allowance


@functools.partial(jax.jit, static_argnums=(0, 1))
def _worst_case_counts(graphdef, terms: WorstCaseTerms, state, x, y, valid, eps_arr):
  """As :func:`_probabilistic_counts`, for the float64 evaluation (under ``enable_x64``)."""
  logits, pred, radius, at_zero, allowance = _worst_case_decisions(graphdef, terms, state, x)
  cert = (pred == y) & at_zero & (radius[None, :] >= eps_arr[:, None])
  return _counts(logits, y, valid, cert, jax.vmap(allowance)(eps_arr))


def _largest_certified(decide, dtype):
  """Per example, the largest non-negative float ``r`` of ``dtype`` with ``decide(r)`` true,
  and whether ``decide(0)`` holds; ``decide`` maps a radius array ``(batch,)`` to a bool
  array and is non-increasing in it.

  Bisection on the bit patterns: the non-negative floats of a dtype are ordered as their
  bits read as integers, so ``bits(dtype)`` halvings of ``[0, +inf)`` find the last certified
  one exactly (no tolerance), the decision itself being evaluated at every step.
  """
  itype = jnp.int32 if jnp.dtype(dtype).itemsize == 4 else jnp.int64
  inf_bits = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, dtype), itype)
  as_float = lambda bits: jax.lax.bitcast_convert_type(bits, dtype)
  at_zero = decide(jnp.zeros_like(as_float(jnp.zeros((), itype))))
  # Shaped (and sharded) like the decisions: decide(low) holds wherever at_zero does, and
  # decide(+inf) never holds (a finite margin).
  low = jnp.zeros_like(at_zero, itype)
  high = jnp.full_like(at_zero, inf_bits, itype)

  def step(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2
    ok = decide(as_float(mid))
    return jnp.where(ok, mid, low), jnp.where(ok, high, mid)

  low, _ = jax.lax.fori_loop(0, 8 * jnp.dtype(dtype).itemsize, step, (low, high))
  return as_float(low), at_zero


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _probabilistic_radii(graphdef, terms: RoundingTerms, operations: int, state, x, shift,
                         zero_norm):
  """Predictions, largest certified float32 radii and whether 0 is certified, for one batch."""
  return _probabilistic_decisions(graphdef, terms, operations, state, x, shift, zero_norm)[1:4]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _worst_case_radii(graphdef, terms: WorstCaseTerms, state, x):
  """As :func:`_probabilistic_radii`, in float64 (under ``enable_x64``)."""
  return _worst_case_decisions(graphdef, terms, state, x)[1:4]


def _counts(logits, y, valid, cert, allow):
  correct = jnp.sum((margins(logits, y) > 0) & valid)
  return correct, jnp.sum(cert & valid, axis=1), jnp.max(jnp.where(valid, allow, 0), axis=1)


@jax.jit
def _accumulate(totals, out):
  return totals[0] + out[0], totals[1] + out[1], jnp.maximum(totals[2], out[2])


def _floating_dtypes(fn, *args) -> set:
  """Every floating dtype that an operation of ``fn``'s jaxpr produces, nested ones too."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        dtype = getattr(v.aval, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
          found.add(jnp.dtype(dtype))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _float32_copy(model: nnx.Module, image_shape: tuple[int, ...]) -> nnx.Module:
  """The frozen model in float32 at least, refused if any operation still computes narrower."""
  frozen = freeze(model, dtype=jnp.float32)
  for _, module in nnx.iter_modules(frozen):
    # An explicit per-layer precision would override the 'highest' the allowance assumes.
    if getattr(module, "precision", None) is not None:
      module.precision = None
  graphdef, state = nnx.split(frozen)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  narrow = {d for d in _floating_dtypes(lambda s, v: nnx.merge(graphdef, s)(v), state, x)
            if jnp.finfo(d).bits < 32}
  if narrow:
    raise TypeError(f"The model still computes in {sorted(str(d) for d in narrow)} after "
                    "freezing into float32 (a layer casts internally), and certificates "
                    "assume float32 or wider. Make the layer compute in its input's dtype.")
  return frozen


def _checked_images(images: ArrayLike) -> np.ndarray:
  """``images`` as a float32 or float64 array, finite and in ``[0, 1]``, else ValueError."""
  array = np.asarray(images)
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"images must be floating-point values in [0, 1], got dtype "
                     f"{array.dtype}; divide uint8 images by 255 first.")
  if array.ndim < 2 or array.shape[0] == 0:
    raise ValueError(f"images must be (n, ...) with n >= 1, got shape {array.shape}.")
  if array.dtype != np.float64:
    array = array.astype(np.float32)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"images contain {int(np.sum(~np.isfinite(array)))} non-finite values "
                     "(NaN or inf); clean them before certifying.")
  low, high = float(array.min()), float(array.max())
  if low < 0 or high > 1:
    raise ValueError(f"images must lie in [0, 1] (the scale the radii are measured on), got "
                     f"values in [{low}, {high}]; rescale them (a 0..255 image: / 255).")
  return array


def _float32_radii(eps: np.ndarray) -> np.ndarray:
  """The float32 radii, each >= its float64 value (rounded up, never down)."""
  e32 = eps.astype(np.float32)
  return np.where(e32.astype(np.float64) < eps, np.nextafter(e32, np.float32(np.inf)), e32)


def certify_dataset(model: nnx.Module, images: ArrayLike, labels: ArrayLike, *,
                    eps_list: Sequence[float] = STANDARD_RADII, batch_size: int,
                    mesh: jax.sharding.Mesh | None = None,
                    rounding: Rounding = DEFAULT_ROUNDING) -> CertificationResult:
  """Certifies a whole dataset with the frozen model; returns the table as data.

  The model is frozen into float32 (:func:`aol_jax.freeze` with ``dtype=float32``: bfloat16
  parameters and compute dtypes are widened, and any operation left narrower is refused),
  every layer must state its Lipschitz constant and rounding
  (:mod:`aol_jax.certification.protocol`; else :class:`~aol_jax.UndeclaredBoundError` names
  the layer and its path), and each example is certified at each radius by
  :func:`aol_jax.certify` with its own allowance. ``L`` is computed once, from the kernels
  the frozen copy applies (each layer's ``lipschitz_bound()``,
  the same in both modes). The modes of :data:`ROUNDING_MODES` certify different
  evaluations, so 'float64', whose allowance is smaller, may certify slightly more than
  the default without being the one to use for a float32 deployment:

  * ``'float32_statistical'`` (default): the prediction of the float32 forward pass (matmul
    precision 'highest', enforced here) is the same at every ``x'`` of the ball, under the
    probabilistic rounding model of
    :func:`~aol_jax.certification.probabilistic.rounding_allowance` (independent zero-mean
    rounding errors; not a worst-case bound). ``M`` is bounded by ``P (1 + u S_r) ||x|| +
    M(0)``, with ``P`` the largest Lipschitz constant from the input to any value the
    network computes, so each batch costs one bare float32 forward pass and an input norm.
    float64 images are rounded to float32 and certified at ``eps + ||x - x32||``.
  * ``'float64'``: the network is evaluated in float64 on its frozen float32 parameters
    (inside ``jax.enable_x64``, which is restored on exit), at the images as given (float64
    images are not rounded). A certified ``x`` keeps its label at every ``x'`` of the ball
    both in exact arithmetic and in that float64 evaluation, whatever the rounding errors
    (:mod:`aol_jax.certification.worst_case`). It assumes IEEE float64 with
    round-to-nearest and dot products and convolutions evaluated as sums of products in
    any order (no FFT or Winograd convolution algorithm).

  Every batch has ``batch_size`` rows, rounded up to a multiple of the mesh's ``'data'``
  axis; the last one is padded with zeros and masked out, never dropped, so one
  jit-compiled function serves the whole dataset. With a ``mesh``, batches are sharded over
  its ``'data'`` axis (``NamedSharding(mesh, P('data'))``) and the state is replicated.

  Args:
    model: an ``AOLNetwork`` (or any module stating the protocol of
      :mod:`aol_jax.certification.protocol`, with ``logits_and_activation_norm(x)`` for the
      probabilistic mode), trained or frozen.
    images: ``(n, ...)`` floating point, finite, in ``[0, 1]``.
    labels: ``(n,)`` integer class ids.
    eps_list: radii, finite and >= 0, default the standard ``36/255, 72/255, 108/255, 1``.
    batch_size: rows per compiled call, an int >= 1 (rounded up to a multiple of the mesh's
      data axis).
    mesh: optional mesh with a ``'data'`` axis.
    rounding: a key of :data:`ROUNDING_MODES`, reported in the result.
  """
  model, images, batch_size = _checked_arguments(model, images, batch_size, rounding)
  labels = np.asarray(labels)
  eps_arr = np.asarray(eps_list, np.float64)
  if eps_arr.ndim != 1 or not np.all(np.isfinite(eps_arr)) or (eps_arr < 0).any():
    raise ValueError(f"eps_list must be a sequence of finite radii >= 0, got {eps_list}.")
  eps32 = _float32_radii(eps_arr)
  check = lambda frozen, num_classes: check_labels(labels, num_classes, batch=len(images))
  # Every trace below, the checks included, sees the precision the allowance assumes.
  with jax.default_matmul_precision("highest"):
    run = _prepared(model, images, batch_size, mesh, rounding, check)
    if rounding == "float32_statistical":
      step = lambda c, state, x, s, y, valid: _probabilistic_counts(
          c.graphdef, c.terms, c.operations, state, x, s, y, valid, eps32, c.zero_norm)
    else:
      step = lambda c, state, x, s, y, valid: _worst_case_counts(
          c.graphdef, c.terms, state, x, y, valid, eps_arr)
    totals = None
    for out in run(step, labels.astype(np.int32)):
      # Summed on the device, read once at the end: the host never waits between batches.
      totals = out if totals is None else _accumulate(totals, out)
    correct, certified, max_allow = jax.device_get(totals)
  return CertificationResult(
      num_examples=len(images), num_correct=int(correct),
      eps_list=tuple(float(e) for e in eps_arr),
      num_certified=tuple(int(c) for c in certified), lipschitz_constant=float(run.lipschitz),
      max_allowance=tuple(float(a) for a in max_allow), rounding=rounding)


def certified_radii(model: nnx.Module, images: ArrayLike, *, rounding: Rounding = DEFAULT_ROUNDING,
                    batch_size: int, mesh: jax.sharding.Mesh | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Per example, the predicted class and the l2 radius within which it is certified.

  ``radii[i] > eps`` exactly when the prediction for ``images[i]`` is certified at radius
  ``eps`` under ``rounding`` (the same decision, the same freezing, validation, batching and
  sharding as :func:`certify_dataset`, whose certified count at ``eps`` is therefore
  ``sum((predictions == labels) & (radii > eps))`` for every float ``eps``). ``radii[i]`` is
  the smallest float64 above the largest radius certified (a float32 one in the
  probabilistic mode, where radii are rounded up to float32 as in :func:`certify_dataset`),
  so the prediction holds on the open ball of that radius; 0 where nothing is certified
  (the prediction is tied, or its margin does not cover the rounding allowance). The radius
  is found by an exact bisection on the float's bits, not by solving the rule in closed
  form, so that it is the rule's own decision.

  Args:
    model: as for :func:`certify_dataset`.
    images: ``(n, ...)`` floating point, finite, in ``[0, 1]``.
    rounding: a key of :data:`ROUNDING_MODES`.
    batch_size: rows per compiled call, an int >= 1 (rounded up to a multiple of the mesh's
      data axis).
    mesh: optional mesh with a ``'data'`` axis.

  Returns:
    ``(predictions, radii)``: ``(n,)`` int32 class ids and ``(n,)`` float64 radii, numpy.
  """
  model, images, batch_size = _checked_arguments(model, images, batch_size, rounding)
  with jax.default_matmul_precision("highest"):
    run = _prepared(model, images, batch_size, mesh, rounding, lambda *_: None)
    if rounding == "float32_statistical":
      step = lambda c, state, x, s, y, valid: _probabilistic_radii(
          c.graphdef, c.terms, c.operations, state, x, s, c.zero_norm)
    else:
      step = lambda c, state, x, s, y, valid: _worst_case_radii(c.graphdef, c.terms, state, x)
    outs = jax.device_get(list(run(step, np.zeros(len(images), np.int32))))
  preds = np.concatenate([o[0] for o in outs])[:len(images)]
  largest = np.concatenate([np.asarray(o[1], np.float64) for o in outs])[:len(images)]
  at_zero = np.concatenate([o[2] for o in outs])[:len(images)]
  radii = np.where(at_zero, np.nextafter(largest, np.inf), 0.0)
  return preds.astype(np.int32), radii


def _checked_arguments(model, images, batch_size, rounding):
  if rounding not in ROUNDING_MODES:
    raise ValueError(f"rounding must be one of {sorted(ROUNDING_MODES)}, got {rounding!r}.")
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model must be an nnx.Module (an aol_jax.AOLNetwork), got "
                     f"{type(model).__name__}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or (
      batch_size < 1):
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
  return model, _checked_images(images), int(batch_size)


@dataclasses.dataclass
class _Certifier:
  """What a mode needs per batch, fixed once for the dataset."""
  graphdef: object
  terms: object
  lipschitz: float
  operations: int = 0
  zero_norm: object = None


def _probabilistic_certifier(frozen: nnx.Module, image_shape) -> _Certifier:
  """The probabilistic mode's fixed terms for the float32 copy ``frozen`` (``zero_norm`` is
  set once the state is placed)."""
  if not hasattr(frozen, "logits_and_activation_norm"):
    raise TypeError("rounding='float32_statistical' needs a model with "
                    "logits_and_activation_norm(x) such as aol_jax.AOLNetwork; use "
                    "rounding='float64' otherwise.")
  graphdef, state = nnx.split(frozen)
  terms = protocol.rounding_terms(frozen)
  x_struct = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return _Certifier(graphdef, terms, terms.lipschitz, operation_count(
      lambda s, v: nnx.merge(graphdef, s)(v), state, x_struct))


def _prepared(model, images, batch_size, mesh, rounding, check):
  """Freezes ``model`` into float32 and checks it (``check(frozen, num_classes)`` too);
  returns ``run(step, labels)``, a generator applying ``step(certifier, state, x, shift,
  y, valid)`` to every padded, sharded batch of ``images``, with ``run.lipschitz``."""
  n = images.shape[0]
  image_shape = images.shape[1:]
  protocol.lipschitz_bound(model)  # refuses an undeclared layer by its path, before any trace
  frozen = _float32_copy(model, image_shape)
  graphdef, state = nnx.split(frozen)
  x_struct = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  num_classes = jax.eval_shape(frozen, x_struct).shape[-1]
  check(frozen, num_classes)

  rows = batch_size
  data_sharding = None
  if mesh is not None:
    if "data" not in mesh.axis_names:
      raise ValueError(f"mesh needs a 'data' axis, has {mesh.axis_names}.")
    rows = -(-batch_size // mesh.shape["data"]) * mesh.shape["data"]
    data_sharding = NamedSharding(mesh, P("data"))

  mesh_context = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
  if rounding == "float32_statistical":
    certifier = _probabilistic_certifier(frozen, image_shape)
    images32 = images.astype(np.float32)
    shift = np.zeros(n, np.float32)
    if images.dtype == np.float64:
      gap = np.linalg.norm((images - images32.astype(np.float64)).reshape(n, -1), axis=1)
      shift = _float32_radii(gap * (1 + 1e-9))
    images = images32
    arithmetic = contextlib.nullcontext()
  else:
    wc = protocol.worst_case_terms(frozen, image_shape)
    certifier = _Certifier(graphdef, wc, wc.lipschitz)
    shift = np.zeros(n, np.float64)
    images = images.astype(np.float64)
    arithmetic = jax.enable_x64(True)  # restored on exit

  def run(step, labels):
    nonlocal state
    with arithmetic, mesh_context:
      if rounding == "float64":
        state = jax.tree.map(lambda a: a.astype(jnp.float64)
                             if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
        x64 = jax.ShapeDtypeStruct((1, *image_shape), jnp.float64)
        found = _floating_dtypes(lambda s, v: nnx.merge(graphdef, s)(v), state, x64)
        if found - {jnp.dtype(jnp.float64)}:
          raise TypeError(f"rounding='float64' needs a float64 forward pass, but the model "
                          f"also computes in {sorted(str(d) for d in found)}: a layer fixes "
                          "its compute dtype. Leave layers' dtype=None.")
      if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, P()))
      if rounding == "float32_statistical":
        certifier.zero_norm = _zero_input_activation_norm(graphdef, state, image_shape)
      for start in range(0, n, rows):
        x = images[start:start + rows]
        s = shift[start:start + rows]
        y = labels[start:start + rows]
        valid = np.arange(rows) < x.shape[0]
        if x.shape[0] < rows:
          pad = rows - x.shape[0]
          x = np.concatenate([x, np.zeros((pad, *image_shape), x.dtype)])
          s = np.concatenate([s, np.zeros(pad, s.dtype)])
          y = np.concatenate([y, np.zeros(pad, y.dtype)])
        if data_sharding is not None:
          x, s, y, valid = jax.device_put((x, s, y, valid), data_sharding)
        yield step(certifier, state, x, s, y, valid)

  run.lipschitz = certifier.lipschitz
  return run
