"""Test helpers: small model sizes of every family; scikit-learn's digits, its split and the
short training loop are benchmarks.digits' (one copy)."""

from __future__ import annotations

import numpy as np
from flax import nnx
from sklearn.datasets import load_digits

import aol_jax
from benchmarks.digits import digits_split, train  # noqa: F401  (re-exported for the tests)

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
