"""The paper's initialisers: identity where the layer preserves size, orthonormal otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aol_jax._src.initializers import aol_init
from aol_jax._src.layers import AOLConv, AOLDense


@pytest.mark.parametrize("ksize", [(1,), (3,), (4,), (3, 3), (2, 2), (4, 5), (1, 3), (2, 3, 4), (3, 3, 3)])
@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
def test_size_preserving_conv_starts_as_the_identity_map(ksize, padding):
  """Also for even kernel sizes: the identity sits on the tap that 'SAME' aligns with the output."""
  c = 3
  layer = AOLConv(c, c, ksize, padding=padding, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *[5] * len(ksize), c)), jnp.float32)
  # The AOL factor of an identity kernel is (1 + eps)^-1/2 = 1 - 5e-7.
  np.testing.assert_allclose(nnx.jit(lambda m, v: m(v))(layer, x), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("c,g", [(4, 2), (6, 3), (4, 4)])
def test_grouped_size_preserving_conv_is_the_identity(c, g):
  layer = AOLConv(c, c, (3, 2), feature_group_count=g, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, c)), jnp.float32)
  np.testing.assert_allclose(layer(x), x, rtol=1e-6, atol=1e-6)


def test_square_dense_is_the_identity():
  kernel = aol_init()(jax.random.key(0), (7, 7))
  np.testing.assert_array_equal(kernel, np.eye(7))
  layer = AOLDense(7, 7, rngs=nnx.Rngs(0))
  x = jnp.arange(14.0).reshape(2, 7)
  np.testing.assert_allclose(layer(x), x, rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 8), (8, 3), (1, 5), (5, 1)])
def test_non_square_dense_is_orthonormal(shape):
  k = np.asarray(aol_init()(jax.random.key(1), shape), np.float64)
  small = min(shape)
  gram = k.T @ k if shape[0] > shape[1] else k @ k.T  # orthonormal columns / rows
  np.testing.assert_allclose(gram, np.eye(small), atol=1e-6)


@pytest.mark.parametrize("shape,g", [((3, 3, 2, 6), 2), ((3, 4, 6), 2), ((1, 1, 1, 8), 4), ((2, 4, 2), 2)])
def test_grouped_non_square_conv(shape, g):
  k = np.asarray(aol_init(g)(jax.random.key(2), shape), np.float64)
  *spatial, cin_g, cout = shape
  centre = tuple((n - 1) // 2 for n in spatial)
  mask = np.ones(spatial, bool)
  mask[centre] = False
  assert np.all(k[mask] == 0)  # every tap but the centre is zero
  tap = k[centre]
  cout_g = cout // g
  for grp in range(g):
    block = tap[:, grp * cout_g:(grp + 1) * cout_g]
    gram = block.T @ block if cin_g > cout_g else block @ block.T
    np.testing.assert_allclose(gram, np.eye(min(cin_g, cout_g)), atol=1e-6)
  # Different groups get different orthogonal blocks.
  if g > 1 and cin_g != cout_g:
    assert not np.allclose(tap[:, :cout_g], tap[:, cout_g:2 * cout_g])


def test_dtype_and_bad_groups():
  assert aol_init()(jax.random.key(0), (3, 3, 2, 2), jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="does not divide"):
    aol_init(3)(jax.random.key(0), (3, 2, 4))


def test_orthogonal_init_layer_has_norm_one():
  """The paper's first layer (1x1, 48 -> 192 here scaled down) keeps the bound tight."""
  from aol_jax._src import lipschitz
  layer = AOLConv(3, 8, (1, 1), use_bias=False, rngs=nnx.Rngs(0))
  assert lipschitz.operator_norm(lambda v: layer(v[None])[0], (2, 2, 3)) == pytest.approx(1.0, abs=1e-5)
