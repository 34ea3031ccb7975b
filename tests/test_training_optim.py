"""aol_jax.training.optim: the paper's schedule, SGD-Nesterov, and kernel-only weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aol_jax import training
from aol_jax._src.layers import AOLConv, AOLDense
from aol_jax import aol_convnet


def tiny_params():
  model = aol_convnet(10, width=4, channels=8, conv_depth=1, dense_depth=2, pool=4,
                      image_size=8, rngs=nnx.Rngs(0))
  return nnx.split(model, nnx.Param, ...)[1]


def test_schedule_drops_at_the_papers_epochs():
  schedule = jax.jit(training.paper_schedule(1e-3, steps_per_epoch=200, epochs=1000))
  epoch_lr = lambda e: float(schedule(e * 200))
  assert epoch_lr(0) == epoch_lr(899) == pytest.approx(1e-3, rel=1e-6)
  assert float(schedule(900 * 200 - 1)) == pytest.approx(1e-3, rel=1e-6)
  assert epoch_lr(900) == epoch_lr(989) == pytest.approx(1e-4, rel=1e-6)
  assert epoch_lr(990) == epoch_lr(998) == pytest.approx(1e-5, rel=1e-6)
  assert epoch_lr(999) == float(schedule(1000 * 200 - 1)) == pytest.approx(1e-6, rel=1e-6)


def test_schedule_scales_with_the_run_length():
  schedule = training.paper_schedule(1.0, steps_per_epoch=10, epochs=10)  # 100 steps
  lrs = np.array([float(schedule(s)) for s in range(100)])
  # 90% -> step 90, 99% -> step 99, 99.9% -> step 99 (floor of 99.9): two drops coincide.
  np.testing.assert_allclose(lrs[:90], 1.0)
  np.testing.assert_allclose(lrs[90:99], 0.1, rtol=1e-6)
  np.testing.assert_allclose(lrs[99], 1e-3, rtol=1e-5)
  with pytest.raises(ValueError, match="epochs"):
    training.paper_schedule(1.0, 10, 0)


def test_mask_selects_exactly_the_kernels():
  params = tiny_params()
  mask = training.weight_decay_mask(params)
  entries = {jax.tree_util.keystr(path): value
             for path, value in jax.tree_util.tree_leaves_with_path(mask)}
  assert entries, "no parameters"
  kernels = {k for k in entries if "'kernel'" in k}
  biases = {k for k in entries if "'bias'" in k}
  assert kernels and biases and kernels | biases == set(entries)
  assert all(entries[k] is True for k in kernels)
  assert all(entries[k] is False for k in biases)
  # Same tree structure as the parameters, so optax.masked can zip them.
  assert jax.tree.structure(mask) == jax.tree.structure(params)


def decay_reference(params, grads, weight_decay):
  """grad(loss + weight_decay * sum over kernels of P^2), taken by autodiff."""
  def penalty(p):
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(p):
      if "'kernel'" in jax.tree_util.keystr(path):
        total = total + jnp.sum(leaf ** 2)
    return weight_decay * total
  return jax.tree.map(lambda g, d: g + d, grads, jax.grad(penalty)(params))


def test_decay_is_the_gradient_of_the_l2_penalty_on_kernels_only():
  params = tiny_params()
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) * 0.1, params)
  lr, momentum, wd = 0.05, 0.9, 5e-4
  optimizer = training.make_optimizer(lr, momentum=momentum, weight_decay=wd)
  state = optimizer.init(params)
  # Two steps of SGD-Nesterov written out: t = g + m t_prev; update = -lr (g + m t).
  trace = jax.tree.map(jnp.zeros_like, params)
  current = params
  for _ in range(2):
    updates, state = optimizer.update(grads, state, current)
    total = decay_reference(current, grads, wd)
    trace = jax.tree.map(lambda g, t: g + momentum * t, total, trace)
    expected = jax.tree.map(lambda g, t: -lr * (g + momentum * t), total, trace)
    for (path, u), e in zip(jax.tree_util.tree_leaves_with_path(updates),
                            jax.tree.leaves(expected)):
      np.testing.assert_allclose(u, e, rtol=1e-6, atol=1e-9, err_msg=jax.tree_util.keystr(path))
    current = jax.tree.map(lambda p, u: p + u, current, updates)


def test_biases_are_not_decayed_and_kernels_are():
  params = tiny_params()
  params = jax.tree.map(lambda p: p + 1.0, params)  # biases start at 0: make them non-zero
  zero = jax.tree.map(jnp.zeros_like, params)
  optimizer = training.make_optimizer(1.0, momentum=0.0, weight_decay=0.25)
  updates, _ = optimizer.update(zero, optimizer.init(params), params)
  for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)):
    name = jax.tree_util.keystr(path)
    if "'bias'" in name:
      np.testing.assert_array_equal(u, 0.0, err_msg=name)
    else:
      np.testing.assert_allclose(u, -0.5 * p, rtol=1e-6, err_msg=name)  # -lr * 2 * wd * P


def test_frozen_kernels_are_not_parameters():
  """After aol_jax.freeze the kernel is a RescaledKernel, not an nnx.Param: not optimised."""
  from aol_jax import freeze
  model = nnx.Sequential(AOLConv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
                         AOLDense(4, 4, rngs=nnx.Rngs(1)))
  frozen = freeze(model)
  params = nnx.split(frozen, nnx.Param, ...)[1]
  mask = training.weight_decay_mask(params)
  assert not any(jax.tree.leaves(mask))
