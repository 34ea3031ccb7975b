"""Certification: strictness, an independent margin, the rounding allowance, certify_dataset."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax import models
from aol_jax.certify import (FLOAT32_UNIT_ROUNDOFF, CertificationResult, certification_markdown,
                             certified_robust_accuracy, certify, certify_dataset, margins,
                             rounding_allowance, rounding_terms)
from aol_jax.layers import AOLDense


def _numpy_margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  out = []
  for s, y in zip(logits.astype(np.float64), labels):
    others = [s[j] for j in range(len(s)) if j != y]
    out.append(s[y] - max(others))
  return np.array(out)


def test_certify_matches_independent_margin_under_jit():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(500, 10)).astype(np.float32)
  labels = rng.integers(0, 10, 500)
  eps, lip, allow = 0.3, 1.7, 0.01
  got = jax.jit(lambda s, y: certify(s, y, eps, lipschitz_constant=lip, allowance=allow))(
      logits, labels)
  want = _numpy_margin(logits, labels) > math.sqrt(2) * lip * eps + allow
  np.testing.assert_array_equal(np.asarray(got), want)
  assert 0 < want.sum() < len(want)  # both outcomes occur, so the comparison is informative
  np.testing.assert_allclose(margins(logits, labels), _numpy_margin(logits, labels), rtol=1e-6)


def test_certify_is_strict_on_a_tie():
  # eps = 0 and an exact float32 allowance make the threshold exactly representable.
  labels = np.array([0, 0, 0])
  logits = np.array([[0.5, 0.0], [np.nextafter(np.float32(0.5), np.float32(1)), 0.0],
                     [1.0, 1.0]], np.float32)
  got = certify(logits, labels, 0.0, allowance=0.5)
  np.testing.assert_array_equal(np.asarray(got), [False, True, False])
  # A tie for the top logit is neither certified nor counted as correct.
  clean, cra = certified_robust_accuracy(logits[2:], labels[2:], [0.0], allowance=0.0)
  assert float(clean) == 0.0 and float(cra[0]) == 0.0


def test_certify_without_allowance_warns():
  with pytest.warns(UserWarning, match="rounding allowance"):
    certify(np.zeros((1, 3), np.float32), np.array([0]), 0.1)


def test_label_out_of_range_raises():
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    certify(np.zeros((2, 3), np.float32), np.array([0, 3]), 0.1, allowance=0.0)


def test_cra_per_radius_and_callable_allowance():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(300, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 300)
  eps_list = [0.0, 0.2, 0.5, 1.0]
  clean, cra = certified_robust_accuracy(logits, labels, eps_list, lipschitz_constant=2.0,
                                         allowance=lambda e: 0.1 * e)
  m = _numpy_margin(logits, labels)
  assert float(clean) == pytest.approx(np.mean(m > 0))
  want = [np.mean(m > math.sqrt(2) * 2.0 * e + 0.1 * e) for e in eps_list]
  np.testing.assert_allclose(np.asarray(cra), want)
  assert np.all(np.diff(np.asarray(cra)) <= 0) and want[-1] < want[0]


def test_rounding_terms_count_fan_in_and_gram_lengths():
  model = models.aol_small(2, rngs=nnx.Rngs(0), channels=8, conv_depth=1, dense_depth=2,
                           width=2, image_size=8, pool=4)
  terms = rounding_terms(model)
  # 1x1 conv 48 -> 8, one 3x3 conv 8 -> 8, 1x1 conv 8 -> 8, two dense 8 -> 8.
  forward = math.sqrt(48 + 1) + math.sqrt(72 + 1) + math.sqrt(8 + 1) + 2 * math.sqrt(8 + 1)
  rescale = (math.sqrt(8 + 48) + math.sqrt(72 + 25 * 8) + math.sqrt(8 + 8)
             + 2 * math.sqrt(8 + 8))
  assert terms.forward == pytest.approx(forward)
  assert terms.rescale == pytest.approx(rescale)
  normalised = models.aol_small(2, rngs=nnx.Rngs(0), channels=8, conv_depth=1, dense_depth=2,
                                width=2, image_size=8, pool=4, input_std=(0.5, 0.5, 0.5))
  assert rounding_terms(normalised).forward == pytest.approx(forward + 2)


def _trained_like(model: nnx.Module, scale: float, seed: int) -> nnx.Module:
  """Perturbs every parameter so kernels and biases look trained (not identity-like)."""
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [(p + scale * jax.random.normal(k, p.shape)).astype(p.dtype)
            for p, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(tree, leaves))
  return model


SMALL_FAMILIES = {
    "aol_small": dict(channels=32, conv_depth=3, dense_depth=4, image_size=16, pool=4),
    "aol_medium": dict(channels=32, conv_depth=2, dense_depth=3, image_size=16, pool=4),
    "aol_large": dict(channels=64, conv_depth=2, dense_depth=3, image_size=16, pool=4),
    "aol_fc": dict(width=256, depth=6, image_size=16),
    "aol_std": dict(channels=16, num_stages=2, blocks_per_stage=2, dense_width=256,
                    image_size=16),
}


@jax.jit(static_argnums=0)
def _logits_and_norm(graphdef, state, x):
  return nnx.merge(graphdef, state).logits_and_activation_norm(x)


def float64_logit_error(frozen: nnx.Module, x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Per example: the l2 gap between the float32 logits and a float64 evaluation of the same
  frozen float32 kernels, and the modelled bound ``u S_f M`` for it."""
  graphdef, state = nnx.split(frozen)
  logits32, act_norm = _logits_and_norm(graphdef, state, x)
  with jax.enable_x64(True):
    state64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
    logits64, _ = _logits_and_norm(graphdef, state64, jnp.asarray(x, jnp.float64))
    assert logits64.dtype == jnp.float64
    err = np.linalg.norm(np.asarray(logits64) - np.asarray(logits32, np.float64), axis=-1)
  bound = FLOAT32_UNIT_ROUNDOFF * rounding_terms(frozen).forward * np.asarray(act_norm)
  np.testing.assert_allclose(rounding_allowance(rounding_terms(frozen), act_norm, 0.0),
                             2 * math.sqrt(2) * bound, rtol=1e-5)
  return err, bound


@pytest.mark.parametrize("name", sorted(SMALL_FAMILIES))
def test_allowance_exceeds_measured_float32_error(name):
  """The float32 logits of the frozen model differ from a float64 evaluation of the same
  kernels by far less than the modelled bound ``u S_f M`` the allowance is built from, at
  the paper's init and with perturbed kernels (trained weights: test_attacks.py)."""
  model = models.MODELS[name](10, rngs=nnx.Rngs(0), in_channels=3, **SMALL_FAMILIES[name])
  x = jax.random.uniform(jax.random.key(2), (8, 16, 16, 3), jnp.float32)
  for weights in ("init", "perturbed"):
    if weights == "perturbed":
      model = _trained_like(model, 0.05, seed=1)
    err, bound = float64_logit_error(aol_jax.freeze(model), x)
    assert err.max() > 0  # float32 really rounded, so the comparison is not vacuous
    ratio = bound.min() / err.max()
    print(f"{name} ({weights}): max f32-vs-f64 logit error {err.max():.2e}, min u*S_f*M "
          f"{bound.min():.2e}, ratio {ratio:.0f}")
    assert ratio > 100


def _digits_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(n, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, n)


def _tiny_std_model(**kw) -> models.AOLNetwork:
  return models.aol_std(10, rngs=nnx.Rngs(0), channels=8, num_stages=1, blocks_per_stage=1,
                        dense_width=32, dense_depth=2, image_size=8, in_channels=1, **kw)


def _reference_counts(model, images, labels, eps_list):
  """Certifies the whole set in one unbatched call, independently of certify_dataset."""
  frozen = aol_jax.freeze(model)
  logits, act_norm = frozen.logits_and_activation_norm(jnp.asarray(images))
  lip = model.lipschitz_bound()
  m = _numpy_margin(np.asarray(logits), labels)
  terms = rounding_terms(frozen)
  # certify_dataset bounds M(x) by max(1, L) (1 + u S_r) ||x|| + M(0); it must never be
  # below the measured largest activation norm, and the counts below use the same bound.
  zero_norm = frozen.logits_and_activation_norm(jnp.zeros((1, *images.shape[1:])))[1][0]
  growth = max(1.0, lip) * (1.0 + 2.0 ** -24 * terms.rescale)
  bound = growth * np.linalg.norm(images.reshape(len(images), -1), axis=1) + float(zero_norm)
  assert np.all(bound >= np.asarray(act_norm))
  act_norm = bound
  counts = tuple(int(np.sum(m > math.sqrt(2) * lip * e + np.asarray(
      rounding_allowance(terms, act_norm, e, lipschitz_constant=lip)))) for e in eps_list)
  return int(np.sum(m > 0)), counts


def test_certify_dataset_mesh_padding_and_masking():
  images, labels = _digits_like(203, seed=3)  # 203 = 6 * 32 + 11: a partial last batch
  model = _trained_like(_tiny_std_model(), 0.1, seed=4)
  # A large bias on class 0 makes every input, including a zero padding row labelled 0,
  # a confident class 0: an unmasked padding row would be counted as correct and certified.
  last = [l for _, l in nnx.iter_modules(model) if isinstance(l, AOLDense)][-1]
  last.bias[...] = last.bias[...].at[0].set(0.3)
  eps_list = (0.0, 0.02, 0.05, 0.1)
  zero_logits = aol_jax.freeze(model)(jnp.zeros((1, 8, 8, 1)))
  assert bool(certify(zero_logits, np.array([0]), eps_list[-1], allowance=1e-3)[0])
  no_mesh = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32)
  mesh = jax.make_mesh((8,), ("data",))
  with_mesh = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32,
                              mesh=mesh)
  assert no_mesh == with_mesh
  with jax.set_mesh(mesh):  # as a training loop with an Explicit mesh would call it
    assert certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32,
                           mesh=mesh) == no_mesh
  correct, counts = _reference_counts(model, images, labels, eps_list)
  assert no_mesh.num_examples == 203
  assert no_mesh.num_correct == correct
  assert no_mesh.num_certified == counts
  assert 0 < counts[-1] and correct < 203  # neither nothing nor everything certified
  print("certify_dataset counts:", correct, counts)
  # A different batching gives the same table.
  assert certify_dataset(model, images, labels, eps_list=eps_list, batch_size=40) == no_mesh


def test_certify_dataset_uses_normalisation_constant():
  images, labels = _digits_like(64, seed=5)
  plain = _trained_like(_tiny_std_model(), 0.1, seed=6)
  normalised = _trained_like(_tiny_std_model(input_mean=(0.5,), input_std=(0.25,)), 0.1,
                             seed=6)
  assert normalised.lipschitz_bound() == 4.0 and plain.lipschitz_bound() == 1.0
  # Labels = the model's own predictions, so every example has a positive margin.
  logits = aol_jax.freeze(normalised)(jnp.asarray(images))
  labels = np.asarray(jnp.argmax(logits, axis=-1))
  # A radius at which L = 1 would certify the examples with margin > median / 2, and
  # L = 4 only those with margin > 2 median.
  eps = float(np.median(_numpy_margin(np.asarray(logits), labels))) / (2 * math.sqrt(2))
  eps_list = (0.0, eps / 4, eps)
  result = certify_dataset(normalised, images, labels, eps_list=eps_list, batch_size=16)
  assert result.lipschitz_constant == 4.0
  correct, counts = _reference_counts(normalised, images, labels, eps_list)
  assert (result.num_correct, result.num_certified) == (correct, counts)
  # Certifying the same logits with L = 1 would claim more: the constant matters here.
  with_l1 = int(np.sum(certify(logits, labels, eps, lipschitz_constant=1.0, allowance=0.0)))
  print("normalised model, certified with L=4 / L=1:", result.num_certified[-1], with_l1)
  assert with_l1 > result.num_certified[-1]


def test_certify_dataset_rejects_bad_inputs():
  images, labels = _digits_like(10, seed=7)
  model = _tiny_std_model()
  with pytest.raises(ValueError, match="multiple"):
    certify_dataset(model, images, labels, batch_size=12, mesh=jax.make_mesh((8,), ("data",)))
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    certify_dataset(model, images, labels + 10, batch_size=4)
  with pytest.raises(TypeError):
    certify_dataset(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), images, labels, batch_size=4)


def test_markdown_table():
  result = CertificationResult(num_examples=200, num_correct=141, eps_list=(36 / 255, 1.0),
                               num_certified=(120, 7), lipschitz_constant=1.0,
                               max_allowance=(1e-4, 1e-4))
  assert result.clean_accuracy == 141 / 200 and result.cra == (0.6, 0.035)
  assert certification_markdown(result, name="aol_small").splitlines() == [
      "| model | n | clean | 36/255 | 1 |",
      "|---|---|---|---|---|",
      "| aol_small | 200 | 70.5 | 60.0 | 3.5 |",
  ]
