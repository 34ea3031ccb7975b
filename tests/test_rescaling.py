"""The pure AOL functions against a slow, loop-based float64 transcription of the formulas.

The reference implementations below follow the AOL paper (Prach & Lampert, ECCV 2022), Theorem 1
(dense: d_i = (sum_j |P P^T|_ij + eps)^-1/2) and Theorem 2 (conv: the same row sums over the
Gram kernel |K^T * K|), literally
(including the SLL ``q`` weights and per-group rescaling) and share no code with
``aol_jax.rescaling``.
"""

import itertools

import aol_jax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aol_jax._src import rescaling
from aol_jax._src.rescaling import conv_factors, conv_gram, dense_factors, rescale_conv, rescale_dense

EPS = 1e-6
# Factors are computed in float32: sums of |G| over at most ~10^4 non-negative terms after
# products with cancellation. A relative error of 1e-5 (~170 ulp) covers that with margin;
# any formula slip (a missed offset, group or q) is off by far more.
RTOL = 1e-5


def slow_gram(kernel: np.ndarray) -> dict:
  """G[s][i, j] = sum_{p, o} K[p, i, o] * K[p + s, j, o] (AOL, Theorem 2), by loops."""
  k = np.asarray(kernel, np.float64)
  ksize = k.shape[:-2]
  c_in = k.shape[-2]
  gram = {}
  for s in itertools.product(*[range(-(n - 1), n) for n in ksize]):
    g = np.zeros((c_in, c_in))
    for p in itertools.product(*[range(n) for n in ksize]):
      ps = tuple(a + b for a, b in zip(p, s))
      if not all(0 <= v < n for v, n in zip(ps, ksize)):
        continue
      for i in range(c_in):
        for j in range(c_in):
          g[i, j] += np.dot(k[p + (i,)], k[ps + (j,)])
    gram[s] = g
  return gram


def slow_conv_factors(kernel, q=None, groups: int = 1, eps: float = EPS) -> np.ndarray:
  """d_c = (sum_{s, j} |G[s, i, j]| q_j / q_i + eps)^-1/2 per group, c = group * cin_g + i."""
  k = np.asarray(kernel, np.float64)
  cin_g, cout = k.shape[-2:]
  cout_g = cout // groups
  q = np.ones(cin_g * groups) if q is None else np.asarray(q, np.float64)
  d = np.zeros(cin_g * groups)
  for grp in range(groups):
    gram = slow_gram(k[..., grp * cout_g:(grp + 1) * cout_g])
    qg = q[grp * cin_g:(grp + 1) * cin_g]
    for i in range(cin_g):
      total = 0.0
      for g in gram.values():
        for j in range(cin_g):
          total += abs(g[i, j]) * qg[j] / qg[i]
      d[grp * cin_g + i] = (total + eps) ** -0.5
  return d


def slow_dense_factors(kernel, q=None, eps: float = EPS) -> np.ndarray:
  """d_i = (sum_j |P P^T|_ij q_j / q_i + eps)^-1/2 (AOL, Theorem 1), by loops."""
  p = np.asarray(kernel, np.float64)
  n = p.shape[0]
  q = np.ones(n) if q is None else np.asarray(q, np.float64)
  d = np.zeros(n)
  for i in range(n):
    total = 0.0
    for j in range(n):
      total += abs(sum(p[i, o] * p[j, o] for o in range(p.shape[1]))) * q[j] / q[i]
    d[i] = (total + eps) ** -0.5
  return d


def draw_conv_kernel(seed: int, max_taps: int = 27):
  """A random conv kernel (1-3 spatial dims) with a random group count, and a random q."""
  rng = np.random.default_rng(seed)
  nd = 1 + seed % 3
  while True:
    ksize = tuple(int(v) for v in rng.integers(1, (6, 5, 4)[nd - 1], size=nd))
    if np.prod(ksize) <= max_taps:
      break
  g = int(rng.choice([1, 1, 2, 3]))
  cin_g = int(rng.integers(1, 5))
  cout = g * int(rng.integers(1, 4))
  kernel = rng.normal(size=(*ksize, cin_g, cout)) * rng.lognormal(size=(cin_g, 1))
  q = rng.uniform(0.2, 3.0, size=cin_g * g)
  return kernel.astype(np.float32), g, q.astype(np.float32)


@pytest.mark.parametrize("seed", range(24))
def test_conv_factors_match_loop_formula(seed):
  kernel, g, q = draw_conv_kernel(seed)
  want = slow_conv_factors(kernel, groups=g)
  want_q = slow_conv_factors(kernel, q=q, groups=g)
  for method in rescaling.GRAM_METHODS:
    fn = jax.jit(lambda k, qq, m=method: (
        conv_factors(k, feature_group_count=g, method=m),
        conv_factors(k, q=qq, feature_group_count=g, method=m)))
    got, got_q = fn(kernel, q)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(got_q, want_q, rtol=RTOL)
  # The weighted factors really differ from AOL's when q is not constant.
  if kernel.shape[-2] > 1:
    assert not np.allclose(want, want_q, rtol=1e-3)


@pytest.mark.parametrize("seed", range(12))
def test_dense_factors_match_loop_formula(seed):
  rng = np.random.default_rng(100 + seed)
  n_in, n_out = (int(v) for v in rng.integers(1, 9, size=2))
  kernel = (rng.normal(size=(n_in, n_out)) * rng.lognormal(size=(n_in, 1))).astype(np.float32)
  q = rng.uniform(0.2, 3.0, size=n_in).astype(np.float32)
  got, got_q = jax.jit(lambda k, qq: (dense_factors(k), dense_factors(k, q=qq)))(kernel, q)
  np.testing.assert_allclose(got, slow_dense_factors(kernel), rtol=RTOL)
  np.testing.assert_allclose(got_q, slow_dense_factors(kernel, q=q), rtol=RTOL)
  # Eager (q checked for positivity) and traced q give the same result.
  np.testing.assert_allclose(dense_factors(kernel, q=q), got_q, rtol=1e-6)


def test_constant_q_is_aol():
  kernel, g, _ = draw_conv_kernel(7)
  q = jnp.full(kernel.shape[-2] * g, 3.5)
  np.testing.assert_allclose(conv_factors(kernel, q=q, feature_group_count=g),
                             conv_factors(kernel, feature_group_count=g), rtol=1e-6)


@pytest.mark.parametrize("seed", range(30))
def test_gram_methods_agree_with_each_other_and_the_loops(seed):
  kernel, g, _ = draw_conv_kernel(1000 + seed, max_taps=64)
  by_conv = np.asarray(jax.jit(lambda k: conv_gram(k, feature_group_count=g, method="conv"))(kernel))
  by_taps = np.asarray(jax.jit(lambda k: conv_gram(k, feature_group_count=g, method="taps"))(kernel))
  nd = kernel.ndim - 2
  cin_g, cout = kernel.shape[-2:]
  want_shape = (*[2 * k - 1 for k in kernel.shape[:nd]], cin_g, cin_g)
  assert by_conv.shape == by_taps.shape == ((g,) if g > 1 else ()) + want_shape
  # Entries are sums of products with cancellation: compare against the size of the terms.
  scale = np.abs(kernel).max() ** 2 * np.prod(kernel.shape[:nd]) * cout
  np.testing.assert_allclose(by_conv, by_taps, rtol=0, atol=1e-6 * scale)
  grams = by_conv.reshape((g,) + want_shape)
  cout_g = cout // g
  for grp in range(g):
    ref = slow_gram(kernel[..., grp * cout_g:(grp + 1) * cout_g])
    for s, block in ref.items():
      # conv_gram documents G[s, i, j] = sum K[p + s, i, o] K[p, j, o] (what the
      # conv_general_dilated self-convolution returns); the paper's formula indexes the transpose,
      # G_paper[s] = G[s]^T. Both have the same |.| sums, hence the same factors.
      idx = tuple(a + k - 1 for a, k in zip(s, kernel.shape[:nd]))
      np.testing.assert_allclose(grams[grp][idx], block.T, rtol=0, atol=1e-6 * scale)


def test_gram_is_symmetric_under_offset_reversal():
  kernel, _, _ = draw_conv_kernel(5)
  gram = np.asarray(conv_gram(kernel))
  nd = kernel.ndim - 2
  flipped = np.swapaxes(gram[(slice(None, None, -1),) * nd], -1, -2)
  np.testing.assert_allclose(gram, flipped, rtol=1e-6, atol=1e-6)


def test_default_method_is_a_known_one():
  assert rescaling.DEFAULT_GRAM_METHOD in rescaling.GRAM_METHODS


@pytest.mark.parametrize("shape", [(8, 8), (3, 8), (1, 5)])
def test_orthogonal_dense_kernel_passes_unchanged(shape):
  """Orthonormal rows (in <= out) give P P^T = I, so every factor is (1 + eps)^-1/2."""
  ortho = jax.nn.initializers.orthogonal()(jax.random.key(3), shape, jnp.float32)
  np.testing.assert_allclose(ortho @ ortho.T, np.eye(shape[0]), atol=1e-6)
  d = jax.jit(dense_factors)(ortho)
  np.testing.assert_allclose(d, 1.0, atol=1e-5)
  np.testing.assert_allclose(jax.jit(rescale_dense)(ortho), ortho, atol=1e-5)


@pytest.mark.parametrize("nd,cin,cout,g", [(1, 4, 4, 1), (2, 8, 8, 1), (2, 3, 6, 1),
                                           (3, 5, 5, 1), (2, 4, 8, 2), (1, 6, 6, 3)])
def test_orthogonal_1x1_conv_kernel_passes_unchanged(nd, cin, cout, g):
  keys = jax.random.split(jax.random.key(nd * 10 + cin), g)
  blocks = [jax.nn.initializers.orthogonal()(k, (cin // g, cout // g)) for k in keys]
  kernel = jnp.concatenate(blocks, axis=-1).reshape((1,) * nd + (cin // g, cout))
  for method in rescaling.GRAM_METHODS:
    fn = jax.jit(lambda k, m=method: (conv_factors(k, feature_group_count=g, method=m),
                                      rescale_conv(k, feature_group_count=g, method=m)))
    d, rescaled = fn(kernel)
    np.testing.assert_allclose(d, 1.0, atol=1e-5)
    np.testing.assert_allclose(rescaled, kernel, atol=1e-5)


def test_identity_centre_tap_conv_kernel_passes_unchanged():
  kernel = jnp.zeros((3, 3, 4, 4)).at[1, 1].set(jnp.eye(4))
  np.testing.assert_allclose(conv_factors(kernel), 1.0, atol=1e-5)


def test_jit_and_eager_agree():
  kernel, g, q = draw_conv_kernel(11)
  eager = rescale_conv(kernel, q=q, feature_group_count=g)
  jitted = jax.jit(lambda k, qq: rescale_conv(k, q=qq, feature_group_count=g))(kernel, q)
  np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-7)
  dense = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  np.testing.assert_allclose(rescale_dense(dense), jax.jit(rescale_dense)(dense),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(dtype):
  """Computation in float32 at least; the rescaled kernel comes back in the parameter dtype."""
  kernel, g, _ = draw_conv_kernel(4)
  k = jnp.asarray(kernel, dtype)
  assert conv_factors(k, feature_group_count=g).dtype == jnp.float32
  assert conv_gram(k, feature_group_count=g).dtype == jnp.float32
  assert rescale_conv(k, feature_group_count=g).dtype == dtype
  assert rescale_dense(k.reshape(-1, k.shape[-1])).dtype == dtype
  # The factors of a bf16 kernel are those of its (exact) float32 upcast.
  np.testing.assert_allclose(conv_factors(k, feature_group_count=g),
                             slow_conv_factors(np.asarray(k, np.float64), groups=g), rtol=RTOL)


@pytest.mark.parametrize("fn,shape", [
    (lambda k: rescale_dense(k), (4, 3)),
    (lambda k: rescale_conv(k), (3, 3, 2, 4)),
    (lambda k: rescale_conv(k, method="conv"), (2, 2, 2, 2, 3)),
    (lambda k: rescale_conv(k, feature_group_count=2), (3, 1, 4)),
])
def test_zero_kernel_is_finite_with_finite_gradients(fn, shape):
  zero = jnp.zeros(shape)
  out = jax.jit(fn)(zero)
  assert np.all(np.isfinite(out)) and np.all(out == 0)
  grad = jax.jit(jax.grad(lambda k: jnp.sum(fn(k) ** 2) + jnp.sum(fn(k))))(zero)
  assert np.all(np.isfinite(grad))
  rng_kernel = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  grad = jax.jit(jax.grad(lambda k: jnp.sum(fn(k) ** 2)))(rng_kernel)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


# ---- bad inputs --------------------------------------------------------------------------

@pytest.mark.parametrize("fn,shape", [
    (rescale_dense, (3,)), (rescale_dense, (2, 3, 4)), (dense_factors, ()),
    (rescale_conv, (3, 4)), (conv_factors, (3,)), (conv_gram, (1, 1, 1, 1, 2, 2)),
])
def test_wrong_kernel_rank(fn, shape):
  with pytest.raises(ValueError, match="must have rank"):
    fn(jnp.ones(shape))


@pytest.mark.parametrize("fn,shape", [
    (rescale_dense, (0, 3)), (dense_factors, (3, 0)), (rescale_conv, (0, 3, 2, 2)),
    (conv_factors, (3, 3, 0, 2)), (conv_gram, (3, 2, 0)),
])
def test_zero_sized_kernel_dim(fn, shape):
  with pytest.raises(ValueError, match="zero-sized dimension"):
    fn(jnp.ones(shape))


def test_integer_kernel_is_refused():
  with pytest.raises(ValueError, match="floating-point"):
    rescale_dense(jnp.ones((2, 2), jnp.int32))


@pytest.mark.parametrize("q", [[1.0, 0.0, 1.0], [1.0, -2.0, 1.0]])
def test_non_positive_q(q):
  with pytest.raises(ValueError, match="strictly positive"):
    dense_factors(jnp.ones((3, 2)), q=jnp.asarray(q))
  with pytest.raises(ValueError, match="strictly positive"):
    rescale_conv(jnp.ones((2, 3, 2)), q=jnp.asarray(q))


@pytest.mark.parametrize("q_shape", [(2,), (4,), (3, 1), ()])
def test_wrong_q_shape(q_shape):
  with pytest.raises(ValueError, match="one weight per input"):
    dense_factors(jnp.ones((3, 2)), q=jnp.ones(q_shape))
  with pytest.raises(ValueError, match="one weight per input"):
    conv_factors(jnp.ones((2, 3, 2)), q=jnp.ones(q_shape))


def test_q_shape_counts_all_groups():
  kernel = jnp.ones((3, 2, 4))  # 2 groups of 2 input channels each
  assert conv_factors(kernel, q=jnp.ones(4), feature_group_count=2).shape == (4,)
  with pytest.raises(ValueError, match="one weight per input"):
    conv_factors(kernel, q=jnp.ones(2), feature_group_count=2)


@pytest.mark.parametrize("g", [0, -1, 3])
def test_groups_must_divide_channels(g):
  with pytest.raises(ValueError, match="feature_group_count"):
    rescale_conv(jnp.ones((3, 2, 4)), feature_group_count=g)
  with pytest.raises(ValueError, match="feature_group_count"):
    conv_gram(jnp.ones((3, 2, 4)), feature_group_count=g)


def test_unknown_gram_method():
  with pytest.raises(ValueError, match="Unknown Gram method"):
    conv_gram(jnp.ones((3, 2, 4)), method="fft")


def test_every_public_function_called_eagerly_compiles_one_program():
  """Called eagerly (outside jax.jit), each path of the public functions compiles as one
  program, not operation by operation (65 compiles for a conv kernel's factors before)."""
  compiles = []
  listen = lambda name, *_, **__: compiles.append(name) if name == (
      "/jax/core/compile/backend_compile_duration") else None
  rng = np.random.default_rng(11)
  kernel = jnp.asarray(rng.normal(size=(3, 2, 5, 9)), jnp.float32)  # shapes no other test uses
  grouped = jnp.asarray(rng.normal(size=(3, 2, 5, 3)), jnp.float32)
  dense = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
  q = rng.lognormal(size=5)
  calls = {"conv": lambda: conv_factors(kernel),
           "conv, q": lambda: conv_factors(kernel, q=q),
           "conv, method='conv'": lambda: conv_factors(kernel, method="conv"),
           "conv, groups": lambda: rescale_conv(grouped, feature_group_count=3),
           "rescale_conv": lambda: rescale_conv(kernel, eps=1e-3),
           "conv_gram": lambda: conv_gram(kernel, gram_precision="default"),
           "dense": lambda: dense_factors(dense),
           "dense, q": lambda: dense_factors(dense, q=q),
           "rescale_dense": lambda: rescale_dense(dense, gram_precision="bfloat16"),
           "dense_gram": lambda: aol_jax.dense_gram(dense)}
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    for name, call in calls.items():
      compiles.clear()
      jax.block_until_ready(call())
      assert len(compiles) == 1, (name, len(compiles))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
