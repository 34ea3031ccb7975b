"""Splitting the AOL rescaling over a mesh axis: same values and gradients, 1/n of the work.

Runs on the 8 simulated CPU devices of ``conftest.py``. Compiler counts (FLOPs from
``cost_analysis()``) stand in for timings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from aol_jax import training
from aol_jax._src import rescaling
from aol_jax._src.losses import offset_cross_entropy
from aol_jax import aol_convnet
from aol_jax._src.sharding import sharded_rescaling

# Factors of float32 Gram rows summed in different blocks: a few ulp, far below any slip.
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def mesh():
  return training.make_data_mesh(8)


# (kernel shape, feature_group_count or None for dense): input features 12 and 5 are not
# multiples of 8 (zero-padded blocks), 3 of them fewer than the devices.
CASES = [((3, 3, 16, 10), 1), ((3, 3, 5, 7), 1), ((2, 3), None), ((20, 9), None),
         ((3, 6, 8), 2), ((1, 1, 48, 16), 1), ((2, 2, 2, 3, 4), 1)]


def _rescale(g):
  if g is None:
    return lambda k, **kw: rescaling.rescale_dense(k, **kw)
  return lambda k, **kw: rescaling.rescale_conv(k, feature_group_count=g, **kw)


def _loss_and_grad(fn, weights):
  return jax.jit(jax.value_and_grad(lambda k: jnp.sum(jnp.sin(fn(k) * weights))))


@pytest.mark.parametrize("shape,g", CASES)
def test_split_rescaling_matches_the_unsplit(mesh, shape, g):
  """Values and gradients with ``mesh=`` (global arrays) and with ``axis_name=`` inside a
  user's ``shard_map`` equal the unsplit rescaling's."""
  rng = np.random.default_rng(sum(shape))
  kernel = jnp.asarray(rng.normal(size=shape), jnp.float32)
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  rescale = _rescale(g)
  want_loss, want_grad = _loss_and_grad(rescale, weights)(kernel)
  want_value = rescale(kernel)

  def loss_in_shard_map(k):
    # Each device holds the whole rescaled kernel; 1/8 of the loss each, summed.
    local = lambda k: jax.lax.psum(jnp.sum(jnp.sin(rescale(k, axis_name="data") * weights)) / 8,
                                   "data")
    return jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P())(k)

  with jax.set_mesh(mesh):
    replicated = jax.device_put(kernel, NamedSharding(mesh, P()))
    split = lambda k: rescale(k, mesh=mesh)
    np.testing.assert_allclose(jax.jit(split)(replicated), want_value, rtol=RTOL, atol=ATOL)
    for loss_fn in (lambda k: jnp.sum(jnp.sin(split(k) * weights)), loss_in_shard_map):
      loss, grad = jax.jit(jax.value_and_grad(loss_fn))(replicated)
      np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
      np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=ATOL)


def test_split_does_a_share_of_the_gram_work(mesh):
  """The split gradient of one 3x3 192-channel kernel costs ~1/8 of the unsplit's FLOPs."""
  kernel = jnp.zeros((3, 3, 192, 192), jnp.float32)
  flops = {}
  with jax.set_mesh(mesh):
    replicated = jax.device_put(kernel, NamedSharding(mesh, P()))
    for name, m in (("whole", None), ("split", mesh)):
      f = jax.grad(lambda k: jnp.sum(rescaling.rescale_conv(k, mesh=m) ** 2))
      flops[name] = jax.jit(f).lower(replicated).compile().cost_analysis()["flops"]
  assert flops["split"] <= flops["whole"] / 8 * 1.1, flops


def test_custom_derivative_matches_autodiff_of_the_reference():
  """The hand-written backward of the factors equals autodiff of the reference formulas
  (self-convolution Gram for conv, the ``q``-path's autodiff for dense)."""
  rng = np.random.default_rng(0)
  conv = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
  dense = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  pairs = [
      (lambda k: rescaling.conv_factors(k), lambda k: rescaling.conv_factors(k, method="conv"),
       conv),
      (lambda k: rescaling.conv_factors(k), lambda k: rescaling.conv_factors(k, q=jnp.ones(6)),
       conv),
      (lambda k: rescaling.dense_factors(k), lambda k: rescaling.dense_factors(k, q=jnp.ones(7)),
       dense),
  ]
  for fast, reference, kernel in pairs:
    w = jnp.asarray(rng.normal(size=fast(kernel).shape), jnp.float32)
    got = jax.jit(jax.grad(lambda k: jnp.sum(jnp.cos(fast(k) * w))))(kernel)
    want = jax.jit(jax.grad(lambda k: jnp.sum(jnp.cos(reference(k) * w))))(kernel)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def test_wrong_axis_is_a_clear_error(mesh):
  with pytest.raises(ValueError, match="'batch' is not an axis of the mesh"):
    rescaling.rescale_dense(jnp.ones((4, 4)), mesh=mesh, axis_name="batch")
  with pytest.raises(ValueError, match="'batch' is not an axis of the mesh"):
    with sharded_rescaling(mesh, "batch"):
      pass


def tiny_model():
  return aol_convnet(10, width=4, channels=12, conv_depth=1, dense_depth=2, pool=2,
                     image_size=8, rngs=nnx.Rngs(0))


def test_layers_split_under_the_context_in_a_users_jit(mesh):
  """A user's own jit (no jax.set_mesh) entering sharded_rescaling: same logits and
  gradients as without, and the compiled program sums the factors' row sums over the
  devices (it did split)."""
  graphdef, params = nnx.split(tiny_model())
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(16, 8, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)

  def make(shard):
    def loss_fn(params, x, y):
      with sharded_rescaling(mesh if shard else None):
        logits = nnx.merge(graphdef, params)(x)
      return offset_cross_entropy(logits, y), logits
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

  (loss, logits), grads = make(True)(params, x, y)
  (want_loss, want_logits), want_grads = make(False)(params, x, y)
  np.testing.assert_allclose(logits, want_logits, rtol=RTOL, atol=1e-6)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-6)
  assert "all-reduce" in make(True).lower(params, x, y).compile().as_text()
  assert "all-reduce" not in make(False).lower(params, x, y).compile().as_text()
  with pytest.raises(ValueError, match="batch of 12.*multiple of 8"):
    make(True)(params, x[:12], y[:12])


def _train_flops(num_devices: int) -> float:
  mesh = training.make_data_mesh(num_devices)
  optimizer = training.make_optimizer(training.paper_schedule(0.1, 2, 2))
  # Rescaling-heavy on purpose (batch 16): unsplit, the rescaling alone would keep the
  # per-device FLOPs of 8 devices near those of 4.
  model = aol_convnet(10, width=8, channels=32, conv_depth=2, dense_depth=2, pool=2,
                      image_size=16, rngs=nnx.Rngs(0))
  graphdef, state = training.create_train_state(model, optimizer, key=0, mesh=mesh)
  step = training.make_train_step(graphdef, optimizer, mesh)
  images = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.uint8, sharding=training.data_sharding(mesh))
  labels = jax.ShapeDtypeStruct((16,), jnp.int32, sharding=training.data_sharding(mesh))
  with jax.set_mesh(mesh):
    compiled = step.jitted.trace(state, images, labels).lower().compile()
  return float(compiled.cost_analysis()["flops"])


def test_train_step_flops_per_device_scale_with_devices():
  """Compiler-counted per-device FLOPs of make_train_step: 8 devices do <= 0.6x of what
  4 devices do, at the same global batch."""
  four, eight = _train_flops(4), _train_flops(8)
  assert eight <= 0.6 * four, (eight, four)
