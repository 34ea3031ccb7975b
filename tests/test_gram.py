"""aol_jax.gram: the triangle of the Gram against NumPy, the offset table, the precisions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aol_jax._src import gram


def _numpy_gram(kernel: np.ndarray) -> np.ndarray:
  """G[s] = sum_{t - u = s} K[t] K[u]^T in float64, offsets row-major over [-(k-1), k-1]."""
  k = np.asarray(kernel, np.float64)
  ksize, (n, _) = k.shape[:-2], k.shape[-2:]
  out = np.zeros((*(2 * a - 1 for a in ksize), n, n))
  for t in itertools.product(*map(range, ksize)):
    for u in itertools.product(*map(range, ksize)):
      s = tuple(a - b + c - 1 for a, b, c in zip(t, u, ksize))
      out[s] += k[t] @ k[u].T
  return out


@pytest.mark.parametrize("shape", [(3, 3, 5, 4), (1, 1, 70, 9), (2, 5, 3), (2, 2, 2, 3, 2),
                                   (3, 3, 130, 6)])
def test_taps_gram_is_the_whole_gram(shape):
  """The triangle mirrored equals the float64 Gram (130 input channels: 4 row blocks in the
  centre's symmetric product, the last one zero-padded)."""
  rng = np.random.default_rng(sum(shape))
  kernel = rng.normal(size=shape).astype(np.float32)
  got = jax.jit(lambda k: gram.conv_gram(k, method="taps"))(kernel)
  scale = np.prod(shape[:-2]) * shape[-1]  # terms per entry, each O(1)
  np.testing.assert_allclose(got, _numpy_gram(kernel), rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("n", [1, 31, 64, 100, 129, 300])
def test_sym_outer_is_x_xt(n):
  x = np.random.default_rng(n).normal(size=(n, 7)).astype(np.float32)
  got = np.asarray(jax.jit(lambda a: gram.sym_outer(a, "highest"))(x))
  np.testing.assert_allclose(got, x.astype(np.float64) @ x.T, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(got, got.T)  # mirrored, so exactly symmetric
  np.testing.assert_allclose(gram.dense_gram(x), got, rtol=0, atol=1e-5)


def test_triangle_saves_gram_flops():
  """Compiler count: the forward Gram of a 3x3 192-channel kernel costs at most
  (36 + 9 * 0.625) / 81 = 0.52 of the full tap-pair product's 2 * 81 * 192^2 * 192 FLOPs,
  and a dense 1024 one at most 0.63 of 2 * 1024^2 * 1024."""
  def flops(fn, shape):
    return jax.jit(fn).lower(jnp.zeros(shape)).compile().cost_analysis()["flops"]
  full = 2 * 81 * 192 ** 3
  assert flops(lambda k: gram.conv_gram(k, method="taps"), (3, 3, 192, 192)) <= 0.53 * full
  assert flops(gram.dense_gram, (1024, 1024)) <= 0.63 * 2 * 1024 ** 3


def test_offset_table_pairs_and_mirror():
  table, count = gram.offset_table((3, 2))
  assert count == 5 * 3 and table.shape == (6, 6)
  centre = (count - 1) // 2
  np.testing.assert_array_equal(np.diag(table), centre)
  np.testing.assert_array_equal(table + table.T, 2 * centre)  # (u, t) is offset -s
  upper = np.triu_indices(6, 1)
  assert np.all(table[upper] < centre)  # u > t: offsets s < 0
  assert gram.offset_table(())[1] == 1


def test_precision_table_feeds_the_validation():
  assert tuple(gram.GRAM_PRECISIONS) == ("default", "high", "highest", "bfloat16")
  for p in gram.GRAM_PRECISIONS:
    assert gram.check_precision(p) == p
  with pytest.raises(ValueError, match=r"gram_precision='float16' is not one of \('default'"):
    gram.check_precision("float16")
  with pytest.raises(ValueError, match="gram_precision='HIGHEST'"):
    gram.conv_gram(jnp.ones((3, 2, 2)), gram_precision="HIGHEST")


def test_bfloat16_precision_rounds_the_operands():
  """'bfloat16' gives the product of the bfloat16-rounded operands, accumulated in float32."""
  rng = np.random.default_rng(0)
  a, b = (rng.normal(size=(16, 32)).astype(np.float32) for _ in range(2))
  got = np.asarray(gram.dot(jnp.asarray(a), jnp.asarray(b), "bfloat16", (1, 1)))
  assert got.dtype == np.float32
  rounded = lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(got, rounded(a) @ rounded(b).T, rtol=0, atol=1e-5)
  assert np.abs(got - a.astype(np.float64) @ b.T).max() > 1e-3
