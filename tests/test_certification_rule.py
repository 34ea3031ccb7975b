"""The margin rule: strict, decided exactly, and refusing bad radii and allowances."""

import math

import jax
import numpy as np
import pytest

from aol_jax._src.certification.margins import margins
from aol_jax._src.certification.rule import certified_robust_accuracy, certify
from support.certification import numpy_margin

def test_certify_matches_independent_margin_under_jit():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(500, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 500)
  eps, lip, allow = 0.3, 1.7, 0.01
  got = jax.jit(lambda s, y: certify(s, y, eps, lipschitz_constant=lip, allowance=allow))(
      logits, labels)
  want = numpy_margin(logits, labels) > math.sqrt(2) * lip * eps + allow
  np.testing.assert_array_equal(np.asarray(got), want)
  assert 0 < want.sum() < len(want)  # both outcomes occur, so the comparison is informative
  np.testing.assert_allclose(margins(logits, labels), numpy_margin(logits, labels), rtol=1e-6)


def test_certify_is_strict_on_a_tie():
  labels = np.array([0, 0, 0, 0, 0])
  above = np.float32(0.5 * (1 + 2.0 ** -20))  # 16 ulps above 0.5: clear of the rule's 8 u
  logits = np.array([[0.5, 0.0], [np.nextafter(np.float32(0.5), np.float32(1)), 0.0],
                     [above, 0.0], [1.0, 1.0], [1e-30, 0.0]], np.float32)
  got = certify(logits, labels, 0.0, allowance=0.5)
  # A tie is refused, and so is a margin within the rule's own rounding of the threshold.
  np.testing.assert_array_equal(np.asarray(got), [False, False, True, False, False])
  # With a zero threshold, any strictly positive margin, however small, is "correct".
  got = certify(logits, labels, 0.0, allowance=0.0)
  np.testing.assert_array_equal(np.asarray(got), [True, True, True, False, True])
  # A tie for the top logit is neither certified nor counted as correct.
  clean, cra = certified_robust_accuracy(logits[3:4], labels[3:4], [0.0], allowance=0.0)
  assert float(clean) == 0.0 and float(cra[0]) == 0.0


def test_the_rule_never_certifies_what_exact_arithmetic_refuses():
  """Radii placed within a few ulps of margin / (sqrt(2) L): the float32 comparison of the
  old rule certified some whose exact margin is not above the exact threshold."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4000, 2)).astype(np.float32)
  labels = np.argmax(logits, axis=1)
  lip, allow = np.float32(1.3), np.float32(1e-3)
  exact = np.longdouble
  m = logits.max(1).astype(exact) - logits.min(1).astype(exact)
  eps = ((m - exact(allow)) / (exact(math.sqrt(2)) * exact(lip))).astype(np.float32)
  eps = np.maximum(eps, 0) * (1 + rng.integers(-4, 5, eps.shape).astype(np.float32) * 2 ** -24)
  eps = eps.astype(np.float32)
  truth = m > exact(math.sqrt(2)) * exact(lip) * eps.astype(exact) + exact(allow)
  got = np.asarray(certify(logits, labels, eps, lipschitz_constant=float(lip), allowance=allow))
  naive = np.asarray(margins(logits, labels)) > np.float32(math.sqrt(2)) * lip * eps + allow
  print(f"naive float32 rule: {int(np.sum(naive & ~truth))} false certificates of "
        f"{len(eps)}; the rule: {int(np.sum(got & ~truth))}")
  assert np.sum(naive & ~truth) > 0  # the placement is close enough to matter
  assert not np.any(got & ~truth)


def test_lipschitz_zero_is_certified():
  logits = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  got = certify(logits, np.array([0, 0]), 1e6, lipschitz_constant=0.0, allowance=0.1)
  np.testing.assert_array_equal(np.asarray(got), [True, False])


def test_certify_without_allowance_warns():
  with pytest.warns(UserWarning, match="rounding allowance"):
    certify(np.zeros((1, 3), np.float32), np.array([0]), 0.1)


def test_cra_per_radius_and_callable_allowance():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(300, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 300)
  eps_list = [0.0, 0.2, 0.5, 1.0]
  clean, cra = certified_robust_accuracy(logits, labels, eps_list, lipschitz_constant=2.0,
                                         allowance=lambda e: 0.1 * e)
  m = numpy_margin(logits, labels)
  assert float(clean) == pytest.approx(np.mean(m > 0))
  want = [np.mean(m > math.sqrt(2) * 2.0 * e + 0.1 * e) for e in eps_list]
  np.testing.assert_allclose(np.asarray(cra), want)
  assert np.all(np.diff(np.asarray(cra)) <= 0) and want[-1] < want[0]
