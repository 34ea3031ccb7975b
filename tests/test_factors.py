"""aol_jax._src.factors: the factors' hand-written derivative, whole and split over 2, 3 and 8
devices (even and odd axes, blocks padded), against autodiff of the plain formula; a device
of the split computes its own rows of the Gram, not all of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from aol_jax._src import factors, gram

# Gram rows summed in other blocks and orders: float32 rounding, a few ulp.
RTOL, ATOL = 1e-5, 1e-6


def reference(kernel, ksize, eps=1e-6):
  """``(sum_{s, j} |G[s, i, j]| + eps) ** -1/2`` by autodiff-able jnp, the self-convolution
  Gram (``gram.conv_gram(method='conv')``) or ``P P^T``, at HIGHEST."""
  if ksize:
    g = gram.conv_gram(kernel, method="conv")
    g = jnp.abs(g).sum(axis=tuple(range(len(ksize))))
  else:
    g = jnp.abs(jnp.dot(kernel, kernel.T, precision="highest"))
  return jax.lax.rsqrt(g.sum(axis=1) + eps)


def _mesh(m):
  return jax.make_mesh((m,), ("x",), devices=jax.devices()[:m],
                       axis_types=(jax.sharding.AxisType.Explicit,))


def _split(m, ksize):
  """The factors split over a mesh of ``m`` devices, as a function of the global kernel:
  every device's factors stacked (they must agree)."""
  def per_device(k):
    return factors.factors(k, ksize, 1e-6, "highest", "x")[None]
  return lambda k: jax.shard_map(per_device, mesh=_mesh(m), in_specs=P(),
                                 out_specs=P("x"))(k)


# (kernel shape, ksize): input features 9, 5 and 17 are not multiples of the devices, 2 is
# fewer than them.
CASES = [((3, 3, 9, 6), (3, 3)), ((17, 5), ()), ((2, 7), ()), ((3, 5, 4), (3,)),
         ((1, 1, 16, 8), (1, 1))]


@pytest.mark.parametrize("shape,ksize", CASES)
@pytest.mark.parametrize("m", [None, 2, 3, 8])
def test_factors_and_their_derivative_match_autodiff_of_the_formula(shape, ksize, m):
  rng = np.random.default_rng(sum(shape))
  kernel = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=shape[-2]), jnp.float32)
  want = reference(kernel, ksize)
  want_grad = jax.grad(lambda k: jnp.sum(jnp.cos(reference(k, ksize) * w)))(kernel)
  if m is None:
    fn = lambda k: factors.factors(k, ksize, 1e-6, "highest")
    got = jax.jit(fn)(kernel)
    grad = jax.jit(jax.grad(lambda k: jnp.sum(jnp.cos(fn(k) * w))))(kernel)
  else:
    fn = _split(m, ksize)
    with jax.set_mesh(_mesh(m)):
      per_device = np.asarray(jax.jit(fn)(kernel))
      assert per_device.shape == (m, shape[-2])
      got = per_device[0]
      for other in per_device[1:]:
        np.testing.assert_array_equal(other, got)  # one psum: every device has the same
      # Every device's factors enter the loss with weight 1/m: the gradient of the mean.
      grad = jax.jit(jax.grad(lambda k: jnp.sum(jnp.cos(fn(k) * w)) / m))(kernel)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=ATOL)


def _flops(m: int, n: int, grad: bool) -> float:
  kernel = jax.ShapeDtypeStruct((n, n), jnp.float32)
  split = _split(m, ())
  fn = jax.grad(lambda k: jnp.sum(split(k))) if grad else split
  with jax.set_mesh(_mesh(m)):
    return jax.jit(fn).lower(kernel).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("m", [3, 8])
@pytest.mark.parametrize("grad", [False, True])
def test_split_forms_each_block_pair_of_the_gram_once(m, grad):
  """Per device, the split factors of a dense ``(n, n)`` kernel cost a share of the whole
  ``P P^T`` (``2 n^3`` FLOPs), not a replicated Gram: forward, its ``2m + 1`` of the
  ``m (2m + 1)`` block pairs on and above the diagonal (blocks of ``b = n / 2m`` rows), about
  half of its ``n / m`` rows; the backward pass adds ``4 m`` block products, ``1 / m``. Up
  to 8 % more: the elementwise work (signs, sums) on ``O(n^2 / m)`` entries."""
  n = 384
  b = n // (2 * m)
  share = ((2 * m + 1) + (4 * m if grad else 0)) * b ** 2 / n ** 2
  split = _flops(m, n, grad) / (2 * n ** 3)
  assert share <= split <= share * 1.08, (split, share)
