"""Whole networks are 1-Lipschitz: Jacobian norms by power iteration, and input pairs.

Every family is built at a small width on 8x8 greyscale digits, and checked at the paper's
initialisation and with weights trained on scikit-learn's digits, at digits and at uniform
random inputs. Tolerance 1e-4 relative:
the bound is exact in real arithmetic, and the float32 rescaling and Jacobian products
round at about ``u * sum_k sqrt(n_k)`` (``u = 2^-24``), well under 1e-5 at these sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src import lipschitz
from support.models import SMALL, build_small, digits, train

TOL = 1e-4

@jax.jit(static_argnums=0)
def _power_norms(graphdef, state, xs):
  f = lambda z: nnx.merge(graphdef, state)(z[None])[0]
  keys = jax.random.split(jax.random.key(1), xs.shape[0])
  return jax.vmap(lambda x, k: lipschitz.power_iteration(f, x, 60, key=k))(xs, keys)


@jax.jit(static_argnums=0)
def _apply(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def _jacobian_norms(model: nnx.Module, xs: jax.Array) -> np.ndarray:
  """Power iteration on the Jacobian of the single-example map at each input, jit-compiled."""
  return np.asarray(_power_norms(*nnx.split(model), xs))


def _inputs(n: int) -> jax.Array:
  x, _ = digits()
  noise = jax.random.uniform(jax.random.key(3), (n // 2, 8, 8, 1))
  return jnp.concatenate([jnp.asarray(x[:n - n // 2]), noise])


def _check_pairs(model: nnx.Module, lip: float) -> float:
  """``||f(x) - f(y)|| <= L ||x - y||`` on random pairs near and far; returns the max ratio."""
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  x = jax.random.uniform(k1, (256, 8, 8, 1))
  far = jax.random.uniform(k2, (128, 8, 8, 1))
  near = x[128:] + 1e-2 * jax.random.normal(k3, (128, 8, 8, 1))
  y = jnp.concatenate([far, near])
  graphdef, state = nnx.split(model)
  f = lambda z: _apply(graphdef, state, z)
  num = jnp.linalg.norm(f(x) - f(y), axis=-1)
  den = jnp.linalg.norm((x - y).reshape(256, -1), axis=-1)
  ratio = np.asarray(num / den)
  assert np.all(ratio <= lip * (1 + TOL)), ratio.max()
  return float(ratio.max())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_family_is_one_lipschitz_random_and_trained(name):
  xs = _inputs(8)
  model = build_small(name)  # the paper's initialisation: identity or random orthogonal
  init_norms = _jacobian_norms(model, xs)
  init_ratio = _check_pairs(model, 1.0)
  x, y = digits()
  trained = train(build_small(name), x, y, steps=100, learning_rate=1e-2, batch_size=64,
                  seed=0)
  trained_norms = _jacobian_norms(trained, xs)
  frozen_norms = _jacobian_norms(aol_jax.freeze(trained), xs)
  trained_ratio = _check_pairs(trained, 1.0)
  print(f"{name}: Jacobian norm max init {init_norms.max():.5f}, trained "
        f"{trained_norms.max():.5f}, trained+frozen {frozen_norms.max():.5f}; pair ratio max "
        f"init {init_ratio:.4f}, trained {trained_ratio:.4f}")
  for norms in (init_norms, trained_norms, frozen_norms):
    assert np.all(norms <= 1 + TOL)
  # What the check can see: these small trained networks reach 0.73-0.78 of the bound on
  # these inputs (the paper measured 0.98-0.99 on CIFAR after full training), so a network
  # whose true constant overshoots 1 by more than about 30 % fails the check above. Smaller
  # per-layer overshoots are caught by test_layers' exact (SVD) norms. (At init some
  # families are far below 1: their orthonormal-column layers project dimensions away.)
  assert trained_norms.max() > 0.7


def test_normalising_network_is_bounded_by_max_inverse_std():
  model = build_small("aol_fc", input_mean=(0.5,), input_std=(0.25,))
  lip = model.lipschitz_bound()
  assert lip <= 4.0 * (1 + 1e-5)
  norms = _jacobian_norms(model, _inputs(8))
  assert np.all(norms <= lip * (1 + TOL)) and norms.max() > 1.0  # above 1: the constant matters
  _check_pairs(model, lip)
