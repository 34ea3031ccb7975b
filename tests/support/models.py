"""Test helpers: small model sizes of every family, scikit-learn's digits, a short training loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import aol_jax
SMALL = {
    "aol_small": dict(channels=16, conv_depth=2, dense_depth=3, width=4, pool=2),
    "aol_medium": dict(channels=16, conv_depth=2, dense_depth=3, width=8, pool=2),
    "aol_large": dict(channels=16, conv_depth=2, dense_depth=3, width=12, pool=2),
    "aol_fc": dict(width=64, depth=3),
    "aol_std": dict(channels=8, num_stages=2, blocks_per_stage=1, dense_width=64),
}
"""Small sizes of every family for 8x8 (or 16x16) greyscale inputs."""


def build_small(name: str, *, image_size: int = 8, in_channels: int = 1,
                **kw) -> aol_jax.AOLNetwork:
  return aol_jax.MODELS[name](10, rngs=nnx.Rngs(0), image_size=image_size,
                             in_channels=in_channels, **SMALL[name], **kw)


def digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits in [0, 1], NHWC float32, and int32 labels."""
  data = load_digits()
  return (data.images / 16.0).astype(np.float32)[..., None], data.target.astype(np.int32)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The digits split 1400 train / 397 test by a fixed permutation."""
  x, y = digits()
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
