"""The parameter-free blocks: hand-checked values, and 1-Lipschitz proven per block.

Linear blocks: the exact operator norm (SVD of the explicit matrix) and, stronger, that the
matrix is a partial permutation (orthogonal / a coordinate projection / an isometric embedding).
MaxMin and GroupSort: the Jacobian at random points is a permutation matrix, and
||f(x) - f(y)|| <= ||x - y|| on many random pairs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aol_jax
from aol_jax._src import lipschitz
from aol_jax._src.blocks import ConcatenationPooling, FirstChannels, Flatten, GroupSort, MaxMin, ZeroChannelPad


def test_maxmin_values():
  x = jnp.array([[1.0, 2.0, 5.0, -3.0, 0.0, 0.0]])
  np.testing.assert_array_equal(MaxMin()(x), [[2.0, 1.0, 5.0, -3.0, 0.0, 0.0]])


def test_groupsort_values():
  x = jnp.array([[3.0, 1.0, 2.0, -1.0, 7.0, 0.0]])
  np.testing.assert_array_equal(GroupSort(3)(x), [[3.0, 2.0, 1.0, 7.0, 0.0, -1.0]])
  np.testing.assert_array_equal(GroupSort(1)(x), x)
  np.testing.assert_array_equal(GroupSort(2)(x), MaxMin()(x))


def test_concatenation_pooling_values():
  # (1, 4, 4, 1) with x[h, w] = 10 h + w; window 2: output (1, 2, 2, 4), channel = 2 dh + dw.
  x = (10 * jnp.arange(4)[:, None] + jnp.arange(4)[None, :]).astype(jnp.float32)[None, :, :, None]
  y = ConcatenationPooling(2)(x)
  assert y.shape == (1, 2, 2, 4)
  np.testing.assert_array_equal(y[0, 0, 0], [0, 1, 10, 11])
  np.testing.assert_array_equal(y[0, 1, 0], [20, 21, 30, 31])
  np.testing.assert_array_equal(y[0, 0, 1], [2, 3, 12, 13])
  # Channel minor: two channels -> (dh, dw, c) order.
  x2 = jnp.stack([x[..., 0], -x[..., 0]], axis=-1)
  np.testing.assert_array_equal(ConcatenationPooling(2)(x2)[0, 0, 0], [0, 0, 1, -1, 10, -10, 11, -11])
  # Rectangular windows and 1D.
  assert ConcatenationPooling((2, 1))(x).shape == (1, 2, 4, 2)
  np.testing.assert_array_equal(ConcatenationPooling(2, num_spatial=1)(jnp.arange(4.0)[None, :, None]),
                                [[[0, 1], [2, 3]]])


def test_first_channels_zero_pad_flatten_values():
  x = jnp.arange(12.0).reshape(1, 2, 2, 3)
  np.testing.assert_array_equal(FirstChannels(2)(x), x[..., :2])
  y = ZeroChannelPad(2)(x)
  assert y.shape == (1, 2, 2, 5)
  np.testing.assert_array_equal(y[..., :3], x)
  np.testing.assert_array_equal(y[..., 3:], 0)
  np.testing.assert_array_equal(Flatten()(x), jnp.arange(12.0).reshape(1, 12))


def _assert_partial_permutation(mat: np.ndarray):
  """Entries in {0, 1}, at most one 1 per row and per column."""
  assert set(np.unique(mat)) <= {0.0, 1.0}
  assert np.all(mat.sum(axis=0) <= 1) and np.all(mat.sum(axis=1) <= 1)


@pytest.mark.parametrize("block,shape,norm", [
    (ConcatenationPooling(2), (1, 4, 6, 3), 1.0),
    (ConcatenationPooling((3, 1, 2), num_spatial=3), (1, 3, 2, 4, 2), 1.0),
    (FirstChannels(2), (1, 3, 3, 5), 1.0),
    (ZeroChannelPad(3), (1, 4, 2), 1.0),
    (Flatten(), (2, 3, 2, 2), 1.0),
])
def test_linear_blocks_are_partial_permutations(block, shape, norm):
  fn = jax.jit(block)
  assert lipschitz.operator_norm(fn, shape) == pytest.approx(norm, abs=1e-12)
  mat = lipschitz.explicit_matrix(fn, shape)
  _assert_partial_permutation(mat)
  if not isinstance(block, FirstChannels):  # the others lose no coordinate: isometries
    np.testing.assert_array_equal(mat.T @ mat, np.eye(mat.shape[1]))


@pytest.mark.parametrize("block,channels", [(MaxMin(), 6), (GroupSort(3), 6), (GroupSort(4), 8)])
def test_sorting_blocks_are_one_lipschitz(block, channels):
  rng = np.random.default_rng(channels)
  fn = jax.jit(block)
  x = rng.normal(size=(500, 2, channels)).astype(np.float32)
  y = x + rng.normal(size=x.shape).astype(np.float32) * rng.choice([1e-3, 1.0, 10.0], size=(500, 1, 1))
  # Half the pairs share some coordinates exactly, so ties are exercised too.
  y[:250, :, ::2] = x[:250, :, ::2]
  fx, fy = np.asarray(fn(x), np.float64), np.asarray(fn(y), np.float64)
  d_in = np.linalg.norm((x - y).reshape(500, -1).astype(np.float64), axis=1)
  d_out = np.linalg.norm((fx - fy).reshape(500, -1), axis=1)
  assert np.all(d_out <= d_in * (1 + 1e-6) + 1e-6)  # a permutation per pair: float32 rounding only
  # The Jacobian at each random point is a permutation matrix (norm-preserving gradients).
  jac = jax.jit(jax.vmap(jax.jacfwd(lambda v: block(v[None])[0])))(jnp.asarray(x[:20, 0]))
  for j in np.asarray(jac):
    _assert_partial_permutation(j)
    np.testing.assert_array_equal(j.sum(axis=0), 1)


def test_sorting_preserves_the_multiset():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)))
  y = GroupSort(4)(x)
  np.testing.assert_array_equal(jnp.sort(y.reshape(3, 2, 4), -1), jnp.sort(x.reshape(3, 2, 4), -1))


@pytest.mark.parametrize("make,shape,match", [
    (lambda: MaxMin(), (1, 3), "MaxMin needs the channel count .3. to be a multiple"),
    (lambda: GroupSort(4), (1, 6), "multiple of the group size"),
    (lambda: GroupSort(0), None, "group_size must be >= 1"),
    (lambda: ConcatenationPooling(0), None, "window must be positive"),
    (lambda: ConcatenationPooling(2), (1, 4, 5, 1), "not divisible"),
    (lambda: ConcatenationPooling(2), (4, 4, 1), "expects"),
    (lambda: FirstChannels(0), None, "n >= 1"),
    (lambda: FirstChannels(4), (1, 3), "only 3 channels"),
    (lambda: ZeroChannelPad(-1), None, "n >= 0"),
])
def test_bad_inputs(make, shape, match):
  with pytest.raises(ValueError, match=match):
    block = make()
    block(jnp.ones(shape))


def test_network_runs_on_a_batch_sharded_input_under_an_explicit_mesh():
  """Reshapes keep the batch sharding, so a model runs inside jax.set_mesh(explicit mesh)."""
  from flax import nnx
  from jax.sharding import AxisType, NamedSharding, PartitionSpec

  from aol_jax import aol_convnet
  model = aol_convnet(10, width=4, channels=8, conv_depth=1, dense_depth=2, pool=2,
                      image_size=8, in_channels=1, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
  expected = jax.jit(lambda v: model(v))(x)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    y = jax.jit(lambda v: model(v))(sharded)
    assert jax.typeof(y).sharding.spec == PartitionSpec("data", None)
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [MaxMin(), GroupSort(3), ConcatenationPooling(2),
                                   FirstChannels(2), ZeroChannelPad(1), Flatten()])
def test_blocks_state_one_lipschitz_and_no_rounding(block):
  """What each block states for certification: L = 1, exact in floating point."""
  from aol_jax._src.certification import protocol
  from aol_jax._src.certification.statistical import StatisticalTerms
  assert protocol.lipschitz_bound(block) == 1.0
  assert protocol.statistical_terms(block) == StatisticalTerms(lipschitz=1.0)
  x = jnp.ones((2, 4, 4, 6))
  y, bound = block.rounding_error(x, aol_jax.certification.FLOAT32)
  assert np.array_equal(np.asarray(y), np.asarray(block(x)))  # exact: only subnormal flushes
  assert np.all(np.asarray(bound) <= math.sqrt(96) * 2.0 ** -126 * 1.01)
  assert block.rounding_error_slope(aol_jax.certification.FLOAT32) == 0.0
  # Exact in float32 indeed: the float32 output equals the float64 output rounded.
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 6))
  y32 = np.asarray(block(jnp.asarray(x, jnp.float32)))
  with jax.enable_x64(True):
    y64 = np.asarray(block(jnp.asarray(x.astype(np.float32).astype(np.float64))))
  np.testing.assert_array_equal(y32.astype(np.float64), y64)
