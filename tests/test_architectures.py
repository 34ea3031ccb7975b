"""The paper's networks: sizes, layer structure, shapes; every family 1-Lipschitz."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src import lipschitz
from aol_jax._src.blocks import ConcatenationPooling, FirstChannels
from aol_jax._src.layers import AOLConv, AOLDense
from support.models import SMALL, build_small, digits, train


def _num_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _table2_count(w: int, num_classes: int = 10) -> int:
  """Parameters of Table 2 counted by hand: kernels plus biases."""
  conv = lambda cin, cout, k: k * k * cin * cout + cout
  features = 64 * w
  return (conv(48, 192, 1) + 12 * conv(192, 192, 3) + conv(192, 192, 1)
          + 14 * (features * features + features))


@pytest.mark.parametrize("name,w,paper_millions", [
    ("aol_small", 16, 18.7), ("aol_medium", 32, 62.8), ("aol_large", 48, 136.2)])
def test_parameter_counts_match_table2(name, w, paper_millions):
  abstract = nnx.eval_shape(lambda: aol_jax.MODELS[name](10, rngs=nnx.Rngs(0)))
  n = _num_params(abstract)
  assert n == _table2_count(w)
  assert n / 1e6 == pytest.approx(paper_millions, abs=0.05)  # the paper rounds to 0.1M


@pytest.mark.parametrize("name,millions", [("aol_fc", 12.6), ("aol_std", 5.8)])
def test_ablation_family_sizes_match_their_docstrings(name, millions):
  abstract = nnx.eval_shape(lambda: aol_jax.MODELS[name](10, rngs=nnx.Rngs(0)))
  assert _num_params(abstract) / 1e6 == pytest.approx(millions, abs=0.05)


def test_aol_small_layer_structure():
  model = nnx.eval_shape(lambda: aol_jax.aol_small(10, rngs=nnx.Rngs(0)))
  layers = list(model.layers)
  assert isinstance(layers[0], ConcatenationPooling) and layers[0].window == (4, 4)
  convs = [l for l in layers if isinstance(l, AOLConv)]
  dense = [l for l in layers if isinstance(l, AOLDense)]
  assert [(c.in_features, c.out_features, c.kernel_size) for c in convs] == (
      [(48, 192, (1, 1))] + [(192, 192, (3, 3))] * 12 + [(192, 192, (1, 1))])
  assert [(d.in_features, d.out_features) for d in dense] == [(1024, 1024)] * 14
  assert all(c.padding == "SAME" for c in convs[1:13])
  # MaxMin after the first 13 convs and between the dense layers, none after the last ones.
  kinds = [type(l).__name__ for l in layers]
  assert kinds.count("MaxMin") == 13 + 13
  i = kinds.index("FirstChannels")
  assert kinds[i - 1] == "AOLConv" and kinds[i + 1] == "Flatten"
  assert layers[i].n == 16 and isinstance(layers[-1], FirstChannels) and layers[-1].n == 10
  assert kinds[-2] == "AOLDense"


def test_table2_init_is_identity_where_size_is_preserved():
  model = aol_jax.aol_small(10, rngs=nnx.Rngs(0), channels=16, conv_depth=2, dense_depth=3,
                           width=4, image_size=8)
  convs = [l for l in model.layers if isinstance(l, AOLConv)]
  first = np.asarray(convs[0].kernel[...]).reshape(48, 16)
  np.testing.assert_allclose(first.T @ first, np.eye(16), atol=1e-5)  # orthonormal columns
  for conv in convs[1:]:
    k = np.asarray(conv.kernel[...])
    centre = tuple((s - 1) // 2 for s in k.shape[:2])
    np.testing.assert_array_equal(k[centre], np.eye(16))
    assert np.count_nonzero(k) == 16


@pytest.mark.parametrize("name", sorted(aol_jax.MODELS))
@pytest.mark.parametrize("image_size", [8, 16])
def test_every_family_builds_for_greyscale_digits(name, image_size):
  assert set(SMALL) == set(aol_jax.MODELS)
  model = aol_jax.MODELS[name](10, rngs=nnx.Rngs(0), image_size=image_size, in_channels=1,
                              **SMALL[name])
  # The parameters as arguments: closed over, they are constants, and XLA constant-folds the
  # rescaling at compile time (98 s for aol_large at 16x16).
  graphdef, state = nnx.split(model)
  for batch in (1, 3):
    x = jax.random.uniform(jax.random.key(batch), (batch, image_size, image_size, 1))
    logits = _apply(graphdef, state, x)
    assert logits.shape == (batch, 10) and bool(jnp.all(jnp.isfinite(logits)))
  assert model.lipschitz_bound() <= 1.0 + 1e-5  # the bound on the kernels it applies


def test_wrong_input_shape_raises():
  model = aol_jax.aol_fc(10, rngs=nnx.Rngs(0), width=16, depth=2, image_size=8, in_channels=1)
  with pytest.raises(ValueError):
    model(jnp.zeros((2, 16, 16, 1)))
  with pytest.raises(ValueError, match="divisible"):
    aol_jax.aol_std(10, rngs=nnx.Rngs(0), image_size=12, num_stages=3)


# Whole networks are 1-Lipschitz: Jacobian norms by power iteration, and input pairs.
#
# Every family is built at a small width on 8x8 greyscale digits, and checked at the paper's
# initialisation and with weights trained on scikit-learn's digits, at digits and at uniform
# random inputs. Tolerance 1e-4 relative:
# the bound is exact in real arithmetic, and the float32 rescaling and Jacobian products
# round at about ``u * sum_k sqrt(n_k)`` (``u = 2^-24``), well under 1e-5 at these sizes.

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
