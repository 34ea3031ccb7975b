"""Certification: strictness, an independent margin, the rounding allowance, certify_dataset,
the layers' stated bounds, float32-only certification and the worst-case rounding mode."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax import models
from aol_jax import bounds, lipschitz
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
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    certify_dataset(model, images, labels + 10, batch_size=4)
  with pytest.raises(ValueError, match="integer class ids"):
    certify_dataset(model, images, labels.astype(np.float32), batch_size=4)
  with pytest.raises(ValueError, match="rounding must be"):
    certify_dataset(model, images, labels, batch_size=4, rounding="exact")
  with pytest.raises(TypeError, match="Linear at path \\(\\) .* states no lipschitz_bound"):
    certify_dataset(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), images, labels, batch_size=4)


def test_markdown_table():
  result = CertificationResult(num_examples=200, num_correct=141, eps_list=(36 / 255, 1.0),
                               num_certified=(120, 7), lipschitz_constant=1.0,
                               max_allowance=(1e-4, 1e-4), rounding="worst_case")
  assert result.clean_accuracy == 141 / 200 and result.cra == (0.6, 0.035)
  lines = certification_markdown(result, name="aol_small").splitlines()
  assert lines[:3] == [
      "| model | n | clean | 36/255 | 1 |",
      "|---|---|---|---|---|",
      "| aol_small | 200 | 70.5 | 60.0 | 3.5 |",
  ]
  assert lines[4].startswith("Rounding: worst_case (float64 forward pass")
  with pytest.raises(ValueError, match="rounding must be one of"):
    CertificationResult(num_examples=1, num_correct=1, eps_list=(1.0,), num_certified=(1,),
                        lipschitz_constant=1.0, max_allowance=(0.0,), rounding="bf16")


def test_certify_dataset_refuses_a_plain_linear_layer():
  """The issue's reproduction: a plain nnx.Linear behind Flatten once certified 99 % at L = 1."""
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(200, 8, 8, 1)).astype(np.float32)
  net = models.AOLNetwork([aol_jax.Flatten(), nnx.Linear(
      64, 10, kernel_init=nnx.initializers.normal(10.0), rngs=nnx.Rngs(0))])
  y = np.asarray(jnp.argmax(net(jnp.asarray(x)), axis=-1))
  with pytest.raises(bounds.UndeclaredBoundError) as info:
    certify_dataset(net, x, y, batch_size=50)
  message = str(info.value)
  assert "Linear at path ('layers', 1)" in message and "model.layers[1]" in message
  assert "aol_jax.AOLDense" in message and "lipschitz_bound()" in message
  with pytest.raises(bounds.UndeclaredBoundError):
    net.lipschitz_bound()


class _Halve(nnx.Module):
  """A user's layer that states its own bounds: y = x / 2, exact in binary floating point."""

  def lipschitz_bound(self) -> float:
    return 0.5

  def rounding_terms(self) -> aol_jax.RoundingTerms:
    return aol_jax.RoundingTerms()

  def worst_case_terms(self, input_shape) -> aol_jax.WorstCaseTerms:
    return aol_jax.WorstCaseTerms.exact(0.5)

  def __call__(self, x):
    return x / 2


def test_the_bound_is_the_product_of_what_the_layers_state():
  rngs = nnx.Rngs(0)
  dense = AOLDense(64, 10, rngs=rngs)
  net = models.AOLNetwork([aol_jax.Flatten(), _Halve(), jax.nn.relu, dense, _Halve()],
                          input_std=(0.25,))
  assert net.lipschitz_bound() == 4.0 * 0.5 * 0.5
  # Rounding terms come from the layers: the dense layer's fan-in, the normalisation's 2,
  # each forward term times max(1, L of the layers after it).
  assert net.rounding_terms() == aol_jax.RoundingTerms(
      forward=math.sqrt(65) + 2.0, rescale=math.sqrt(10 + 64))
  # A nested network reports the full path of the offending layer.
  inner = models.AOLNetwork([aol_jax.Flatten(), nnx.Conv(1, 2, (3, 3), rngs=rngs)])
  outer = models.AOLNetwork([_Halve(), inner])
  with pytest.raises(bounds.UndeclaredBoundError, match=r"Conv at path \('layers', 1, "
                     r"'layers', 1\) \(model.layers\[1\].layers\[1\]\)"):
    outer.lipschitz_bound()
  for unknown in (nnx.LayerNorm(4, rngs=rngs), jnp.tanh):
    with pytest.raises(bounds.UndeclaredBoundError, match="states no lipschitz_bound"):
      models.AOLNetwork([unknown]).lipschitz_bound()
  # A declared function is accepted.
  bounds.register_exact_map(jnp.negative, 1.0)
  try:
    assert models.AOLNetwork([jnp.negative, _Halve()]).lipschitz_bound() == 0.5
  finally:
    del bounds._EXACT_MAPS[jnp.negative]


def _as_bfloat16(model: nnx.Module) -> nnx.Module:
  """bfloat16 parameters and a bfloat16 compute dtype in every AOL layer."""
  model = nnx.clone(model)
  nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
  for _, layer in nnx.iter_modules(model):
    if hasattr(layer, "dtype"):
      layer.dtype = jnp.bfloat16
  return model


def test_a_bfloat16_model_gets_float32_certificates():
  images, _ = _digits_like(96, seed=8)
  bf16 = _as_bfloat16(_trained_like(_tiny_std_model(), 0.1, seed=9))
  assert bf16(jnp.asarray(images)).dtype == jnp.bfloat16
  # The same parameters in float32 (bfloat16 widens exactly) with a float32 compute dtype.
  f32 = nnx.clone(bf16)
  nnx.update(f32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(f32, nnx.Param)))
  for _, layer in nnx.iter_modules(f32):
    if hasattr(layer, "dtype"):
      layer.dtype = None
  labels = np.asarray(jnp.argmax(f32(jnp.asarray(images)), axis=-1))
  eps_list = (0.0, 0.01, 0.03, 0.1)
  for rounding in ("probabilistic", "worst_case"):
    got = certify_dataset(bf16, images, labels, eps_list=eps_list, batch_size=32,
                          rounding=rounding)
    assert got == certify_dataset(f32, images, labels, eps_list=eps_list, batch_size=32,
                                  rounding=rounding)
    assert got.rounding == rounding
  # Not vacuous: the bfloat16 forward pass moves margins by far more than the allowance, so
  # certifying its logits would give other certificates.
  m16 = np.asarray(margins(bf16(jnp.asarray(images)).astype(jnp.float32), labels))
  m32 = np.asarray(margins(f32(jnp.asarray(images)), labels))
  print("bf16 vs f32 margin gap:", np.abs(m16 - m32).max(), "allowance", got.max_allowance)
  assert np.abs(m16 - m32).max() > 100 * max(got.max_allowance)


class _CastsToBfloat16(aol_jax.ExactMap, nnx.Module):
  """Claims L = 1 but rounds its input to bfloat16 internally."""

  def __call__(self, x):
    return x.astype(jnp.bfloat16).astype(x.dtype)


def test_a_layer_that_computes_in_bfloat16_is_refused():
  images, labels = _digits_like(8, seed=10)
  model = models.AOLNetwork([*_tiny_std_model().layers, _CastsToBfloat16()])
  with pytest.raises(TypeError, match=r"still computes in \['bfloat16'\]"):
    certify_dataset(model, images, labels, batch_size=8)


_SEEN_PRECISION = []


class _PrecisionSpy(aol_jax.ExactMap, nnx.Module):
  """Records the default matmul precision in force when the forward pass is traced."""

  def __call__(self, x):
    _SEEN_PRECISION.append(jax.config.jax_default_matmul_precision)
    return x


def test_certify_dataset_forces_highest_matmul_precision():
  """No global precision in conftest: certify_dataset itself must ask for 'highest'."""
  assert jax.config.jax_default_matmul_precision is None
  images, labels = _digits_like(8, seed=11)
  model = models.AOLNetwork([_PrecisionSpy(), *_tiny_std_model().layers])
  _SEEN_PRECISION.clear()
  certify_dataset(model, images, labels, batch_size=8)
  assert _SEEN_PRECISION and set(_SEEN_PRECISION) == {"highest"}


def test_certify_dataset_any_batch_size_on_a_mesh():
  """batch_size 500 on 8 devices: rounded up to 504 rows, padded and masked."""
  images, labels = _digits_like(1203, seed=12)
  model = _trained_like(_tiny_std_model(), 0.3, seed=13)
  logits = aol_jax.freeze(model)(jnp.asarray(images))
  labels[::2] = np.asarray(jnp.argmax(logits, axis=-1))[::2]  # half correct, half random
  m = _numpy_margin(np.asarray(logits), labels)
  eps_list = tuple(float(np.quantile(m[m > 0], q)) / math.sqrt(2) for q in (0.0, 0.3, 0.7))
  want = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=1203)
  mesh = jax.make_mesh((8,), ("data",))
  for rounding in ("probabilistic", "worst_case"):
    got = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=500, mesh=mesh,
                          rounding=rounding)
    assert got.num_examples == 1203
    if rounding == "probabilistic":
      # The input norms of other batch shapes round differently, by float32 ulps.
      np.testing.assert_allclose(got.max_allowance, want.max_allowance, rtol=1e-6)
      assert dataclasses.replace(got, max_allowance=want.max_allowance) == want
  print("any batch size on a mesh:", want)
  assert 0 < want.num_certified[-1] < want.num_correct < 1203


def _conv_matrix_norm(kernel: np.ndarray, groups: int, size: int, padding: str) -> float:
  conv = lambda x: jax.lax.conv_general_dilated(
      x[None], jnp.asarray(kernel), (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups, precision="highest")[0]
  return lipschitz.operator_norm(conv, (size, size, kernel.shape[-2] * groups))


@pytest.mark.parametrize("rescaled", [True, False])
def test_worst_case_kernel_bounds_are_rigorous(rescaled):
  """The float64 Schur bound is >= the exact norm of the float32 kernel (SVD), and for an
  AOL-rescaled kernel it is 1 up to the float32 rounding of the factors (u sqrt(a + b) ~
  1e-6 here): the frozen kernel itself may exceed 1 by that much, which the bound sees."""
  from aol_jax import rescaling, worst_case
  rng = np.random.default_rng(14)
  dense = rng.normal(size=(40, 24)).astype(np.float32)
  conv = rng.normal(size=(3, 3, 3, 6)).astype(np.float32)
  if rescaled:
    dense = np.asarray(rescaling.rescale_dense(dense))
    conv = np.asarray(rescaling.rescale_conv(conv, feature_group_count=2))
  d_terms = worst_case.dense_kernel_terms(dense, None)
  c_terms = worst_case.conv_kernel_terms(conv, None, feature_group_count=2, output_positions=1)
  d_true = np.linalg.svd(dense.astype(np.float64), compute_uv=False)[0]
  c_true = max(_conv_matrix_norm(conv, 2, 7, "SAME"), _conv_matrix_norm(conv, 2, 7, "VALID"))
  print(f"rescaled={rescaled}: dense {d_true:.6f} <= {d_terms.lipschitz:.6f}, conv "
        f"{c_true:.6f} <= {c_terms.lipschitz:.6f}")
  assert d_true <= d_terms.lipschitz and c_true <= c_terms.lipschitz
  if rescaled:
    assert d_terms.lipschitz <= 1 + 1e-6 and c_terms.lipschitz <= 1 + 1e-6
  # || |W| || bounds: the l2 norm of the entrywise absolute value.
  abs_true = np.linalg.svd(np.abs(dense.astype(np.float64)), compute_uv=False)[0]
  assert abs_true <= d_terms.error_slope / worst_case.gamma(40)


def test_worst_case_error_bound_holds_against_extended_precision():
  """The float64 logits of a frozen dense net lie within S r + I of an 80-bit evaluation."""
  model = _trained_like(models.aol_fc(10, rngs=nnx.Rngs(0), width=64, depth=3, image_size=8,
                                      in_channels=1), 0.1, seed=15)
  # No biases: the error must then be covered by the slope term alone (the bias term
  # gamma_n ||b|| would otherwise cover the small real error by itself).
  for layer in model.layers:
    if isinstance(layer, AOLDense):
      layer.bias[...] = jnp.zeros_like(layer.bias[...])
  frozen = aol_jax.freeze(model)
  images, _ = _digits_like(16, seed=16)
  terms = frozen.worst_case_terms(images.shape[1:])
  with jax.enable_x64(True):
    state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.state(frozen))
    graphdef = nnx.graphdef(frozen)
    logits64 = np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(
        state, jnp.asarray(images, jnp.float64)))
  assert logits64.dtype == np.float64
  h = images.reshape(16, -1).astype(np.longdouble)
  for layer in frozen.layers:
    if isinstance(layer, AOLDense):
      h = h @ np.asarray(layer.kernel[...]).astype(np.longdouble) + np.asarray(
          layer.bias[...]).astype(np.longdouble)
    elif isinstance(layer, aol_jax.MaxMin):
      a, b = h[:, 0::2], h[:, 1::2]
      h = np.stack([np.maximum(a, b), np.minimum(a, b)], axis=-1).reshape(h.shape)
    elif isinstance(layer, aol_jax.FirstChannels):
      h = h[:, :layer.n]
  err = np.linalg.norm((logits64.astype(np.longdouble) - h).astype(np.float64), axis=-1)
  r = np.linalg.norm(images.reshape(16, -1).astype(np.float64), axis=-1)
  bound = terms.error_slope * r + terms.error_intercept
  print(f"float64 logit error max {err.max():.2e}, bound min {bound.min():.2e}, ratio "
        f"{(bound / np.maximum(err, 1e-300)).min():.0f}")
  assert err.max() > 0 and np.all(err <= bound)


def test_worst_case_mode_against_a_separate_float64_evaluation():
  images, labels = _digits_like(203, seed=17)
  model = _trained_like(_tiny_std_model(input_mean=(0.5,), input_std=(0.5,)), 0.1, seed=18)
  frozen = aol_jax.freeze(model)
  terms = frozen.worst_case_terms(images.shape[1:])
  with jax.enable_x64(True):
    state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.state(frozen))
    logits = nnx.merge(nnx.graphdef(frozen), state)(jnp.asarray(images, jnp.float64))
    m = _numpy_margin(np.asarray(logits), labels)
  # Radii where some but not all correct examples certify.
  eps_list = (0.0,) + tuple(float(np.quantile(m[m > 0], q)) / (math.sqrt(2) * terms.lipschitz)
                            for q in (0.2, 0.5, 0.8))
  assert not jax.config.jax_enable_x64
  got = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32,
                        rounding="worst_case")
  assert not jax.config.jax_enable_x64  # the caller's setting is restored
  prob = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32)
  assert got.rounding == "worst_case" and prob.rounding == "probabilistic"
  assert got.lipschitz_constant == terms.lipschitz
  # At most max(1 / std) = 2 times AOL's 1 (+ float32 factor rounding), at least the
  # Jacobian norm of the frozen network at any point (a lower bound on its constant).
  f = lambda z: frozen(z[None])[0]
  jac = max(float(lipschitz.power_iteration(f, jnp.asarray(images[i]), 100)) for i in range(4))
  print(f"worst-case L {terms.lipschitz:.6f} >= Jacobian norm {jac:.6f}")
  assert jac <= terms.lipschitz <= 2.0 * (1 + 1e-5)
  r = np.linalg.norm(images.reshape(len(images), -1).astype(np.float64), axis=-1)
  counts = []
  for e in eps_list:
    slack = math.sqrt(2) * (terms.error_slope * (2 * r * (1 + 1e-12) + e)
                            + 2 * terms.error_intercept)
    counts.append(int(np.sum(m > (math.sqrt(2) * terms.lipschitz * e + slack) * (1 + 1e-14))))
  assert got.num_certified == tuple(counts) and got.num_correct == int(np.sum(m > 0))
  print("worst_case / probabilistic certified:", got.num_certified, prob.num_certified,
        "max allowance", got.max_allowance, prob.max_allowance)
  assert max(got.max_allowance) < 1e-9 < min(prob.max_allowance)
  assert 0 < counts[-1] < counts[1] < got.num_correct
