"""The certificate: margin against ``sqrt(2) L eps`` plus a rounding allowance, and CRA.

For a network ``f`` with l2 Lipschitz constant ``L``, logits ``s = f(x)`` and label ``y``,
the margin ``m(s) = s_y - max_{j != y} s_j`` is ``sqrt(2)``-Lipschitz in ``s`` (l2), so
every ``x'`` with ``||x' - x||_2 <= eps`` keeps the label when ``m(f(x)) > sqrt(2) L eps``
(AOL paper, Section 6; Tsuzuku et al., NeurIPS 2018). That is the exact-arithmetic
certificate; the allowance that keeps it true for a floating-point evaluation comes from the mode's rounding model
(:data:`aol_jax.ROUNDING_MODES`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from aol_jax._src.certification.margins import margins

STANDARD_RADII: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255, 1.0)
"""The radii of the AOL paper's tables."""


def _allowance_or_warn(allowance, caller: str):
  if allowance is None:
    warnings.warn(f"{caller}() without a rounding allowance gives the exact-arithmetic "
                  "certificate, which floating-point rounding can break; pass "
                  "allowance=rounding_allowance(...) (certify_dataset does) or "
                  "allowance=0.0 to silence this.", stacklevel=3)
    return 0.0
  return allowance


def _check_non_negative(value, name: str) -> None:
  """``value`` (a number or an array) finite and >= 0; a traced value cannot be checked."""
  if isinstance(value, jax.core.Tracer):
    return
  v = np.asarray(value, np.float64)
  if not (np.all(np.isfinite(v)) and np.all(v >= 0)):
    raise ValueError(f"{name} must be finite and >= 0, got {value!r}: a negative or NaN "
                     f"{name} would certify misclassified examples.")


def certify(logits: ArrayLike, labels: ArrayLike, eps: ArrayLike, *,
            lipschitz_constant: float = 1.0, allowance: ArrayLike | None = None) -> jax.Array:
  """True where ``s_y - max_{j != y} s_j > sqrt(2) L eps + allowance``, decided exactly.

  A certified example is correctly classified and keeps its label for every input
  perturbation of l2 norm <= ``eps``. A tie is never certified, and with ``eps = 0`` and
  no allowance this is "correct with a strictly positive margin". The comparison is made in
  the logits' dtype with the threshold raised by ``8 u`` relative (``u`` that dtype's unit
  roundoff) plus the smallest normal number when the exact threshold is positive, so that
  the rounding of the margin and of the threshold can only refuse, never certify.

  Args:
    logits: ``(batch, classes)``.
    labels: ``(batch,)`` integer class ids.
    eps: the l2 radius (scalar, or one per example), finite and >= 0.
    lipschitz_constant: ``L >= 0`` of the network from input to logits
      (``model.lipschitz_bound()``, which includes ``max(1 / std)`` for a normalising
      model).
    allowance: margin slack for floating-point rounding, scalar or per example, finite and
      >= 0 (:func:`aol_jax.certify_dataset` computes it for its mode). ``None`` gives the
      exact-arithmetic certificate and warns; pass ``0.0`` to ask for it explicitly.

  A value that cannot be checked here (a traced ``eps``, ``allowance`` or constant under
  ``jax.jit``) that is negative, NaN or infinite certifies nothing.
  """
  allowance = _allowance_or_warn(allowance, "certify")
  _check_non_negative(eps, "eps")
  _check_non_negative(allowance, "allowance")
  _check_non_negative(lipschitz_constant, "lipschitz_constant")
  m = margins(logits, labels)
  info = jnp.finfo(m.dtype)
  eps = jnp.asarray(eps, m.dtype)
  allowance = jnp.asarray(allowance, m.dtype)
  lip = jnp.asarray(lipschitz_constant, m.dtype)
  # Under jax.jit the checks above cannot see the values: a negative, NaN or infinite eps,
  # allowance or constant then certifies nothing.
  valid = ((eps >= 0) & (allowance >= 0) & (lip >= 0) & jnp.isfinite(eps)
           & jnp.isfinite(allowance) & jnp.isfinite(lip))
  threshold = math.sqrt(2) * lip * eps + allowance
  positive = ((lip > 0) & (eps > 0)) | (allowance > 0)
  threshold = jnp.where(positive, threshold * (1 + 8 * float(info.eps) / 2) + info.tiny, 0)
  return (m > threshold) & valid


def certified_robust_accuracy(logits: ArrayLike, labels: ArrayLike, eps_list: Sequence[float], *,
                              lipschitz_constant: float = 1.0,
                              allowance: ArrayLike | Callable[[float], ArrayLike] | None = None
                              ) -> tuple[jax.Array, jax.Array]:
  """Clean accuracy and the certified robust accuracy at each radius of ``eps_list``.

  CRA(eps) is the fraction of examples that :func:`certify` accepts at ``eps``; clean
  accuracy the fraction with a strictly positive margin. ``allowance`` may be a callable
  ``eps -> slack`` (the rounding allowance grows with ``eps``) or an array as in
  :func:`certify`.

  Returns:
    ``(clean_accuracy, cra)`` with ``cra`` of shape ``(len(eps_list),)``.
  """
  allowance = _allowance_or_warn(allowance, "certified_robust_accuracy")
  _check_non_negative(np.asarray(eps_list, np.float64), "eps")
  m = margins(logits, labels)
  clean = jnp.mean(m > 0)
  cra = [jnp.mean(certify(logits, labels, eps, lipschitz_constant=lipschitz_constant,
                          allowance=allowance(eps) if callable(allowance) else allowance))
         for eps in eps_list]
  return clean, jnp.stack(cra)
