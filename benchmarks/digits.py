"""scikit-learn's digits and a short training loop, for benchmarks that need a trained model.

The split and the loop are those of the test suite's small digits model (the same rows, the
same optimiser), so a benchmark's model is the one the tests check; benchmarks never import
the tests.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import aol_jax


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The 8x8 digits in [0, 1] (NHWC float32, int32 labels), split 1400 train / 397 test by a
  fixed permutation."""
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def train(model: nnx.Module, x: np.ndarray, y: np.ndarray, *, steps: int,
          learning_rate: float, batch_size: int, seed: int) -> nnx.Module:
  """Adam on the offset cross-entropy, random minibatches; trains ``model`` in place."""
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    grads = nnx.grad(lambda m: aol_jax.offset_cross_entropy(m(xb), yb))(model)
    optimizer.update(model, grads)

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch_size)
    step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
  return model
