"""The statistical rounding model: the counting formulas, composition, and the allowance
against a float64 evaluation (which holds on random data, not for every summation order:
test_false_certificates.py shows a network that breaks it)."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import aol_jax
from aol_jax._src.certification.protocol import statistical_terms
from aol_jax._src.certification.statistical import (StatisticalTerms, compose,
                                                    statistical_allowance)
from support.certification import SMALL_FAMILIES, float64_logit_error, trained_like


def test_rounding_terms_count_fan_in_and_gram_lengths():
  model = aol_jax.aol_small(2, rngs=nnx.Rngs(0), channels=8, conv_depth=1, dense_depth=2,
                           width=2, image_size=8, pool=4)
  terms = statistical_terms(model)
  # 1x1 conv 48 -> 8, one 3x3 conv 8 -> 8, 1x1 conv 8 -> 8, two dense 8 -> 8.
  forward = math.sqrt(48 + 1) + math.sqrt(72 + 1) + math.sqrt(8 + 1) + 2 * math.sqrt(8 + 1)
  rescale = (math.sqrt(8 + 48) + math.sqrt(72 + 25 * 8) + math.sqrt(8 + 8)
             + 2 * math.sqrt(8 + 8))
  assert terms.forward == pytest.approx(forward)
  assert terms.rescale == pytest.approx(rescale)
  normalised = aol_jax.aol_small(2, rngs=nnx.Rngs(0), channels=8, conv_depth=1, dense_depth=2,
                                width=2, image_size=8, pool=4, input_std=(0.5, 0.5, 0.5))
  assert statistical_terms(normalised).forward == pytest.approx(forward + 2)


@pytest.mark.parametrize("name", sorted(SMALL_FAMILIES))
def test_allowance_exceeds_measured_float32_error(name):
  """The float32 logits of the frozen model differ from a float64 evaluation of the same
  kernels by far less than the modelled bound ``u S_f M`` the allowance is built from, at
  the paper's init and with perturbed kernels (trained weights: test_attacks.py)."""
  model = aol_jax.MODELS[name](10, rngs=nnx.Rngs(0), in_channels=3, **SMALL_FAMILIES[name])
  x = jax.random.uniform(jax.random.key(2), (8, 16, 16, 3), jnp.float32)
  for weights in ("init", "perturbed"):
    if weights == "perturbed":
      model = trained_like(model, 0.05, seed=1)
    err, bound = float64_logit_error(aol_jax.freeze(model), x)
    assert err.max() > 0  # float32 really rounded, so the comparison is not vacuous
    ratio = bound.min() / err.max()
    print(f"{name} ({weights}): max f32-vs-f64 logit error {err.max():.2e}, min u*S_f*M "
          f"{bound.min():.2e}, ratio {ratio:.0f}")
    assert ratio > 100


def test_composition_tracks_the_largest_prefix_and_every_absolute_error():
  """[x2, x0.5]: L = 1, yet the middle value is twice the input, so M grows with P = 2, not
  max(1, L) = 1; an error made after the x2 is not amplified, one before it is."""
  double, halve = StatisticalTerms.exact(2.0), StatisticalTerms.exact(0.5)
  noisy = StatisticalTerms(lipschitz=1.0, forward=3.0, prefix=1.0, amplification=1.0)
  terms = compose([noisy, double, halve])
  assert (terms.lipschitz, terms.prefix, terms.amplification) == (1.0, 2.0, 2.0)
  assert terms.forward == 3.0  # after it: 2 * 0.5 = 1
  assert compose([double, double]).prefix == 4.0  # the products, not the largest factor
  assert compose([double, noisy, halve]).forward == 3.0  # after it: 0.5, never below 1
  assert compose([halve, noisy, double]).forward == 6.0  # after it: 2
  # A network of exact maps still gets the underflow term; the allowance grows with P eps.
  exact = compose([double, halve])
  a0 = float(statistical_allowance(exact, 0.0, 0.0, operations=100))
  assert a0 >= 2 * math.sqrt(2) * 2.0 * 100 * 2.0 ** -126
  a1 = float(statistical_allowance(terms, 1.0, 1.0, operations=0))
  a0 = float(statistical_allowance(terms, 1.0, 0.0, operations=0))
  assert a1 - a0 == pytest.approx(math.sqrt(2) * 2.0 ** -24 * 3.0 * 2.0, rel=1e-3)
