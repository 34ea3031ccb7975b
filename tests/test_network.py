"""AOLNetwork: its bound (the product of its steps' with the normalisation's), the
normalisation's validation, and the activation norms the statistical mode uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src import lipschitz
from aol_jax._src.blocks import Flatten
from aol_jax._src.layers import AOLDense
from support.certification import logits_and_activation_norm
from support.models import SMALL


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
