"""A convolution as slices and chunked dot products: the same map as conv_general_dilated,
for every geometry, and sums that the compiler cannot merge back into one long chain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aol_jax._src import padding, patches

GEOMETRIES = [  # (kernel, strides, dilation, padding, groups, spatial size)
    ((3, 3), (1, 1), (1, 1), "SAME", 1, (6, 5)),
    ((3, 3), (2, 2), (1, 1), "SAME", 2, (7, 7)),
    ((3, 2), (1, 1), (2, 1), "VALID", 1, (8, 6)),
    ((3, 3), (1, 1), (1, 1), "CIRCULAR", 1, (5, 5)),
    ((5, 5), (1, 1), (1, 1), "CIRCULAR", 1, (3, 3)),  # the kernel wraps around the input
    ((2, 3), (1, 2), (1, 1), ((1, 0), (2, 2)), 1, (5, 6)),
    ((3,), (2,), (2,), "SAME", 1, (9,)),
    ((2, 2, 2), (1, 1, 1), (1, 1, 1), "SAME", 2, (3, 4, 3)),
]


@pytest.mark.parametrize("case", GEOMETRIES, ids=str)
def test_conv_as_dot_is_the_convolution(case):
  ksize, strides, dilation, pad, groups, size = case
  rng = np.random.default_rng(len(size))
  x = jnp.asarray(rng.normal(size=(2, *size, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(*ksize, 4 // groups, 6)), jnp.float32)
  cols = patches.conv_patches(x, ksize, strides=strides, dilation=dilation,
                              padding=padding.normalize_padding(pad, len(ksize)))
  y, depth = patches.conv_as_dot(cols, kernel, groups, jnp.float32)
  nd = len(ksize)
  spatial = "DHW"[3 - nd:]
  xx, pp = x, pad
  if pad == "CIRCULAR":
    xx, pp = padding.circular_pad(x, ksize, dilation), "VALID"
  want = jax.lax.conv_general_dilated(
      xx, kernel, strides, pp, rhs_dilation=dilation, feature_group_count=groups,
      dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"), precision="highest")
  assert y.shape == want.shape
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
  n = int(np.prod(ksize)) * 4 // groups
  assert depth <= n  # never deeper than one chain of n terms


@pytest.mark.parametrize("target", ["cpu", "h100:1"])
def test_the_partial_sums_stay_apart_after_compilation(target):
  """The compiled program keeps the partial sums apart: a dot with the chunk axis as a batch
  dimension, then a reduction over it (merged into one dot, an output would be one chain of
  n terms and the bound of depth c + k - 1 would not hold). Compiled for this CPU and for an
  H100 (the CUDA plugin, ahead of time)."""
  from benchmarks import compile_targets
  x = jax.ShapeDtypeStruct((8, 1024), jnp.float32)
  w = jax.ShapeDtypeStruct((1024, 4), jnp.float32)
  fn = jax.jit(lambda a, b: patches.dense_as_dot(a, b, jnp.float32)[0])
  if target == "cpu":
    hlo = fn.lower(x, w).compile().as_text()
  else:
    device = compile_targets.target_devices(target)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    w = jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding)
    hlo = fn.trace(x, w).lower().compile().as_text()
  dots = [l for l in hlo.splitlines() if " dot(" in l or "custom-call" in l and "gemm" in l]
  assert any("f32[16,8,4]" in l for l in dots), dots
  assert " reduce(" in hlo, "no reduction of the partial sums"
  out, depth = patches.dense_as_dot(jnp.ones((8, 1024)), jnp.ones((1024, 4)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(out), 1024.0)
  assert depth == 64 + 16 - 1
