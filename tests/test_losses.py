"""Offset cross-entropy against an independent float64 formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aol_jax import offset_cross_entropy


def _reference(logits: np.ndarray, labels: np.ndarray, u: float, t: float) -> float:
  s = logits.astype(np.float64).copy()
  s[np.arange(len(labels)), labels] -= u
  z = s / t
  lse = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
  return float(np.mean(t * (lse - z[np.arange(len(labels)), labels])))


@pytest.mark.parametrize("u,t", [(math.sqrt(2), 0.25), (0.0, 1.0), (4 * math.sqrt(2), 1.0),
                                 (math.sqrt(2) / 4, 1 / 16)])
def test_matches_reference_under_jit(u, t):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 64)
  got = jax.jit(lambda s, y: offset_cross_entropy(s, y, offset=u, temperature=t))(logits, labels)
  assert float(got) == pytest.approx(_reference(logits, labels, u, t), rel=1e-5)


def test_defaults_are_the_papers():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 8)
  assert float(offset_cross_entropy(logits, labels)) == pytest.approx(
      _reference(logits, labels, math.sqrt(2), 0.25), rel=1e-5)


def test_gradient_is_softmax_of_shifted_logits_minus_onehot():
  """d/ds [t CE((s - u e_y) / t)] = softmax((s - u e_y) / t) - e_y, per example / batch."""
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(16, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 16)
  grad = jax.jit(jax.grad(lambda s: offset_cross_entropy(s, labels)))(logits)
  onehot = np.eye(5)[labels]
  z = (logits - math.sqrt(2) * onehot) / 0.25
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  np.testing.assert_allclose(grad, (p - onehot) / 16, atol=1e-6)


def test_offset_asks_for_a_margin():
  """With a margin of exactly u the loss equals the loss of equal logits without offset."""
  labels = np.array([0])
  at_margin = offset_cross_entropy(np.array([[math.sqrt(2), 0.0, 0.0]], np.float32), labels)
  flat = offset_cross_entropy(np.zeros((1, 3), np.float32), labels, offset=0.0)
  assert float(at_margin) == pytest.approx(float(flat), rel=1e-6)
  assert float(flat) == pytest.approx(0.25 * math.log(3), rel=1e-6)


@pytest.mark.parametrize("labels", [[0, 10], [-1, 2]])
def test_out_of_range_labels_raise_outside_jit(labels):
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    offset_cross_entropy(jnp.zeros((2, 10)), jnp.array(labels))


def test_bad_shapes_and_dtypes_raise():
  with pytest.raises(ValueError, match="integer"):
    offset_cross_entropy(jnp.zeros((2, 10)), jnp.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="batch"):
    offset_cross_entropy(jnp.zeros((2, 10)), jnp.array([0, 1, 2]))
