"""freeze: same outputs, kernels precomputed and no longer trainable, original untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aol_jax._src import blocks
from aol_jax._src.freeze import freeze
from aol_jax._src.layers import AOLConv, AOLDense, RescaledKernel


def _normal(key, shape, dtype):
  """Standard normal kernels from numpy: jax.random.normal compiles for about a second per
  shape at XLA's default level (make test-isa), and the draw is not what is tested here."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  return jnp.asarray(rng.normal(size=shape), dtype)


class _Net(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.conv1 = AOLConv(3, 4, (3, 3), kernel_init=_normal, param_dtype=param_dtype, rngs=rngs)
    self.conv2 = AOLConv(4, 4, (2, 2), 2, padding="CIRCULAR", feature_group_count=2,
                         kernel_init=_normal, param_dtype=param_dtype, rngs=rngs)
    self.act = blocks.MaxMin()
    self.dense = nnx.List([
        AOLDense(36, 10, kernel_init=_normal, param_dtype=param_dtype, rngs=rngs),
        AOLDense(10, 10, param_dtype=param_dtype, rngs=rngs)])

  def __call__(self, x):
    x = self.act(self.conv2(self.act(self.conv1(x))))
    x = blocks.Flatten()(x)
    return self.dense[1](self.act(self.dense[0](x)))


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_freeze_gives_the_same_outputs(param_dtype):
  model = _Net(nnx.Rngs(0), param_dtype)
  before = jax.tree.map(np.asarray, nnx.state(model))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
  frozen = freeze(model)
  y = nnx.jit(lambda m, v: m(v))(model, x)
  y_frozen = nnx.jit(lambda m, v: m(v))(frozen, x)
  # Same kernels in the same dtype; only where the rescaling runs changes, so float32 ulps.
  np.testing.assert_allclose(y_frozen, y, rtol=1e-5, atol=1e-5)
  for layer, frozen_layer in [(model.conv1, frozen.conv1), (model.dense[0], frozen.dense[0])]:
    assert frozen_layer.kernel[...].dtype == param_dtype
    np.testing.assert_allclose(frozen_layer.kernel[...].astype(jnp.float32),
                               jax.jit(layer.rescale)(layer.kernel[...]).astype(jnp.float32),
                               rtol=1e-6, atol=1e-7)
  # The original is unchanged: still raw Params with the same values.
  assert all(type(l.kernel) is nnx.Param for l in (model.conv1, model.conv2, *model.dense))
  after = jax.tree.map(np.asarray, nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_frozen_kernels_are_not_params():
  frozen = freeze(_Net(nnx.Rngs(0)))
  for layer in (frozen.conv1, frozen.conv2, *frozen.dense):
    assert isinstance(layer.kernel, RescaledKernel)
    assert not isinstance(layer.kernel, nnx.Param)
    assert isinstance(layer.bias, nnx.Param)
  params = nnx.state(frozen, nnx.Param)
  paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert paths and not any("kernel" in p for p in paths)
  # Gradients w.r.t. Params no longer reach the kernels.
  x = jnp.ones((1, 6, 6, 3))
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)), argnums=nnx.DiffState(0, nnx.Param)))(frozen)
  assert not any("kernel" in "/".join(map(str, p))
                 for p, _ in jax.tree_util.tree_leaves_with_path(grads))


def test_freeze_is_idempotent_and_frozen_layers_run_the_certified_evaluation():
  model = _Net(nnx.Rngs(1))
  once = freeze(model)
  twice = freeze(once)
  np.testing.assert_array_equal(once.conv1.kernel[...], twice.conv1.kernel[...])
  # A frozen call contains no rescaling: the kernel enters the chunked dot products of the
  # certified evaluation (aol_jax._src.patches), kept apart by optimization barriers.
  layer = freeze(AOLConv(2, 2, 3, rngs=nnx.Rngs(0)))
  jaxpr = str(jax.make_jaxpr(lambda v: layer(v))(jnp.ones((1, 5, 2))))
  assert "rsqrt" not in jaxpr and "conv_general_dilated" not in jaxpr
  assert "dot_general" in jaxpr and "optimization_barrier" in jaxpr


def test_freeze_of_a_single_layer():
  layer = AOLDense(4, 3, kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  frozen = freeze(layer)
  x = jnp.ones((2, 4))
  np.testing.assert_allclose(frozen(x), layer(x), rtol=1e-6, atol=1e-6)
  assert isinstance(frozen.kernel, RescaledKernel) and isinstance(layer.kernel, nnx.Param)


def test_freeze_into_float32_widens_bfloat16_before_rescaling():
  """freeze(dtype=float32): bfloat16 raw kernels are rescaled in float32 and kept there, and
  a bfloat16 compute dtype is cleared, so the copy computes in float32."""
  model = _Net(nnx.Rngs(0), jnp.bfloat16)
  for _, layer in nnx.iter_modules(model):
    if isinstance(layer, (AOLConv, AOLDense)):
      layer.dtype = jnp.bfloat16
  frozen = freeze(model, dtype=jnp.float32)
  layers = [l for _, l in nnx.iter_modules(frozen) if isinstance(l, (AOLConv, AOLDense))]
  assert all(l.kernel[...].dtype == jnp.float32 and l.dtype is None for l in layers)
  # The reference: the same (exactly widened) raw parameters built in float32.
  reference = _Net(nnx.Rngs(0), jnp.float32)
  nnx.update(reference, jax.tree.map(lambda a: a.astype(jnp.float32),
                                     nnx.state(model, nnx.Param)))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 3)), jnp.float32)
  y = nnx.jit(lambda m, v: m(v))(frozen, x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, nnx.jit(lambda m, v: m(v))(freeze(reference), x), rtol=1e-6,
                             atol=1e-6)
  assert model.dense[0].kernel[...].dtype == jnp.bfloat16  # the original is untouched


@pytest.mark.parametrize("value", [np.zeros(3), [1, 2], None])
def test_freeze_refuses_what_is_not_a_module(value):
  with pytest.raises(ValueError, match="nnx.Module"):
    freeze(value)


def _float64_rescaled(kernel: np.ndarray, groups: int = 1) -> np.ndarray:
  """The AOL-rescaled kernel recomputed in float64 NumPy (dense or conv, per group)."""
  k = np.asarray(kernel, np.float64)
  if k.ndim == 2:
    d = (np.abs(k @ k.T).sum(1) + 1e-6) ** -0.5
    return k * d[:, None]
  taps, (cin_g, cout) = int(np.prod(k.shape[:-2])), k.shape[-2:]
  flat = k.reshape(taps, cin_g, cout)
  ksize = k.shape[:-2]
  pos = np.array(list(np.ndindex(*ksize))).reshape(taps, -1)
  out = np.empty_like(k)
  cg = cout // groups
  for grp in range(groups):
    part = flat[..., grp * cg:(grp + 1) * cg]
    grams = {}
    for t in range(taps):
      for u in range(taps):
        s = tuple(pos[t] - pos[u])
        grams[s] = grams.get(s, 0) + part[t] @ part[u].T
    d = (sum(np.abs(g) for g in grams.values()).sum(1) + 1e-6) ** -0.5
    out[..., grp * cg:(grp + 1) * cg] = k[..., grp * cg:(grp + 1) * cg] * d[:, None]
  return out


@pytest.mark.parametrize("gram_precision", ["default", "high", "highest", "bfloat16"])
def test_frozen_kernels_are_float32_exact_whatever_the_gram_precision(gram_precision):
  """freeze ignores gram_precision: every frozen kernel matches a float64 recomputation to
  float32 accuracy (relative 1e-5 ~ 80 ulp), which a bfloat16 Gram (3 significant digits)
  cannot reach."""
  model = _Net(nnx.Rngs(3))
  for _, layer in nnx.iter_modules(model):
    if isinstance(layer, (AOLConv, AOLDense)):
      layer.gram_precision = gram_precision
  frozen = freeze(model)
  for raw, got in [(model.conv1, frozen.conv1), (model.conv2, frozen.conv2),
                   (model.dense[0], frozen.dense[0]), (model.dense[1], frozen.dense[1])]:
    want = _float64_rescaled(raw.kernel[...], getattr(raw, "feature_group_count", 1))
    np.testing.assert_allclose(got.kernel[...], want, rtol=1e-5, atol=1e-7)
