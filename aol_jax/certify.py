"""Certified robustness of Lipschitz networks, sound for a float32 forward pass.

For a network ``f`` with l2 Lipschitz constant ``L``, logits ``s = f(x)`` and label ``y``,
the margin ``m(s) = s_y - max_{j != y} s_j`` is ``sqrt(2)``-Lipschitz in ``s`` (l2), so
every ``x'`` with ``||x' - x||_2 <= eps`` keeps the label when ``m(f(x)) > sqrt(2) L eps``
(AOL paper, Section 6; Tsuzuku et al., NeurIPS 2018). That is the exact-arithmetic
certificate. :func:`rounding_allowance` adds the slack that keeps it true for the
float32 evaluation of ``f`` at both ``x`` and ``x'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from aol_jax.freeze import freeze
from aol_jax.layers import AOLConv, AOLDense

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
"""``u`` for float32 (round to nearest): every rounded operation has relative error <= u."""

STANDARD_RADII: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255, 1.0)


def margins(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """``s_y - max_{j != y} s_j`` per example; positive iff ``y`` is the unique argmax.

  Labels outside ``[0, classes)`` raise ``ValueError`` when called outside ``jax.jit``.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"Expected logits (batch, classes) and labels (batch,), got "
                     f"{logits.shape} and {labels.shape}.")
  if logits.shape[1] < 2:
    raise ValueError(f"Need at least 2 classes for a margin, got {logits.shape[1]}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")
  if not isinstance(labels, jax.core.Tracer) and labels.size:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= logits.shape[1]:
      raise ValueError(f"labels must lie in [0, {logits.shape[1]}); got values in [{lo}, {hi}].")
  onehot = jax.nn.one_hot(labels, logits.shape[1], dtype=bool)
  true = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
  other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=1)
  return true - other


@dataclasses.dataclass(frozen=True)
class RoundingTerms:
  """Per-network sums ``S = sum_k sqrt(n_k)`` over the AOL layers, for the allowance.

  Attributes:
    forward: ``sum_k sqrt(n_k + 1)`` with ``n_k`` the fan-in of affine layer ``k`` (+1 for
      the bias), plus 2 for an input normalisation (one subtraction, one division).
    rescale: ``sum_k sqrt(a_k + b_k)``, with ``a_k`` the length of one Gram entry's dot
      product and ``b_k`` the number of Gram entries summed into one AOL factor.
  """
  forward: float
  rescale: float


def rounding_terms(model: nnx.Module) -> RoundingTerms:
  """The :class:`RoundingTerms` of every AOL layer in ``model`` (frozen or not).

  Dense ``(in, out)``: ``n = in``, ``a = out``, ``b = in``. Conv with kernel ``(*k, c_in/g,
  c_out)``: ``n = prod(k) c_in/g``, ``a = prod(k) c_out/g``, ``b = prod(2k - 1) c_in/g``.
  """
  forward, rescale = 0.0, 0.0
  for _, layer in nnx.iter_modules(model):
    if isinstance(layer, AOLDense):
      n, a, b = layer.in_features, layer.out_features, layer.in_features
    elif isinstance(layer, AOLConv):
      g = layer.feature_group_count
      taps = math.prod(layer.kernel_size)
      n = taps * layer.in_features // g
      a = taps * layer.out_features // g
      b = math.prod(2 * k - 1 for k in layer.kernel_size) * layer.in_features // g
    else:
      continue
    forward += math.sqrt(n + 1)
    rescale += math.sqrt(a + b)
  normalises = (getattr(model, "input_mean", None) is not None
                or getattr(model, "input_std", None) is not None)
  if normalises:
    forward += 2.0
  return RoundingTerms(forward=forward, rescale=rescale)


def rounding_allowance(terms: RoundingTerms, activation_norm: ArrayLike, eps: ArrayLike, *,
                       lipschitz_constant: float = 1.0,
                       unit_roundoff: float = FLOAT32_UNIT_ROUNDOFF) -> jax.Array:
  """Margin slack ``A`` so that ``m > sqrt(2) L eps + A`` survives float32 rounding.

  ``A = sqrt(2) u [S_f (2 M + L' eps) + S_r L eps]``, with ``u = 2^-24``, ``S_f, S_r`` the
  :class:`RoundingTerms` of the network, ``M = max_k ||x_k||_2`` the largest activation
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


def certify(logits: ArrayLike, labels: ArrayLike, eps: ArrayLike, *,
            lipschitz_constant: float = 1.0, allowance: ArrayLike | None = None) -> jax.Array:
  """True where ``s_y - max_{j != y} s_j > sqrt(2) L eps + allowance`` (strict).

  A certified example is correctly classified and keeps its label for every input
  perturbation of l2 norm <= ``eps``. A tie is never certified, and with ``eps = 0`` this
  is "correct with a strictly positive margin".

  Args:
    logits: ``(batch, classes)``.
    labels: ``(batch,)`` integer class ids.
    eps: the l2 radius (scalar, or one per example).
    lipschitz_constant: ``L`` of the network from input to logits (``model.lipschitz_bound()``,
      which includes ``max(1 / std)`` for a normalising model).
    allowance: margin slack for floating-point rounding, scalar or per example, from
      :func:`rounding_allowance` (:func:`certify_dataset` computes it). ``None`` gives the
      exact-arithmetic certificate and warns; pass ``0.0`` to ask for it explicitly.
  """
  if allowance is None:
    warnings.warn("certify() without a rounding allowance gives the exact-arithmetic "
                  "certificate; pass allowance=rounding_allowance(...) (certify_dataset "
                  "does) or allowance=0.0 to silence this.", stacklevel=2)
    allowance = 0.0
  if lipschitz_constant <= 0:
    raise ValueError(f"lipschitz_constant must be positive, got {lipschitz_constant}.")
  m = margins(logits, labels)
  threshold = math.sqrt(2) * lipschitz_constant * jnp.asarray(eps, m.dtype)
  return m > threshold + jnp.asarray(allowance, m.dtype)


def certified_robust_accuracy(logits: ArrayLike, labels: ArrayLike, eps_list: Sequence[float], *,
                              lipschitz_constant: float = 1.0,
                              allowance: ArrayLike | None = None
                              ) -> tuple[jax.Array, jax.Array]:
  """Clean accuracy and the certified robust accuracy at each radius of ``eps_list``.

  CRA(eps) is the fraction of examples that :func:`certify` accepts at ``eps``; clean
  accuracy the fraction with a strictly positive margin. ``allowance`` may be a callable
  ``eps -> slack`` (the rounding allowance grows with ``eps``) or an array as in
  :func:`certify`.

  Returns:
    ``(clean_accuracy, cra)`` with ``cra`` of shape ``(len(eps_list),)``.
  """
  if allowance is None:
    warnings.warn("certified_robust_accuracy() without a rounding allowance gives the "
                  "exact-arithmetic certificate; pass allowance=... (certify_dataset does) "
                  "or allowance=0.0 to silence this.", stacklevel=2)
    allowance = 0.0
  m = margins(logits, labels)
  clean = jnp.mean(m > 0)
  cra = [jnp.mean(certify(logits, labels, eps, lipschitz_constant=lipschitz_constant,
                          allowance=allowance(eps) if callable(allowance) else allowance))
         for eps in eps_list]
  return clean, jnp.stack(cra)


@dataclasses.dataclass(frozen=True)
class CertificationResult:
  """The certification table as data.

  Attributes:
    num_examples: examples evaluated (every one: the last partial batch is padded, masked).
    num_correct: examples with a strictly positive margin.
    eps_list: the radii.
    num_certified: per radius, examples certified at that radius.
    lipschitz_constant: the ``L`` used.
    max_allowance: the largest rounding allowance applied, per radius.
  """
  num_examples: int
  num_correct: int
  eps_list: tuple[float, ...]
  num_certified: tuple[int, ...]
  lipschitz_constant: float
  max_allowance: tuple[float, ...]

  @property
  def clean_accuracy(self) -> float:
    return self.num_correct / self.num_examples

  @property
  def cra(self) -> tuple[float, ...]:
    """Certified robust accuracy per radius."""
    return tuple(c / self.num_examples for c in self.num_certified)


def _eps_label(eps: float) -> str:
  k = eps * 255
  if eps != 1.0 and abs(k - round(k)) < 1e-6:
    return f"{round(k)}/255"
  return f"{eps:g}"


def certification_markdown(result: CertificationResult, *, name: str = "model",
                           digits: int = 1) -> str:
  """Renders a :class:`CertificationResult` as a Markdown table, accuracies in percent.

  Example::

    | model | n | clean | 36/255 | 72/255 | 108/255 | 1 |
    |---|---|---|---|---|---|---|
    | aol_small | 10000 | 70.3 | 62.9 | 55.0 | 47.7 | 22.3 |
  """
  header = ["model", "n", "clean"] + [_eps_label(e) for e in result.eps_list]
  pct = lambda v: f"{100 * v:.{digits}f}"
  row = [name, str(result.num_examples), pct(result.clean_accuracy)]
  row += [pct(v) for v in result.cra]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
           "| " + " | ".join(row) + " |"]
  return "\n".join(lines)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _zero_input_activation_norm(graphdef, state, image_shape) -> jax.Array:
  """``M(0) = max_k ||x_k||`` for the all-zero image."""
  zeros = jnp.zeros((1, *image_shape), jnp.float32)
  return nnx.merge(graphdef, state).logits_and_activation_norm(zeros)[1][0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batch_counts(graphdef, terms: RoundingTerms, lip: float, state, x, y, valid, eps_arr,
                  zero_norm, growth):
  """Correct count, certified count per radius and largest allowance, for one batch."""
  logits = nnx.merge(graphdef, state)(x)
  act_norm = growth * jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1) + zero_norm
  m = margins(logits, y)
  correct = jnp.sum((m > 0) & valid)
  allow = jax.vmap(lambda e: rounding_allowance(terms, act_norm, e,
                                                lipschitz_constant=lip))(eps_arr)
  cert = jax.vmap(lambda e, a: certify(logits, y, e, lipschitz_constant=lip,
                                       allowance=a))(eps_arr, allow)
  return correct, jnp.sum(cert & valid, axis=1), jnp.max(jnp.where(valid, allow, 0), axis=1)


@jax.jit
def _accumulate(totals, out):
  return totals[0] + out[0], totals[1] + out[1], jnp.maximum(totals[2], out[2])


def certify_dataset(model: nnx.Module, images: ArrayLike, labels: ArrayLike, *,
                    eps_list: Sequence[float] = STANDARD_RADII, batch_size: int,
                    mesh: jax.sharding.Mesh | None = None) -> CertificationResult:
  """Certifies a whole dataset with the frozen model; returns the table as data.

  The model is frozen (:func:`aol_jax.freeze`), ``L = model.lipschitz_bound()`` (so an input
  normalisation's ``max(1 / std)`` cannot be forgotten), and each example is certified
  at each radius with :func:`certify` and its own :func:`rounding_allowance`, taking for
  ``M`` the bound ``max(1, L) (1 + u S_r) ||x|| + M(0)`` (every prefix of the network is
  ``max(1, L)``-Lipschitz, so no activation is further than that from the zero image's),
  so each batch costs one bare forward pass and an input norm. Every batch
  has ``batch_size`` rows: the last one is padded with zeros and masked out, never
  dropped, so one jit-compiled function serves the whole dataset. With a ``mesh``, batches
  are sharded over its ``'data'`` axis (``NamedSharding(mesh, P('data'))``) and the model
  state is replicated; ``batch_size`` must then be a multiple of that axis' size. The
  forward pass runs with float32 matmul precision 'highest', as the allowance assumes.

  Args:
    model: an ``AOLNetwork`` (anything with ``lipschitz_bound()`` and
      ``logits_and_activation_norm(x)``), trained or frozen.
    images: ``(n, H, W, C)`` in ``[0, 1]``.
    labels: ``(n,)`` integer class ids.
    eps_list: radii, default the standard ``36/255, 72/255, 108/255, 1``.
    batch_size: rows per compiled call.
    mesh: optional mesh with a ``'data'`` axis.
  """
  if not hasattr(model, "lipschitz_bound") or not hasattr(model, "logits_and_activation_norm"):
    raise TypeError("certify_dataset needs a model with lipschitz_bound() and "
                    "logits_and_activation_norm(x), such as aol_jax.models.AOLNetwork.")
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  n = images.shape[0]
  if labels.shape != (n,) or n == 0:
    raise ValueError(f"Need n >= 1 images and labels of shape (n,), got {images.shape} "
                     f"and {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  eps_arr = np.asarray(eps_list, np.float32)
  if eps_arr.ndim != 1 or (eps_arr < 0).any():
    raise ValueError(f"eps_list must be a sequence of radii >= 0, got {eps_list}.")
  lip = float(model.lipschitz_bound())
  frozen = freeze(model)
  terms = rounding_terms(frozen)
  graphdef, state = nnx.split(frozen)
  num_classes = jax.eval_shape(frozen, jax.ShapeDtypeStruct((1,) + images.shape[1:],
                                                            jnp.float32)).shape[-1]
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}); got values in "
                     f"[{labels.min()}, {labels.max()}].")

  data_sharding = None
  if mesh is not None:
    if "data" not in mesh.axis_names:
      raise ValueError(f"mesh needs a 'data' axis, has {mesh.axis_names}.")
    if batch_size % mesh.shape["data"]:
      raise ValueError(f"batch_size ({batch_size}) must be a multiple of the mesh's 'data' "
                       f"axis ({mesh.shape['data']}).")
    data_sharding = NamedSharding(mesh, P("data"))
    state = jax.device_put(state, NamedSharding(mesh, P()))

  # M(x) <= max(1, L) (1 + u S_r) ||x|| + M(0): every prefix of the network is
  # max(1, L)-Lipschitz (1 + u S_r covers the factors' rounding), so each activation is
  # within that distance of the activation for the zero image. One forward pass of zeros
  # replaces tracking every activation norm of every batch.
  growth = max(1.0, lip) * (1.0 + FLOAT32_UNIT_ROUNDOFF * terms.rescale)
  mesh_context = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
  totals = None
  with jax.default_matmul_precision("highest"), mesh_context:
    zero_norm = _zero_input_activation_norm(graphdef, state, images.shape[1:])
    for start in range(0, n, batch_size):
      x = images[start:start + batch_size]
      y = labels[start:start + batch_size].astype(np.int32)
      rows = x.shape[0]
      valid = np.arange(batch_size) < rows
      if rows < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - rows,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros(batch_size - rows, y.dtype)])
      if data_sharding is not None:
        x, y, valid = jax.device_put((x, y, valid), data_sharding)
      out = _batch_counts(graphdef, terms, lip, state, x, y, valid, eps_arr, zero_norm, growth)
      # Summed on the device, read once at the end: the host never waits between batches.
      totals = out if totals is None else _accumulate(totals, out)
  correct, certified, max_allow = jax.device_get(totals)
  return CertificationResult(
      num_examples=n, num_correct=int(correct), eps_list=tuple(float(e) for e in eps_list),
      num_certified=tuple(int(c) for c in certified), lipschitz_constant=lip,
      max_allowance=tuple(float(a) for a in max_allow))
