"""Logits against integer labels: the label check and the classification margin.

Shared by the loss, the certificates and the attacks, none of which depends on another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def check_labels(labels: ArrayLike, num_classes: int, *, batch: int | None = None) -> None:
  """Raises ``ValueError`` unless ``labels`` are integer class ids in ``[0, num_classes)``.

  Args:
    labels: the labels; under ``jax.jit`` (a tracer) only the dtype and shape are checked,
      the values cannot be.
    num_classes: the number of classes.
    batch: when given, ``labels`` must have shape ``(batch,)``.
  """
  shape = np.shape(labels)
  if batch is not None and shape != (batch,):
    raise ValueError(f"Expected labels of shape (batch,) = ({batch},), got {shape}.")
  dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {dtype}.")
  if isinstance(labels, jax.core.Tracer):
    return
  values = np.asarray(labels)
  if values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}); got values in "
                     f"[{values.min()}, {values.max()}].")


def margins(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """``s_y - max_{j != y} s_j`` per example; positive iff ``y`` is the unique argmax.

  Labels outside ``[0, classes)`` raise ``ValueError`` when called outside ``jax.jit``.

  Example:
    >>> margins(jnp.array([[2.0, 0.5, 1.0]]), jnp.array([0]))
    Array([1.], dtype=float32)
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f"Expected logits (batch, classes), got shape {logits.shape}.")
  if logits.shape[1] < 2:
    raise ValueError(f"Need at least 2 classes for a margin, got {logits.shape[1]}.")
  check_labels(labels, logits.shape[1], batch=logits.shape[0])
  onehot = jax.nn.one_hot(labels, logits.shape[1], dtype=bool)
  true = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
  other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=1)
  return true - other
