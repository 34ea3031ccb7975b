"""The Lipschitz toolbox against matrices and circular convolutions built independently here."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aol_jax._src import lipschitz


def test_explicit_matrix_of_a_matmul_is_the_matrix():
  a = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  mat = lipschitz.explicit_matrix(lambda x: x @ a + 7.0, (5,))  # the bias is not part of it
  assert mat.dtype == np.float64
  np.testing.assert_array_equal(mat, a.T.astype(np.float64))


@pytest.mark.parametrize("shape", [(4, 4), (7, 3), (2, 9), (1, 1)])
def test_operator_norm_is_the_largest_singular_value(shape):
  a = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
  got = lipschitz.operator_norm(lambda x: (x @ a).reshape(-1), shape[:1])
  np.testing.assert_allclose(got, np.linalg.norm(a.astype(np.float64), 2), rtol=1e-12)


def test_operator_norm_on_multidimensional_inputs():
  scale = np.array([0.5, 3.0, 2.0], np.float32)
  assert lipschitz.operator_norm(lambda x: x * scale, (4, 2, 3)) == pytest.approx(3.0)
  assert lipschitz.operator_norm(lambda x: jnp.zeros((0,)) + x.sum() * 0, (2,)) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_power_iteration_agrees_with_the_svd(seed):
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.normal(size=(12, 9)), jnp.float32)
  f = lambda x: x @ a
  exact = lipschitz.operator_norm(f, (12,))
  est = float(jax.jit(lambda x: lipschitz.power_iteration(f, x, 200))(jnp.ones(12)))
  assert exact * (1 - 1e-4) <= est <= exact * (1 + 1e-5)


def test_power_iteration_is_a_local_estimate_for_nonlinear_maps():
  x = jnp.array([1.0, -2.0, 0.5])
  est = lipschitz.power_iteration(lambda v: jnp.array([3.0, 1.0, 0.0]) * jnp.tanh(v), x, 100)
  np.testing.assert_allclose(est, 3.0 * (1 - np.tanh(1.0) ** 2), rtol=1e-5)


def _circular_conv_matrix(kernel: np.ndarray, n: tuple) -> np.ndarray:
  """y[x, o] = sum_{t, i} K[t, i, o] * v[(x + t) mod n, i], as an explicit matrix, by loops."""
  ksize, (c_in, c_out) = kernel.shape[:-2], kernel.shape[-2:]
  size_in, size_out = int(np.prod(n)) * c_in, int(np.prod(n)) * c_out
  mat = np.zeros((size_out, size_in))
  for pos in itertools.product(*[range(m) for m in n]):
    for t in itertools.product(*[range(k) for k in ksize]):
      src = tuple((p + s) % m for p, s, m in zip(pos, t, n))
      for i in range(c_in):
        for o in range(c_out):
          row = np.ravel_multi_index(pos + (o,), (*n, c_out))
          col = np.ravel_multi_index(src + (i,), (*n, c_in))
          mat[row, col] += kernel[t + (i, o)]
  return mat


@pytest.mark.parametrize("ksize,c_in,c_out,n", [
    ((3,), 2, 3, (6,)), ((3, 3), 2, 2, (4, 5)), ((5, 2), 1, 3, (3, 2)), ((2, 2, 2), 2, 1, (3, 2, 2)),
    ((4,), 3, 2, (2,)),
])
def test_circular_conv_singular_values_against_explicit_matrix(ksize, c_in, c_out, n):
  """Includes kernels larger than the input: wrapped taps are summed."""
  kernel = np.random.default_rng(len(n)).normal(size=(*ksize, c_in, c_out))
  want = np.linalg.svd(_circular_conv_matrix(kernel, n), compute_uv=False)
  got = lipschitz.circular_conv_singular_values(kernel, n)
  assert got.shape == (int(np.prod(n)) * min(c_in, c_out),)
  assert np.all(np.diff(got) <= 0)
  np.testing.assert_allclose(got, want[:got.size], rtol=1e-10, atol=1e-12)


def test_circular_conv_singular_values_checks_rank():
  with pytest.raises(ValueError, match="spatial dims"):
    lipschitz.circular_conv_singular_values(np.ones((3, 3, 1, 1)), (4,))


def test_operator_norm_is_float64_exact_for_a_circular_conv_wider_than_its_input():
  """A 5x5 circular kernel on a 3x3 input: several taps sum into one matrix entry. In float32
  those sums rounded and the SVD exceeded the exact norm (1.0000001 x); in float64 it matches
  the FFT's singular values of the folded kernel."""
  from aol_jax._src.lipschitz import circular_conv_singular_values, operator_norm
  from flax import nnx
  import aol_jax
  layer = aol_jax.freeze(aol_jax.AOLConv(3, 3, (5, 5), padding="CIRCULAR", use_bias=False,
                                         rngs=nnx.Rngs(0)))
  exact = operator_norm(lambda v: layer(v[None])[0], (3, 3, 3))
  fft = circular_conv_singular_values(np.asarray(layer.kernel[...], np.float64), (3, 3))[0]
  assert abs(exact - fft) <= 1e-12 * fft
  assert exact <= layer.lipschitz_bound()
