"""Offset cross-entropy (AOL paper, Section 5)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from aol_jax._src.certification.margins import check_labels


def offset_cross_entropy(logits: jax.Array, labels: jax.Array, *, offset: float = math.sqrt(2),
                         temperature: float = 0.25) -> jax.Array:
  """``t * CE((s - u * onehot(y)) / t, y)``, averaged over the batch.

  Subtracting ``u`` from the true logit asks for a margin of about ``u``, which a
  1-Lipschitz net turns into a certified radius of ``u / sqrt(2)``; ``u = sqrt(2)``,
  ``t = 1/4`` is the paper's choice (target radius 1).

  Args:
    logits: ``(batch, num_classes)``.
    labels: ``(batch,)`` integer class ids in ``[0, num_classes)``. Outside ``jax.jit`` an
      out-of-range label raises ``ValueError``; under jit it cannot be checked and gives a
      meaningless loss.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  num_classes = logits.shape[-1]
  if logits.ndim != 2:
    raise ValueError(f"Expected logits (batch, classes), got shape {logits.shape}.")
  check_labels(labels, num_classes, batch=logits.shape[0])
  onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  shifted = (logits - offset * onehot) / temperature
  return temperature * optax.softmax_cross_entropy_with_integer_labels(shifted, labels).mean()
