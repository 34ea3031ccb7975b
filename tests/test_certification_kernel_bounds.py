"""The bound a frozen layer states (layer.lipschitz_bound) against exact norms,
layer by layer and for whole frozen networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src import lipschitz
from aol_jax._src import spectral_bounds
from aol_jax._src.certification import protocol
from support.certification import trained_like

CONVS = [  # (in, out, kernel, strides, dilation, groups, padding, input spatial size)
    (3, 4, (3, 3), (1, 1), (1, 1), 1, "SAME", (6, 5)),
    (4, 4, (3, 3), (2, 2), (1, 1), 2, "SAME", (7, 7)),
    (2, 4, (3, 2), (1, 1), (2, 1), 1, "VALID", (8, 6)),
    (2, 2, (3, 3), (1, 1), (1, 1), 1, "CIRCULAR", (5, 5)),
    (2, 3, (2, 3), (1, 2), (1, 1), 1, ((1, 0), (2, 2)), (5, 6)),
]


@pytest.mark.parametrize("case", CONVS, ids=str)
def test_frozen_conv_states_at_least_its_exact_norm_and_at_most_schur(case):
  """Strided, dilated, grouped, zero-padded and circular: the frozen layer's stated bound is
  >= the exact norm of the map it applies (SVD of its explicit matrix), <= the Schur bound."""
  c_in, c_out, ksize, strides, dilation, groups, padding, size = case
  layer = aol_jax.AOLConv(c_in, c_out, ksize, strides, padding=padding,
                          kernel_dilation=dilation, feature_group_count=groups,
                          use_bias=False, rngs=nnx.Rngs(0))
  trained_like(layer, 0.4, seed=sum(size))
  frozen = aol_jax.freeze(layer, dtype=jnp.float32)
  with jax.default_matmul_precision("highest"):
    exact = lipschitz.operator_norm(lambda x: frozen(x[None])[0], (*size, c_in))
  stated = frozen.lipschitz_bound()
  schur = spectral_bounds.conv_row_sum_bound(np.asarray(frozen.applied_kernel(), np.float64),
                                            feature_group_count=groups)
  print(f"{case}: exact {exact:.6f} <= stated {stated:.6f} <= schur {schur:.6f}")
  assert exact <= stated <= schur


def test_frozen_dense_states_within_five_percent():
  layer = trained_like(aol_jax.AOLDense(24, 40, rngs=nnx.Rngs(0)), 0.3, seed=3)
  frozen = aol_jax.freeze(layer, dtype=jnp.float32)
  exact = np.linalg.svd(np.asarray(frozen.applied_kernel(), np.float64), compute_uv=False)[0]
  stated = frozen.lipschitz_bound()
  assert exact <= stated <= exact * 1.05
  assert stated < spectral_bounds.dense_row_sum_bound(np.asarray(frozen.applied_kernel(), np.float64))


def _linear_network(seed: int) -> aol_jax.AOLNetwork:
  """Convs (strided, grouped) then dense layers, no activation: its Jacobian is its matrix."""
  rngs = nnx.Rngs(seed)
  layers = [aol_jax.AOLConv(2, 4, (3, 3), padding="SAME", rngs=rngs),
            aol_jax.AOLConv(4, 4, (3, 3), (2, 2), feature_group_count=2, rngs=rngs),
            aol_jax.Flatten(), aol_jax.AOLDense(36, 20, rngs=rngs),
            aol_jax.AOLDense(20, 10, rngs=rngs)]
  return trained_like(aol_jax.AOLNetwork(layers), 0.3, seed=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_frozen_network_bound_is_above_its_exact_norm(seed):
  """End to end: the product of the frozen layers' bounds (what certify_dataset uses) is >=
  the exact norm of the frozen linear network (SVD of its Jacobian) and below 1 (what the
  network stated before freezing), where the Schur product is not."""
  frozen = aol_jax.freeze(_linear_network(seed), dtype=jnp.float32)
  with jax.default_matmul_precision("highest"):
    exact = lipschitz.operator_norm(lambda x: frozen(x[None])[0], (6, 6, 2))
  stated = protocol.lipschitz_bound(frozen)
  print(f"seed {seed}: exact {exact:.6f} <= stated {stated:.6f}")
  assert exact <= stated < 1.0
  assert stated == pytest.approx(frozen.lipschitz_bound(), rel=0, abs=0)


def test_frozen_nonlinear_network_bound_is_above_its_local_norms():
  """With MaxMin: the stated L of the frozen network is >= the norm of its Jacobian at many
  inputs (power iteration's truth, a lower bound on the Lipschitz constant)."""
  from support.certification import tiny_std_model  # noqa: PLC0415
  frozen = aol_jax.freeze(trained_like(tiny_std_model(), 0.3, seed=5), dtype=jnp.float32)
  stated = protocol.lipschitz_bound(frozen)
  xs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1))
  worst = 0.0
  with jax.default_matmul_precision("highest"):
    for x in xs:
      jac = jax.jacobian(lambda v: frozen(v[None])[0])(x).reshape(10, -1)
      worst = max(worst, float(np.linalg.svd(np.asarray(jac, np.float64),
                                             compute_uv=False)[0]))
  print(f"largest local norm {worst:.6f} <= stated {stated:.6f}")
  assert worst <= stated < 1.0
