"""What a step states: refusals by path, the product of the stated constants, user layers, and
the modules whose computation no inherited statement covers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src.certification import protocol
from aol_jax.certification import ExactMap, UndeclaredBoundError


def test_certify_dataset_refuses_a_plain_linear_layer():
  """The issue-11 reproduction: a plain nnx.Linear behind Flatten once certified 99 % at L = 1."""
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(200, 8, 8, 1)).astype(np.float32)
  net = aol_jax.AOLNetwork([aol_jax.Flatten(), nnx.Linear(
      64, 10, kernel_init=nnx.initializers.normal(10.0), rngs=nnx.Rngs(0))])
  y = np.asarray(jnp.argmax(net(jnp.asarray(x)), axis=-1))
  with pytest.raises(UndeclaredBoundError) as info:
    aol_jax.certify_dataset(net, x, y, batch_size=50)
  message = str(info.value)
  assert "Linear at path ('layers', 1)" in message and "model.layers[1]" in message
  assert "aol_jax.AOLDense" in message and "lipschitz_bound()" in message
  with pytest.raises(UndeclaredBoundError):
    net.lipschitz_bound()


class _Halve(ExactMap, nnx.Module):
  """A user's exact map: y = x / 2, exact in binary floating point."""
  lipschitz = 0.5

  def __call__(self, x):
    return x / 2


def test_the_bound_is_the_product_of_what_the_steps_state():
  rngs = nnx.Rngs(0)
  dense = aol_jax.AOLDense(64, 10, rngs=rngs)
  net = aol_jax.AOLNetwork([aol_jax.Flatten(), _Halve(), jax.nn.relu, dense, _Halve()],
                           input_std=(0.25,))
  lip = dense.lipschitz_bound()  # the rigorous bound on the kernel the layer applies
  assert 0.5 < lip <= 1.0 + 1e-6
  assert net.lipschitz_bound() == pytest.approx(4.0 * 0.5 * lip * 0.5, rel=1e-14)
  assert net.lipschitz_bound() >= 4.0 * 0.5 * lip * 0.5
  steps = [path for path, _ in aol_jax.certification.flatten(net)]
  assert steps == [("normalisation",)] + [("layers", i) for i in range(5)]
  # Statistical terms come from the steps: the dense layer's fan-in, the normalisation's 2,
  # each forward term times max(1, L of the steps after it); P: the normalised input is 4
  # times the input; K: only the normalisation amplifies.
  terms = net.statistical_terms()
  assert terms.forward == pytest.approx(math.sqrt(65) + 2.0)
  assert terms.rescale == pytest.approx(math.sqrt(10 + 64))
  assert terms.prefix == pytest.approx(4.0) and terms.amplification == pytest.approx(4.0)
  # A nested network reports the full path of the offending layer.
  inner = aol_jax.AOLNetwork([aol_jax.Flatten(), nnx.Conv(1, 2, (3, 3), rngs=rngs)])
  outer = aol_jax.AOLNetwork([_Halve(), inner])
  with pytest.raises(UndeclaredBoundError, match=r"Conv at path \('layers', 1, "
                     r"'layers', 1\) \(model.layers\[1\].layers\[1\]\)"):
    outer.lipschitz_bound()
  for unknown in (nnx.LayerNorm(4, rngs=rngs), jnp.tanh):
    with pytest.raises(UndeclaredBoundError, match="states no lipschitz_bound"):
      aol_jax.AOLNetwork([unknown]).lipschitz_bound()


def test_a_registered_function_is_accepted_and_a_stating_class_cannot_be_registered():
  aol_jax.certification.register_exact_map(jnp.negative, 1.0)
  try:
    assert aol_jax.AOLNetwork([jnp.negative, _Halve()]).lipschitz_bound() == 0.5
  finally:
    protocol.unregister_exact_map(jnp.negative)
  # Registering MaxMin at 0.5 would have overridden its own L = 1 (registrations were
  # looked up first): a class that states its bound cannot be registered.
  for cls in (aol_jax.MaxMin, aol_jax.AOLDense, _Halve):
    with pytest.raises(ValueError, match="states its own bound"):
      aol_jax.certification.register_exact_map(cls, 0.5)
  assert all(k is not aol_jax.MaxMin for k, _ in protocol._EXACT_MAPS)
  assert all(k is not jnp.negative for k, _ in protocol._EXACT_MAPS)


class _ScaledMaxMin(aol_jax.MaxMin):
  """A block subclass whose forward pass is no longer the block's."""

  def __call__(self, x):
    return 3.0 * super().__call__(x)


class _SortedDifferently(aol_jax.MaxMin):
  def _sort_groups(self, x):
    return 3.0 * x


class _DoubledDense(aol_jax.AOLDense):
  def __call__(self, x):
    return 2.0 * super().__call__(x)


class _OwnBound(aol_jax.AOLDense):
  """Overrides the forward pass and states its own bounds for it: the author's claim."""

  def __call__(self, x):
    return 0.5 * super().__call__(x)

  def lipschitz_bound(self):
    return 0.5 * super().lipschitz_bound()


def test_a_subclass_that_overrides_the_forward_pass_keeps_no_inherited_bound():
  """Issue 22, hole 3: a subclass of AOLDense or of a block overriding __call__ kept the
  inherited bound (L 1 where the map is 2- or 3-Lipschitz)."""
  for layer, name in ((_ScaledMaxMin(), "__call__"), (_SortedDifferently(), "_sort_groups")):
    with pytest.raises(UndeclaredBoundError, match=f"overrides {name}"):
      aol_jax.AOLNetwork([layer]).lipschitz_bound()
  dense = _DoubledDense(4, 4, rngs=nnx.Rngs(0))
  with pytest.raises(UndeclaredBoundError, match="overrides __call__"):
    aol_jax.AOLNetwork([dense]).lipschitz_bound()
  x = np.random.default_rng(0).uniform(size=(4, 2, 2, 1)).astype(np.float32)
  net = aol_jax.AOLNetwork([aol_jax.Flatten(), _DoubledDense(4, 4, rngs=nnx.Rngs(0))])
  with pytest.raises(UndeclaredBoundError, match="overrides __call__"):
    aol_jax.certify_dataset(net, x, np.zeros(4, np.int32), batch_size=4)
  # Restating the bound makes it the subclass's own statement, which is accepted.
  own = _OwnBound(4, 4, rngs=nnx.Rngs(0))
  assert aol_jax.AOLNetwork([own]).lipschitz_bound() == pytest.approx(
      0.5 * aol_jax.AOLDense(4, 4, rngs=nnx.Rngs(0)).lipschitz_bound())


def test_an_instance_attribute_that_replaces_a_method_is_refused():
  dense = aol_jax.AOLDense(4, 4, rngs=nnx.Rngs(0))
  dense.applied_kernel = lambda **_: jnp.zeros((4, 4))
  with pytest.raises(UndeclaredBoundError, match="instance attribute 'applied_kernel'"):
    aol_jax.AOLNetwork([dense]).lipschitz_bound()


def test_an_exact_map_with_a_parameter_or_an_instance_constant_is_refused():
  block = aol_jax.MaxMin()
  block.scale = nnx.Param(jnp.ones(()))
  with pytest.raises(UndeclaredBoundError, match="holds"):
    aol_jax.AOLNetwork([block]).lipschitz_bound()
  half = _Halve()
  half.lipschitz = 0.01  # the instance claims less than its class
  with pytest.raises(UndeclaredBoundError, match="lipschitz on the instance"):
    aol_jax.AOLNetwork([half]).lipschitz_bound()


def test_a_network_subclass_that_overrides_call_or_holds_a_head_is_refused():
  class Doubled(aol_jax.AOLNetwork):
    def __call__(self, x):
      return 2 * super().__call__(x)

  with pytest.raises(UndeclaredBoundError, match="overrides __call__"):
    Doubled([aol_jax.Flatten()]).lipschitz_bound()
  net = aol_jax.AOLNetwork([aol_jax.Flatten()])
  net.head = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  with pytest.raises(UndeclaredBoundError, match=r"\('head',\)"):
    net.lipschitz_bound()


def test_a_stated_bound_that_is_not_a_finite_non_negative_number_is_refused():
  class Bad(nnx.Module):
    def __init__(self, value):
      self.value = value

    def lipschitz_bound(self):
      return self.value

    def __call__(self, x):
      return x

  for value in (-1.0, float("nan"), float("inf"), "1", True):
    with pytest.raises(ValueError, match="finite number >= 0"):
      aol_jax.AOLNetwork([Bad(value)]).lipschitz_bound()
  assert aol_jax.AOLNetwork([Bad(np.float32(0.5))]).lipschitz_bound() >= 0.5
