"""The prepared certifier: what it refuses before anything runs, the decision's validity
checks, and the exact bisection of the largest certified radius."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src.certification import certifier
from aol_jax.certification import prepare


def _net(**kw) -> aol_jax.AOLNetwork:
  return aol_jax.AOLNetwork([aol_jax.Flatten(), aol_jax.AOLDense(4, 3, rngs=nnx.Rngs(0), **kw)])


def test_a_tpu_is_refused_with_the_way_to_certify_on_the_host():
  for rounding in aol_jax.ROUNDING_MODES:
    with pytest.raises(ValueError, match="platform='cpu'"):
      prepare(_net(), (2, 2, 1), rounding=rounding, platform="tpu")
  assert prepare(_net(), (2, 2, 1), platform="cpu").platform == "cpu"


def test_parameters_the_format_cannot_hold_as_they_are_are_refused():
  net = _net()
  net.layers[1].bias[...] = jnp.asarray([1e-40, 0.0, 0.0], jnp.float32)  # subnormal
  with pytest.raises(ValueError, match="subnormal"):
    prepare(net, (2, 2, 1))
  net.layers[1].bias[...] = jnp.asarray([jnp.nan, 0.0, 0.0], jnp.float32)
  with pytest.raises(ValueError, match="non-finite"):
    prepare(net, (2, 2, 1))
  with jax.enable_x64(True):
    wide = _net(param_dtype=jnp.float64)
    with pytest.raises(ValueError, match="float64 values.*wider"):
      prepare(wide, (2, 2, 1), rounding="float32")
    assert prepare(wide, (2, 2, 1), rounding="float64").lipschitz > 0


@pytest.mark.parametrize("shape", [(), (0, 2), (2, 2.5), (True, 2)])
def test_a_bad_image_shape_or_model_is_refused(shape):
  with pytest.raises(ValueError, match="image_shape"):
    prepare(_net(), shape)
  with pytest.raises(ValueError, match="nnx.Module"):
    prepare(jnp.tanh, (2, 2, 1))


@pytest.mark.parametrize("rounding", ["float32", "float32_statistical"])
def test_a_model_that_is_not_a_classifier_is_refused(rounding):
  one_logit = aol_jax.AOLNetwork([aol_jax.Flatten(), aol_jax.AOLDense(4, 1, rngs=nnx.Rngs(0))])
  with pytest.raises(ValueError, match=r"maps one image to \(1,\); a classifier"):
    prepare(one_logit, (2, 2, 1), rounding=rounding)
  unflattened = aol_jax.AOLNetwork([aol_jax.AOLConv(1, 3, (1, 1), rngs=nnx.Rngs(0))])
  with pytest.raises(ValueError, match=r"maps one image to \(2, 2, 3\)"):
    prepare(unflattened, (2, 2, 1), rounding=rounding)
  assert prepare(_net(), (2, 2, 1), rounding=rounding).num_classes == 3


def test_the_decision_needs_a_valid_radius_finite_values_and_no_overflow():
  prepared = prepare(_net(), (2, 2, 1))
  x = jnp.full((3, 2, 2, 1), 0.5, jnp.float32)
  logits, pred, bounds = jax.jit(prepared.evaluate)(prepared.state, x)
  ok = lambda b, e: np.asarray(prepared.decide(logits, pred, b, jnp.asarray(e, jnp.float32)))
  assert ok(bounds, [0.0, 0.0, 0.0]).any()  # something is certified at 0 (not vacuous)
  assert not ok(bounds, [-1e-3, jnp.nan, jnp.inf]).any()
  assert not ok(bounds._replace(finite=jnp.zeros(3, bool)), 0.0).any()
  assert not ok(bounds._replace(limit=jnp.full(3, -1.0)), 0.0).any()
  assert not ok(bounds._replace(a=jnp.full(3, -1.0)), 0.0).any()  # a negative allowance


def test_the_largest_certified_radius_is_exact_to_the_last_bit():
  threshold = jnp.asarray([0.3, 1e-30, 7.0], jnp.float32)
  decide = lambda e: e <= threshold
  largest, at_zero = certifier.largest_certified(decide, jnp.float32, threshold)
  np.testing.assert_array_equal(np.asarray(largest), np.asarray(threshold))
  assert np.all(np.asarray(at_zero))
  never = lambda e: e < 0
  largest, at_zero = certifier.largest_certified(never, jnp.float32, threshold)
  assert not np.any(np.asarray(at_zero))


@pytest.mark.parametrize("rounding", ["float32", "float64", "float32_statistical"])
def test_networks_of_one_architecture_share_a_compiled_program_each_with_its_own_constants(
    rounding):
  """A certifier is a static argument of the jitted evaluation: two networks of one
  architecture compile it once (the rigorous modes), and each is certified with its own
  ``L`` and rounding constants, bit for bit as alone (no stale constant of the first)."""
  def network(seed):
    model = aol_jax.aol_small(3, rngs=nnx.Rngs(seed), channels=8, conv_depth=1, dense_depth=2,
                              width=2, image_size=8, pool=4)
    nnx.update(model, jax.tree.map(lambda a: a * (1 + 0.2 * jnp.sin(jnp.arange(a.size))
                                                   .reshape(a.shape)) if seed else a,
                                   nnx.state(model, nnx.Param)))
    return model

  models = [network(0), network(1)]
  x = np.random.default_rng(0).uniform(size=(6, 8, 8, 3)).astype(np.float32)
  prepared = [prepare(m, x.shape[1:], rounding=rounding) for m in models]
  assert prepared[0].constants != prepared[1].constants  # not vacuous: the constants differ
  shared = prepared[0] == prepared[1] and hash(prepared[0]) == hash(prepared[1])
  assert shared == (rounding != "float32_statistical")  # statistical: constants in the key
  jax.clear_caches()
  together = [aol_jax.certified_radii(m, x, batch_size=6, rounding=rounding)[1] for m in models]
  assert certifier._radii._cache_size() == (1 if shared else 2)
  jax.clear_caches()
  alone = aol_jax.certified_radii(models[1], x, batch_size=6, rounding=rounding)[1]
  np.testing.assert_array_equal(together[1], alone)
  assert np.all(together[1] > 0) and np.any(together[0] != together[1])


class _Scale(aol_jax.certification.ExactMap, nnx.Module):
  """Multiplies by its class's ``lipschitz``, a power of two (exact): what it computes is
  read from its class, outside its graphdef and state."""
  lipschitz = 0.5

  def __call__(self, x):
    return x * type(self).lipschitz


@pytest.mark.parametrize("rounding", ["float32", "float32_statistical"])
def test_a_class_attribute_changed_between_prepares_compiles_the_code_that_runs_now(
    rounding, monkeypatch):
  """The compiled evaluation is shared by the digest of what ``prepare`` traced, not by the
  graphdef alone: after the class changes, the stale program (x * 0.5) would be certified
  with the new, smaller ``L`` (0.25), radii twice too large."""
  net = aol_jax.AOLNetwork([aol_jax.Flatten(), _Scale(),
                            aol_jax.AOLDense(4, 3, rngs=nnx.Rngs(1))])
  x = np.random.default_rng(0).uniform(size=(5, 2, 2, 1)).astype(np.float32)
  jax.clear_caches()
  before = prepare(net, x.shape[1:], rounding=rounding)
  assert prepare(net, x.shape[1:], rounding=rounding).program == before.program
  aol_jax.certified_radii(net, x, batch_size=5, rounding=rounding)
  monkeypatch.setattr(_Scale, "lipschitz", 0.25)
  after = prepare(net, x.shape[1:], rounding=rounding)
  assert after.graphdef == before.graphdef and after.program != before.program
  assert after.lipschitz == pytest.approx(before.lipschitz / 2)
  radii = aol_jax.certified_radii(net, x, batch_size=5, rounding=rounding)[1]
  jax.clear_caches()
  np.testing.assert_array_equal(radii, aol_jax.certified_radii(net, x, batch_size=5,
                                                               rounding=rounding)[1])
  assert np.all(radii > 0)


def test_the_traced_constants_cannot_be_changed_after_prepare():
  """What the jitted evaluation reads as ``L`` and the rounding constants is held immutable
  (read-only arrays in tuples), as the frozen state is: changing it would certify with
  another bound than the one derived."""
  prepared = prepare(_net(), (2, 2, 1))
  with pytest.raises(ValueError, match="read-only"):
    prepared.scalars.lipschitz[...] = 0.0
  with pytest.raises(ValueError, match="read-only"):
    prepared.scalars.model.beta[...] = 0.0
  with pytest.raises(AttributeError):
    prepared.scalars.lipschitz = 0.0
  assert not any(leaf.flags.writeable for leaf in jax.tree.leaves(prepared.state))
