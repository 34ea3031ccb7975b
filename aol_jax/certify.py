"""Certifying a whole dataset: freeze into float32, one forward pass per batch, count.

:func:`certify_dataset` drives the pieces: the rule (:mod:`aol_jax.certificates`), the
rounding allowance of the chosen mode (:mod:`aol_jax.rounding` or :mod:`aol_jax.worst_case`),
the constants each layer states (:mod:`aol_jax.bounds`) and the table
(:mod:`aol_jax.results`). The names that used to live in this module are re-exported here.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from aol_jax import bounds
from aol_jax.bounds import rounding_terms
from aol_jax.certificates import STANDARD_RADII, certified_robust_accuracy, certify
from aol_jax.freeze import freeze
from aol_jax.margins import check_labels, margins
from aol_jax.results import CertificationResult, certification_markdown
from aol_jax.rounding import FLOAT32_UNIT_ROUNDOFF, RoundingTerms, rounding_allowance
from aol_jax.worst_case import WorstCaseTerms, worst_case_allowance

__all__ = [
    "FLOAT32_UNIT_ROUNDOFF", "STANDARD_RADII", "CertificationResult", "RoundingTerms",
    "certification_markdown", "certified_robust_accuracy", "certify", "certify_dataset",
    "margins", "rounding_allowance", "rounding_terms",
]

Rounding = Literal["probabilistic", "worst_case"]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _zero_input_activation_norm(graphdef, state, image_shape) -> jax.Array:
  """``M(0) = max_k ||x_k||`` for the all-zero image."""
  zeros = jnp.zeros((1, *image_shape), jnp.float32)
  return nnx.merge(graphdef, state).logits_and_activation_norm(zeros)[1][0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _probabilistic_counts(graphdef, terms: RoundingTerms, lip: float, state, x, y, valid,
                          eps_arr, zero_norm, growth):
  """Correct count, certified count per radius and largest allowance, for one batch."""
  logits = nnx.merge(graphdef, state)(x)
  act_norm = growth * jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1) + zero_norm
  allow = jax.vmap(lambda e: rounding_allowance(terms, act_norm, e,
                                                lipschitz_constant=lip))(eps_arr)
  return _counts(logits, y, valid, eps_arr, lip, allow)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _worst_case_counts(graphdef, terms: WorstCaseTerms, state, x, y, valid, eps_arr):
  """As :func:`_probabilistic_counts`, for the float64 evaluation (under ``enable_x64``)."""
  x = x.astype(jnp.float64)
  logits = nnx.merge(graphdef, state)(x)
  norm = jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1)
  allow = jax.vmap(lambda e: worst_case_allowance(terms, norm, e,
                                                  input_size=math.prod(x.shape[1:])))(eps_arr)
  return _counts(logits, y, valid, eps_arr, terms.lipschitz, allow)


def _counts(logits, y, valid, eps_arr, lip, allow):
  correct = jnp.sum((margins(logits, y) > 0) & valid)
  cert = jax.vmap(lambda e, a: certify(logits, y, e, lipschitz_constant=lip,
                                       allowance=a))(eps_arr, allow)
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


def certify_dataset(model: nnx.Module, images: ArrayLike, labels: ArrayLike, *,
                    eps_list: Sequence[float] = STANDARD_RADII, batch_size: int,
                    mesh: jax.sharding.Mesh | None = None,
                    rounding: Rounding = "probabilistic") -> CertificationResult:
  """Certifies a whole dataset with the frozen model; returns the table as data.

  The model is frozen into float32 (:func:`aol_jax.freeze` with ``dtype=float32``: bfloat16
  parameters and compute dtypes are widened, and any operation left narrower is refused),
  every layer must state its Lipschitz constant and rounding (:mod:`aol_jax.bounds`; else
  :class:`~aol_jax.bounds.UndeclaredBoundError` names the layer and its path), and each
  example is certified at each radius by :func:`~aol_jax.certificates.certify` with its own
  allowance. The two ``rounding`` modes certify different evaluations:

  * ``'probabilistic'`` (default): the prediction of the float32 forward pass (matmul
    precision 'highest', enforced here) is the same at every ``x'`` of the ball, under the
    probabilistic rounding model of :func:`~aol_jax.rounding.rounding_allowance`
    (independent zero-mean rounding errors; not a worst-case bound). ``L`` is the product
    of the stated constants, and ``M`` is bounded by ``max(1, L) (1 + u S_r) ||x|| + M(0)``
    (every prefix of the network is ``max(1, L)``-Lipschitz), so each batch costs one bare
    float32 forward pass and an input norm.
  * ``'worst_case'``: the network is evaluated in float64 on its frozen float32 parameters
    (inside ``jax.enable_x64``, which is restored on exit). A certified ``x`` keeps its label
    at every ``x'`` of the ball both in exact arithmetic and in that float64 evaluation,
    whatever the rounding errors (:mod:`aol_jax.worst_case`): ``L`` is a rigorous float64
    bound on the frozen kernels' norms and the allowance the deterministic ``gamma_n``
    error bound. It assumes IEEE float64 with round-to-nearest, dot products and
    convolutions evaluated as sums of products in any order (no FFT or Winograd
    convolution algorithm), and the float64 forward pass (about 2x the float32 cost on a
    CPU, far more on accelerators without fast float64). It says nothing about a float32
    evaluation.

  Every batch has ``batch_size`` rows, rounded up to a multiple of the mesh's ``'data'``
  axis; the last one is padded with zeros and masked out, never dropped, so one
  jit-compiled function serves the whole dataset. With a ``mesh``, batches are sharded over
  its ``'data'`` axis (``NamedSharding(mesh, P('data'))``) and the state is replicated.

  Args:
    model: an ``AOLNetwork`` (or any module stating the :mod:`aol_jax.bounds` protocol, with
      ``logits_and_activation_norm(x)`` for the probabilistic mode), trained or frozen.
    images: ``(n, H, W, C)`` in ``[0, 1]``.
    labels: ``(n,)`` integer class ids.
    eps_list: radii, default the standard ``36/255, 72/255, 108/255, 1``.
    batch_size: rows per compiled call (rounded up to a multiple of the mesh's data axis).
    mesh: optional mesh with a ``'data'`` axis.
    rounding: ``'probabilistic'`` or ``'worst_case'``, reported in the result.
  """
  if rounding not in ("probabilistic", "worst_case"):
    raise ValueError(f"rounding must be 'probabilistic' or 'worst_case', got {rounding!r}.")
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  n = images.shape[0]
  if n == 0:
    raise ValueError(f"Need n >= 1 images, got shape {images.shape}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  eps_arr = np.asarray(eps_list, np.float64)
  if eps_arr.ndim != 1 or (eps_arr < 0).any():
    raise ValueError(f"eps_list must be a sequence of radii >= 0, got {eps_list}.")
  # Every trace below, the checks included, sees the precision the allowance assumes.
  with jax.default_matmul_precision("highest"):
    return _certify_dataset(model, images, labels, eps_arr, batch_size, mesh, rounding)


def _certify_dataset(model, images, labels, eps_arr, batch_size, mesh, rounding):
  n = images.shape[0]
  image_shape = images.shape[1:]
  bounds.lipschitz_bound(model)  # refuses a layer without a stated constant, by its path
  if rounding == "probabilistic" and not hasattr(model, "logits_and_activation_norm"):
    raise TypeError("rounding='probabilistic' needs a model with logits_and_activation_norm(x) "
                    "such as aol_jax.AOLNetwork; use rounding='worst_case' otherwise.")
  frozen = _float32_copy(model, image_shape)
  graphdef, state = nnx.split(frozen)
  num_classes = jax.eval_shape(frozen, jax.ShapeDtypeStruct((1, *image_shape),
                                                            jnp.float32)).shape[-1]
  check_labels(labels, num_classes, batch=n)

  rows = batch_size
  data_sharding = None
  if mesh is not None:
    if "data" not in mesh.axis_names:
      raise ValueError(f"mesh needs a 'data' axis, has {mesh.axis_names}.")
    rows = -(-batch_size // mesh.shape["data"]) * mesh.shape["data"]
    data_sharding = NamedSharding(mesh, P("data"))

  mesh_context = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
  if rounding == "probabilistic":
    lip = bounds.lipschitz_bound(frozen)
    terms = rounding_terms(frozen)
    # M(x) <= max(1, L) (1 + u S_r) ||x|| + M(0): every prefix of the network is
    # max(1, L)-Lipschitz (1 + u S_r covers the factors' rounding), so each activation is
    # within that distance of the activation for the zero image.
    growth = max(1.0, lip) * (1.0 + FLOAT32_UNIT_ROUNDOFF * terms.rescale)
    eps32 = eps_arr.astype(np.float32)
    arithmetic = contextlib.nullcontext()
    counts = lambda state, x, y, valid: _probabilistic_counts(
        graphdef, terms, lip, state, x, y, valid, eps32, zero_norm, growth)
  else:
    wc = bounds.worst_case_terms(frozen, image_shape)
    lip = wc.lipschitz
    arithmetic = jax.enable_x64(True)  # restored on exit
    counts = lambda state, x, y, valid: _worst_case_counts(graphdef, wc, state, x, y, valid,
                                                           eps_arr)

  totals = None
  with arithmetic, mesh_context:
    if rounding == "worst_case":
      state = jax.tree.map(lambda a: a.astype(jnp.float64)
                           if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
      x64 = jax.ShapeDtypeStruct((1, *image_shape), jnp.float64)
      found = _floating_dtypes(lambda s, v: nnx.merge(graphdef, s)(v), state, x64)
      if found - {jnp.dtype(jnp.float64)}:
        raise TypeError(f"rounding='worst_case' needs a float64 forward pass, but the model "
                        f"also computes in {sorted(str(d) for d in found)}: a layer fixes "
                        "its compute dtype. Leave layers' dtype=None.")
    if mesh is not None:
      state = jax.device_put(state, NamedSharding(mesh, P()))
    if rounding == "probabilistic":
      zero_norm = _zero_input_activation_norm(graphdef, state, image_shape)
    for start in range(0, n, rows):
      x = images[start:start + rows]
      y = labels[start:start + rows].astype(np.int32)
      valid = np.arange(rows) < x.shape[0]
      if x.shape[0] < rows:
        pad = rows - x.shape[0]
        x = np.concatenate([x, np.zeros((pad, *image_shape), x.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
      if data_sharding is not None:
        x, y, valid = jax.device_put((x, y, valid), data_sharding)
      out = counts(state, x, y, valid)
      # Summed on the device, read once at the end: the host never waits between batches.
      totals = out if totals is None else _accumulate(totals, out)
    correct, certified, max_allow = jax.device_get(totals)
  return CertificationResult(
      num_examples=n, num_correct=int(correct), eps_list=tuple(float(e) for e in eps_arr),
      num_certified=tuple(int(c) for c in certified), lipschitz_constant=float(lip),
      max_allowance=tuple(float(a) for a in max_allow), rounding=rounding)
