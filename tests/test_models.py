"""The paper's networks: sizes, layer structure, shapes, and the normalisation constant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from support.certification import logits_and_activation_norm
from aol_jax._src import lipschitz
from aol_jax._src.blocks import ConcatenationPooling, FirstChannels, Flatten, MaxMin
from aol_jax._src.layers import AOLConv, AOLDense
from support.models import SMALL


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
  for batch in (1, 3):
    x = jax.random.uniform(jax.random.key(batch), (batch, image_size, image_size, 1))
    logits = jax.jit(lambda x: model(x))(x)
    assert logits.shape == (batch, 10) and bool(jnp.all(jnp.isfinite(logits)))
  assert model.lipschitz_bound() <= 1.0 + 1e-5  # the bound on the kernels it applies


def test_wrong_input_shape_raises():
  model = aol_jax.aol_fc(10, rngs=nnx.Rngs(0), width=16, depth=2, image_size=8, in_channels=1)
  with pytest.raises(ValueError):
    model(jnp.zeros((2, 16, 16, 1)))
  with pytest.raises(ValueError, match="divisible"):
    aol_jax.aol_std(10, rngs=nnx.Rngs(0), image_size=12, num_stages=3)


def test_activation_norm_is_the_largest_intermediate_norm():
  model = aol_jax.aol_std(10, rngs=nnx.Rngs(0), image_size=8, in_channels=1, input_mean=(0.5,),
                         input_std=(0.3,), **SMALL["aol_std"])
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))

  @jax.jit
  def run(x):
    logits, act = logits_and_activation_norm(model, x)
    h = (x - 0.5) / 0.3
    norms = [jnp.linalg.norm(x.reshape(4, -1), axis=-1),
             jnp.linalg.norm(h.reshape(4, -1), axis=-1)]
    for layer in model.layers:
      h = layer(h)
      norms.append(jnp.linalg.norm(h.reshape(4, -1), axis=-1))
    return logits, act, model(x), jnp.max(jnp.stack(norms), axis=0)

  logits, act, plain_logits, want = run(x)
  np.testing.assert_array_equal(logits, plain_logits)
  np.testing.assert_allclose(act, want, rtol=1e-6)


def test_lipschitz_bound_includes_input_normalisation():
  std = (0.2, 0.25, 0.5)
  model = aol_jax.aol_fc(10, rngs=nnx.Rngs(0), width=64, depth=2, image_size=4,
                        input_mean=(0.4, 0.5, 0.6), input_std=std)
  assert 5.0 * (1 - 1e-3) <= model.lipschitz_bound() <= 5.0 * (1 + 1e-5)
  # The normalisation really scales the map: the first layer at init has orthonormal rows
  # (48 -> 64), so the network's Jacobian norm exceeds 1 and is at most max(1/std).
  x = jax.random.uniform(jax.random.key(0), (1, 4, 4, 3))
  norm = float(jax.jit(lambda x: lipschitz.power_iteration(lambda z: model(z), x, 100))(x))
  assert 1.5 < norm <= 5.0 * (1 + 1e-4)
  with pytest.raises(ValueError, match="positive"):
    aol_jax.aol_fc(10, rngs=nnx.Rngs(0), width=16, depth=1, image_size=4,
                  input_std=(0.2, 0.0, 0.3))


@pytest.mark.parametrize("kwargs,match", [
    ({"input_std": (float("nan"),)}, "input_std"), ({"input_std": (0.5, float("inf"))}, "input_std"),
    ({"input_std": -1.0}, "input_std"), ({"input_std": ()}, "input_std"),
    ({"input_std": "abc"}, "input_std"), ({"input_mean": (float("nan"),)}, "input_mean"),
])
def test_bad_normalisation_values_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    aol_jax.AOLNetwork([Flatten()], **kwargs)


def test_a_scalar_normalisation_applies_to_every_channel():
  model = aol_jax.AOLNetwork([Flatten()], input_mean=0.5, input_std=0.25)
  assert model.input_std == (0.25,) and model.lipschitz_bound() == 4.0
  x = jnp.full((1, 2, 2, 3), 0.75)
  np.testing.assert_array_equal(np.asarray(model(x)), np.ones((1, 12)))


def test_a_normalisation_for_other_channels_is_refused_not_broadcast():
  model = aol_jax.AOLNetwork([Flatten()], input_mean=(0.5, 0.5, 0.5), input_std=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="input_mean has 3 channels but the input has 1"):
    model(jnp.zeros((1, 2, 2, 1)))
  with pytest.raises(ValueError, match="input_std has 3 channels but the input has 2"):
    aol_jax.certify_dataset(aol_jax.AOLNetwork([Flatten()], input_std=(1.0, 1.0, 1.0)),
                            np.zeros((1, 2, 2, 2), np.float32), [0], batch_size=1)


def test_activation_norm_includes_nested_networks():
  """A nested network's inner activations count towards M: here the inner layer's output
  (norm 8 at the zero image, from its bias) is larger than anything the outer one sees."""
  dense = AOLDense(4, 4, rngs=nnx.Rngs(0))
  dense.bias[...] = jnp.array([4.0, 4.0, 4.0, 4.0])
  cancel = AOLDense(4, 4, rngs=nnx.Rngs(1))
  cancel.bias[...] = -4.0 * jnp.sum(cancel.rescale(cancel.kernel[...]), axis=0)
  inner = aol_jax.AOLNetwork([dense, cancel])
  outer = aol_jax.AOLNetwork([Flatten(), inner])
  logits, act = logits_and_activation_norm(outer, jnp.zeros((1, 2, 2, 1)))
  assert float(jnp.linalg.norm(logits)) < 1e-5
  assert float(act[0]) == pytest.approx(8.0)
