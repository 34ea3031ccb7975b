"""certify_dataset: batching, masking, meshes, the normalisation constant, float32-only certification, bad input."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src.certification.dataset import certify_dataset
from aol_jax._src.certification.rule import certify
from aol_jax._src.layers import AOLDense
from support.certification import (digits_like, numpy_margin, reference_counts, tiny_std_model,
                                   trained_like)

def test_certify_dataset_mesh_padding_and_masking():
  images, labels = digits_like(203, seed=3)  # 203 = 6 * 32 + 11: a partial last batch
  model = trained_like(tiny_std_model(), 0.1, seed=4)
  # A large bias on class 0 makes every input, including a zero padding row labelled 0,
  # a confident class 0: an unmasked padding row would be counted as correct and certified.
  last = [l for _, l in nnx.iter_modules(model) if isinstance(l, AOLDense)][-1]
  last.bias[...] = last.bias[...].at[0].set(0.3)
  eps_list = (0.0, 0.02, 0.05, 0.1)
  zero_logits = aol_jax.freeze(model)(jnp.zeros((1, 8, 8, 1)))
  assert bool(certify(zero_logits, np.array([0]), eps_list[-1], allowance=1e-3)[0])
  statistical = "float32_statistical"  # the mode reference_counts recomputes independently
  no_mesh = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32,
                            rounding=statistical)
  mesh = jax.make_mesh((8,), ("data",))
  with_mesh = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32,
                              mesh=mesh, rounding=statistical)
  assert no_mesh == with_mesh
  with jax.set_mesh(mesh):  # as a training loop with an Explicit mesh would call it
    assert certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32,
                           mesh=mesh, rounding=statistical) == no_mesh
  # The default (rigorous) mode: the same counts with and without a mesh, padding masked.
  rigorous = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32)
  sharded = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32, mesh=mesh)
  # The sharded evaluation sums in another order: allowances differ by ulps, counts do not.
  np.testing.assert_allclose(sharded.max_allowance, rigorous.max_allowance, rtol=1e-6)
  assert dataclasses.replace(sharded, max_allowance=rigorous.max_allowance) == rigorous
  assert rigorous.num_certified[-1] > 0 and rigorous.num_examples == 203
  correct, counts = reference_counts(model, images, labels, eps_list)
  assert no_mesh.num_examples == 203
  assert no_mesh.num_correct == correct
  assert no_mesh.num_certified == counts
  assert 0 < counts[-1] and correct < 203  # neither nothing nor everything certified
  print("certify_dataset counts:", correct, counts)
  # A different batching gives the same table.
  assert certify_dataset(model, images, labels, eps_list=eps_list, batch_size=40,
                         rounding=statistical) == no_mesh


def test_certify_dataset_uses_normalisation_constant():
  images, labels = digits_like(64, seed=5)
  plain = trained_like(tiny_std_model(), 0.1, seed=6)
  normalised = trained_like(tiny_std_model(input_mean=(0.5,), input_std=(0.25,)), 0.1,
                             seed=6)
  assert normalised.lipschitz_bound() == pytest.approx(4.0 * plain.lipschitz_bound(),
                                                       rel=1e-12)
  # Certified from the kernels the frozen copy applies: 4 times their rigorous bounds.
  lip = aol_jax.freeze(normalised).lipschitz_bound()
  assert lip == pytest.approx(4.0 * aol_jax.freeze(plain).lipschitz_bound(), rel=1e-12)
  assert lip <= 4.0 * (1 + 1e-5)
  # Labels = the model's own predictions, so every example has a positive margin.
  logits = aol_jax.freeze(normalised)(jnp.asarray(images))
  labels = np.asarray(jnp.argmax(logits, axis=-1))
  # A radius at which the kernels' own L (without the normalisation's 4) would certify the
  # examples with margin > median / 2, and the normalised model's L only those > 2 median.
  eps = 2 * float(np.median(numpy_margin(np.asarray(logits), labels))) / (math.sqrt(2) * lip)
  eps_list = (0.0, eps / 4, eps)
  result = certify_dataset(normalised, images, labels, eps_list=eps_list, batch_size=16,
                           rounding="float32_statistical")  # what reference_counts recomputes
  assert result.lipschitz_constant == lip
  correct, counts = reference_counts(normalised, images, labels, eps_list)
  assert (result.num_correct, result.num_certified) == (correct, counts)
  # Certifying the same logits without the normalisation's factor 4 would claim more.
  without = int(np.sum(certify(logits, labels, eps, lipschitz_constant=lip / 4, allowance=0.0)))
  print("normalised model, certified with L / L without 1/std:", result.num_certified[-1],
        without)
  assert without > result.num_certified[-1]


def test_certify_dataset_rejects_bad_inputs():
  images, labels = digits_like(10, seed=7)
  model = tiny_std_model()
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    certify_dataset(model, images, labels + 10, batch_size=4)
  with pytest.raises(ValueError, match="integer class ids"):
    certify_dataset(model, images, labels.astype(np.float32), batch_size=4)
  with pytest.raises(ValueError, match="rounding must be"):
    certify_dataset(model, images, labels, batch_size=4, rounding="exact")
  with pytest.raises(TypeError, match="Linear at path \\(\\) .* states no lipschitz_bound"):
    certify_dataset(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), images, labels, batch_size=4)


def _as_bfloat16(model: nnx.Module) -> nnx.Module:
  """bfloat16 parameters and a bfloat16 compute dtype in every AOL layer."""
  model = nnx.clone(model)
  nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
  for _, layer in nnx.iter_modules(model):
    if hasattr(layer, "dtype"):
      layer.dtype = jnp.bfloat16
  return model


def test_a_bfloat16_compute_dtype_is_refused_and_bfloat16_parameters_widen_exactly():
  """A model that computes in bfloat16 is refused, naming the layer: clearing its compute
  dtype would certify a float32 pass it does not run. bfloat16 parameters under a float32
  compute dtype widen exactly: the certificates of the float32 copy, in every mode."""
  images, _ = digits_like(96, seed=8)
  bf16 = _as_bfloat16(trained_like(tiny_std_model(), 0.1, seed=9))
  assert bf16(jnp.asarray(images)).dtype == jnp.bfloat16
  for rounding in aol_jax.ROUNDING_MODES:
    with pytest.raises(TypeError, match=r"at path \('layers', 0\) computes in bfloat16"):
      certify_dataset(bf16, images, np.zeros(96, np.int32), batch_size=32, rounding=rounding)
  params16 = nnx.clone(bf16)
  for _, layer in nnx.iter_modules(params16):
    if hasattr(layer, "dtype"):
      layer.dtype = None
  f32 = nnx.clone(params16)
  nnx.update(f32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(f32, nnx.Param)))
  labels = np.asarray(jnp.argmax(f32(jnp.asarray(images)), axis=-1))
  eps_list = (0.0, 0.01, 0.03, 0.1)
  for rounding in aol_jax.ROUNDING_MODES:
    got = certify_dataset(params16, images, labels, eps_list=eps_list, batch_size=32,
                          rounding=rounding)
    assert got == certify_dataset(f32, images, labels, eps_list=eps_list, batch_size=32,
                                  rounding=rounding)
    assert got.rounding == rounding and got.num_certified[-1] > 0


class _CastsToBfloat16(aol_jax.certification.ExactMap, nnx.Module):
  """Claims L = 1 but rounds its input to bfloat16 internally."""

  def __call__(self, x):
    return x.astype(jnp.bfloat16).astype(x.dtype)


def test_a_layer_that_computes_in_bfloat16_is_refused():
  images, labels = digits_like(8, seed=10)
  model = aol_jax.AOLNetwork([*tiny_std_model().layers, _CastsToBfloat16()])
  with pytest.raises(TypeError, match=r"still computes in \['bfloat16'\]"):
    certify_dataset(model, images, labels, batch_size=8)


_SEEN_PRECISION = []


class _PrecisionSpy(aol_jax.certification.ExactMap, nnx.Module):
  """Records the default matmul precision in force when the forward pass is traced."""

  def __call__(self, x):
    _SEEN_PRECISION.append(jax.config.jax_default_matmul_precision)
    return x


def test_certify_dataset_forces_highest_matmul_precision():
  """No global precision in conftest: every mode's evaluation is traced at 'highest'."""
  assert jax.config.jax_default_matmul_precision is None
  images, labels = digits_like(8, seed=11)
  model = aol_jax.AOLNetwork([_PrecisionSpy(), *tiny_std_model().layers])
  for rounding in aol_jax.ROUNDING_MODES:
    _SEEN_PRECISION.clear()
    certify_dataset(model, images, labels, batch_size=8, rounding=rounding)
    assert _SEEN_PRECISION and set(_SEEN_PRECISION) == {"highest"}, rounding


def test_certify_dataset_any_batch_size_on_a_mesh():
  """batch_size 500 on 8 devices: rounded up to 504 rows, padded and masked."""
  images, labels = digits_like(1203, seed=12)
  model = trained_like(tiny_std_model(), 0.3, seed=13)
  logits = aol_jax.freeze(model)(jnp.asarray(images))
  labels[::2] = np.asarray(jnp.argmax(logits, axis=-1))[::2]  # half correct, half random
  m = numpy_margin(np.asarray(logits), labels)
  lip = aol_jax.freeze(model).lipschitz_bound()
  eps_list = tuple(float(np.quantile(m[m > 0], q)) / (math.sqrt(2) * lip)
                   for q in (0.0, 0.3, 0.7))
  mesh = jax.make_mesh((8,), ("data",))
  for rounding in aol_jax.ROUNDING_MODES:
    want = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=1203,
                           rounding=rounding)
    got = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=500, mesh=mesh,
                          rounding=rounding)
    assert got.num_examples == 1203
    # Other batch shapes sum in other orders: the allowances, computed from the activations,
    # differ by a few ulps (the counts here do not).
    np.testing.assert_allclose(got.max_allowance, want.max_allowance, rtol=1e-6)
    assert dataclasses.replace(got, max_allowance=want.max_allowance) == want, rounding
  print("any batch size on a mesh:", want)
  assert 0 < want.num_certified[-1] < want.num_correct < 1203


@pytest.mark.parametrize("change,argument,match", [
    (lambda a: {**a, "images": np.where(a["images"] > 0.5, np.nan, a["images"])}, "images",
     "non-finite"),
    (lambda a: {**a, "images": np.where(a["images"] > 0.5, np.inf, a["images"])}, "images",
     "non-finite"),
    (lambda a: {**a, "images": (a["images"] * 255).astype(np.uint8)}, "images", "uint8"),
    (lambda a: {**a, "images": a["images"] * 255}, "images", r"\[0, 1\]"),
    (lambda a: {**a, "images": a["images"] - 0.5}, "images", r"\[0, 1\]"),
    (lambda a: {**a, "eps_list": (float("nan"),)}, "eps_list", "finite"),
    (lambda a: {**a, "eps_list": (0.1, float("inf"))}, "eps_list", "finite"),
    (lambda a: {**a, "eps_list": (-0.1,)}, "eps_list", ">= 0"),
    (lambda a: {**a, "batch_size": 2.5}, "batch_size", "int"),
    (lambda a: {**a, "batch_size": True}, "batch_size", "int"),
    (lambda a: {**a, "batch_size": 0}, "batch_size", ">= 1"),
    (lambda a: {**a, "model": np.zeros(3)}, "model", "nnx.Module"),
    (lambda a: {**a, "rounding": "exact"}, "rounding", "float32_statistical"),
])
def test_bad_input_is_refused_naming_the_argument(change, argument, match):
  images, labels = digits_like(6, seed=20)
  args = change({"model": tiny_std_model(), "images": images, "labels": labels,
                 "eps_list": (0.1,), "batch_size": 4, "rounding": "float32_statistical"})
  with pytest.raises(ValueError, match=match) as info:
    certify_dataset(args.pop("model"), args.pop("images"), args.pop("labels"), **args)
  assert argument in str(info.value)


class _AttributeBound(aol_jax.certification.ExactMap, nnx.Module):
  lipschitz_bound = 1.0  # an attribute where a method belongs

  def __call__(self, x):
    return x


class _NanBound(aol_jax.certification.ExactMap, nnx.Module):
  def lipschitz_bound(self):
    return float("nan")

  def __call__(self, x):
    return x


def test_a_bound_stated_as_an_attribute_or_nan_is_refused():
  images, labels = digits_like(4, seed=21)
  base = list(tiny_std_model().layers)
  with pytest.raises(aol_jax.certification.UndeclaredBoundError, match="attribute where a method"):
    certify_dataset(aol_jax.AOLNetwork([_AttributeBound(), *base]), images, labels,
                    batch_size=4)
  with pytest.raises(ValueError, match="finite number >= 0"):
    certify_dataset(aol_jax.AOLNetwork([_NanBound(), *base]), images, labels, batch_size=4)


class _UnderstatedTerms(aol_jax.certification.ExactMap, nnx.Module):
  """States L = 2 but statistical terms computed with L = 1."""
  lipschitz = 2.0

  def statistical_terms(self):
    return aol_jax.certification.StatisticalTerms.exact(1.0)

  def __call__(self, x):
    return 2 * x


def test_statistical_terms_below_the_stated_constant_are_refused():
  images, labels = digits_like(4, seed=22)
  model = aol_jax.AOLNetwork([_UnderstatedTerms(), *tiny_std_model().layers])
  with pytest.raises(ValueError, match="statistical_terms"):
    certify_dataset(model, images, labels, batch_size=4, rounding="float32_statistical")


@pytest.mark.parametrize("rounding", list(aol_jax.ROUNDING_MODES))
def test_a_model_with_lipschitz_constant_zero_is_certified(rounding):
  """A zero kernel: the logits are the bias whatever the input, so every radius holds."""
  dense = AOLDense(64, 3, kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
  dense.bias[...] = jnp.array([1.0, 0.0, -1.0])
  model = aol_jax.AOLNetwork([aol_jax.Flatten(), dense])
  images, _ = digits_like(5, seed=23)
  labels = np.zeros(5, np.int64)
  result = certify_dataset(model, images, labels, eps_list=(0.5, 100.0), batch_size=5,
                           rounding=rounding)
  assert result.lipschitz_constant == 0.0
  assert result.num_certified == (5, 5)
