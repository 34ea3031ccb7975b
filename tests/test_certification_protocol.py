"""What a layer states: refusals by path, the product of the stated constants, user layers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src.certification import protocol
from aol_jax._src.certification.dataset import certify_dataset
from aol_jax._src.layers import AOLDense

def test_certify_dataset_refuses_a_plain_linear_layer():
  """The issue's reproduction: a plain nnx.Linear behind Flatten once certified 99 % at L = 1."""
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(200, 8, 8, 1)).astype(np.float32)
  net = aol_jax.AOLNetwork([aol_jax.Flatten(), nnx.Linear(
      64, 10, kernel_init=nnx.initializers.normal(10.0), rngs=nnx.Rngs(0))])
  y = np.asarray(jnp.argmax(net(jnp.asarray(x)), axis=-1))
  with pytest.raises(aol_jax.certification.UndeclaredBoundError) as info:
    certify_dataset(net, x, y, batch_size=50)
  message = str(info.value)
  assert "Linear at path ('layers', 1)" in message and "model.layers[1]" in message
  assert "aol_jax.AOLDense" in message and "lipschitz_bound()" in message
  with pytest.raises(aol_jax.certification.UndeclaredBoundError):
    net.lipschitz_bound()


class _Halve(nnx.Module):
  """A user's layer that states its own bounds: y = x / 2, exact in binary floating point."""

  def lipschitz_bound(self) -> float:
    return 0.5

  def rounding_terms(self) -> aol_jax.certification.RoundingTerms:
    return aol_jax.certification.RoundingTerms.exact(0.5)

  def worst_case_terms(self, input_shape) -> aol_jax.certification.WorstCaseTerms:
    return aol_jax.certification.WorstCaseTerms.exact(0.5)

  def __call__(self, x):
    return x / 2


def test_the_bound_is_the_product_of_what_the_layers_state():
  rngs = nnx.Rngs(0)
  dense = AOLDense(64, 10, rngs=rngs)
  net = aol_jax.AOLNetwork([aol_jax.Flatten(), _Halve(), jax.nn.relu, dense, _Halve()],
                          input_std=(0.25,))
  lip = dense.lipschitz_bound()  # the rigorous bound on the kernel the layer applies
  assert 0.5 < lip <= 1.0 + 1e-6
  assert net.lipschitz_bound() == 4.0 * 0.5 * lip * 0.5
  # Rounding terms come from the layers: the dense layer's fan-in, the normalisation's 2,
  # each forward term times max(1, L of the layers after it).
  # P: the normalised input is 4 times the input; K: only the normalisation amplifies.
  assert net.rounding_terms() == aol_jax.certification.RoundingTerms(
      lipschitz=lip, forward=math.sqrt(65) + 2.0, rescale=math.sqrt(10 + 64), prefix=4.0,
      amplification=4.0)
  # A nested network reports the full path of the offending layer.
  inner = aol_jax.AOLNetwork([aol_jax.Flatten(), nnx.Conv(1, 2, (3, 3), rngs=rngs)])
  outer = aol_jax.AOLNetwork([_Halve(), inner])
  with pytest.raises(aol_jax.certification.UndeclaredBoundError, match=r"Conv at path \('layers', 1, "
                     r"'layers', 1\) \(model.layers\[1\].layers\[1\]\)"):
    outer.lipschitz_bound()
  for unknown in (nnx.LayerNorm(4, rngs=rngs), jnp.tanh):
    with pytest.raises(aol_jax.certification.UndeclaredBoundError, match="states no lipschitz_bound"):
      aol_jax.AOLNetwork([unknown]).lipschitz_bound()
  # A declared function is accepted.
  aol_jax.certification.register_exact_map(jnp.negative, 1.0)
  try:
    assert aol_jax.AOLNetwork([jnp.negative, _Halve()]).lipschitz_bound() == 0.5
  finally:
    del protocol._EXACT_MAPS[jnp.negative]
