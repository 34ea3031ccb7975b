"""The worst-case mode: rigorous kernel bounds, the float64 error bound, and the mode end to end."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
import aol_jax
from aol_jax._src import lipschitz
from aol_jax._src.certification.dataset import certify_dataset
from aol_jax._src.layers import AOLDense
from support.certification import digits_like, numpy_margin, tiny_std_model, trained_like

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
  from aol_jax._src import rescaling
  from aol_jax._src.certification import worst_case
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
  model = trained_like(aol_jax.aol_fc(10, rngs=nnx.Rngs(0), width=64, depth=3, image_size=8,
                                      in_channels=1), 0.1, seed=15)
  # No biases: the error must then be covered by the slope term alone (the bias term
  # gamma_n ||b|| would otherwise cover the small real error by itself).
  for layer in model.layers:
    if isinstance(layer, AOLDense):
      layer.bias[...] = jnp.zeros_like(layer.bias[...])
  frozen = aol_jax.freeze(model)
  images, _ = digits_like(16, seed=16)
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
  images, labels = digits_like(203, seed=17)
  model = trained_like(tiny_std_model(input_mean=(0.5,), input_std=(0.5,)), 0.1, seed=18)
  frozen = aol_jax.freeze(model)
  terms = frozen.worst_case_terms(images.shape[1:])
  with jax.enable_x64(True):
    state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.state(frozen))
    logits = nnx.merge(nnx.graphdef(frozen), state)(jnp.asarray(images, jnp.float64))
    m = numpy_margin(np.asarray(logits), labels)
  # Radii where some but not all correct examples certify.
  eps_list = (0.0,) + tuple(float(np.quantile(m[m > 0], q)) / (math.sqrt(2) * terms.lipschitz)
                            for q in (0.2, 0.5, 0.8))
  assert not jax.config.jax_enable_x64
  got = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32,
                        rounding="float64")
  assert not jax.config.jax_enable_x64  # the caller's setting is restored
  prob = certify_dataset(model, images, labels, eps_list=eps_list, batch_size=32)
  assert got.rounding == "float64" and prob.rounding == "float32_statistical"
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
