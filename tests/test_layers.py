"""AOLDense / AOLConv: the 1-Lipschitz guarantee against the exact operator norm.

Every case builds the layer's explicit matrix (its Jacobian, exact for a linear map) and
takes its largest singular value in float64 (``lipschitz.operator_norm``). Cases are drawn
deterministically from a seeded numpy RNG over kernel sizes, channels, groups, strides,
dilations, paddings, 1-3 spatial dims and float32 / bfloat16 parameters.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src import lipschitz, rescaling, spectral_bounds
from aol_jax._src.certification import protocol
from aol_jax._src.layers import AOLConv, AOLDense, RescaledKernel
from support.certification import trained_like

# float32 tolerance: the factors and the rescaled kernel are computed in float32, so the
# applied kernel is the exactly-rescaled one up to a relative error of a few hundred ulp at
# most (sums of up to ~10^4 terms, then rsqrt and one product; u = 2^-24 ~ 6e-8), i.e. the
# norm is <= 1 + O(1e-6). 1e-5 keeps a margin of ten over that; a real defect in the bound
# (a missed tap, offset or group) overshoots by orders of magnitude more.
TOL = 1e-5

PADDINGS = ("SAME", "VALID", "int", "ints", "pairs", "CIRCULAR", "same")
MAX_INPUTS = 600  # explicit matrices stay small: (outputs x <= 600) float64
N_CONV_CASES = 168  # 4 per (padding, rank, dtype) combination, 2 per scaled operand
SCALED_OPERANDS = ("kernel", "input")  # what the unfrozen call multiplies by the factors


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _draw_kernel(rng: np.random.Generator, shape) -> np.ndarray:
  kind = rng.choice(["normal", "scaled", "sparse", "uniform", "lowrank"])
  k = rng.normal(size=shape)
  if kind == "scaled":  # input/output channels on wildly different scales
    k *= rng.lognormal(sigma=2.0, size=shape[-2:])
  elif kind == "sparse":
    k *= rng.random(shape) < 0.3
    k.flat[rng.integers(k.size)] = 1.0  # never all zero
  elif kind == "uniform":
    k = rng.uniform(0.0, 1.0, size=shape)  # all-positive taps: no cancellation in the Gram
  elif kind == "lowrank":
    k = np.einsum("...i,o->...io", rng.normal(size=shape[:-1]), rng.normal(size=shape[-1]))
  return k


def _on_device(kernel: np.ndarray, dtype) -> jax.Array:
  """``kernel`` in ``dtype``, converted on the host (on the device, each shape's conversion
  would be a program of its own to compile)."""
  return jnp.asarray(np.asarray(kernel).astype(dtype))


def _out_size(n: int, k: int, s: int, d: int, padding, axis: int) -> int:
  """Output length of one spatial axis (lax conventions), computed independently of jax."""
  span = (k - 1) * d + 1
  if isinstance(padding, str):
    return -(-n // s) if padding.upper() in ("SAME", "CIRCULAR") else max(0, -(-(n - span + 1) // s))
  lo, hi = padding[axis]
  return max(0, (n + lo + hi - span) // s + 1)


def draw_conv_config(seed: int) -> dict:
  """One deterministic random AOLConv configuration; padding, rank, dtype and the scaled
  operand cycle with seed."""
  rng = np.random.default_rng(seed)
  padding_kind = PADDINGS[seed % len(PADDINGS)]
  nd = 1 + (seed // len(PADDINGS)) % 3
  dtype = (jnp.float32, jnp.bfloat16)[(seed // (3 * len(PADDINGS))) % 2]
  operand = SCALED_OPERANDS[(seed // (6 * len(PADDINGS))) % 2]
  while True:  # rejection-sample until the explicit matrix is small and the output non-empty
    ksize = tuple(int(v) for v in rng.integers(1, (6, 6, 4)[nd - 1], size=nd))
    c_in, c_out = (int(v) for v in rng.integers(1, 9, size=2))
    groups = int(rng.choice(_divisors(math.gcd(c_in, c_out))))
    strides = tuple(int(v) for v in rng.integers(1, 4, size=nd)) if rng.random() < 0.4 else (1,) * nd
    dilation = tuple(int(v) for v in rng.integers(1, 3, size=nd)) if rng.random() < 0.4 else (1,) * nd
    if padding_kind == "int":
      padding = int(rng.integers(0, 4))
      pairs = [(padding, padding)] * nd
    elif padding_kind == "ints":
      padding = [int(v) for v in rng.integers(0, 4, size=nd)]
      pairs = [(p, p) for p in padding]
    elif padding_kind == "pairs":
      padding = [tuple(int(v) for v in rng.integers(0, 4, size=2)) for _ in range(nd)]
      pairs = padding
    else:
      padding = pairs = padding_kind
    spatial = tuple(int(v) for v in rng.integers(1, (12, 8, 5)[nd - 1], size=nd))
    out = [_out_size(*a, pairs, i) for i, a in enumerate(zip(spatial, ksize, strides, dilation))]
    if (math.prod(spatial) * c_in > MAX_INPUTS or math.prod(out) == 0
        or math.prod(out) * c_out > 6 * MAX_INPUTS):
      continue
    kernel = _draw_kernel(rng, (*ksize, c_in // groups, c_out))
    return dict(c_in=c_in, c_out=c_out, ksize=ksize, strides=strides, padding=padding,
                dilation=dilation, groups=groups, dtype=dtype, spatial=spatial,
                out_spatial=tuple(out), kernel=kernel, operand=operand)


def draw_conv_case(seed: int) -> dict:
  """The drawn configuration as a layer (no bias, viewed with its scaled operand) and its
  unbatched input shape."""
  cfg = draw_conv_config(seed)
  layer = AOLConv(cfg["c_in"], cfg["c_out"], cfg["ksize"], cfg["strides"], padding=cfg["padding"],
                  kernel_dilation=cfg["dilation"], feature_group_count=cfg["groups"],
                  use_bias=False, param_dtype=cfg["dtype"],
                  kernel_init=lambda key, shape, dt: _on_device(cfg["kernel"], dt),
                  rngs=nnx.Rngs(0))
  layer = nnx.view(layer, scaled_operand=cfg["operand"])
  return dict(layer=layer, input_shape=(*cfg["spatial"], cfg["c_in"]), dtype=cfg["dtype"],
              out_shape=(*cfg["out_spatial"], cfg["c_out"]))


def _as_fn(layer, shapes: list | None = None):
  """The layer as a function of one unbatched input; records the output shape when traced."""
  def fn(x):
    y = layer(x[None])[0]
    if shapes is not None:
      shapes.append(y.shape)
    return y
  return fn


def _with_kernel(layer, kernel):
  """A copy of ``layer`` that applies ``kernel`` as is (no rescaling)."""
  copy = nnx.clone(layer)
  copy.kernel = RescaledKernel(jnp.asarray(kernel))
  return copy


def _tapwise_frobenius(delta: np.ndarray) -> float:
  """sum over taps t of ||delta[t]||_F: bounds the operator norm of a conv with ``delta``.

  The conv is sum_t S_t (x) delta[t] with S_t a shift / subsampling / wrap-around selection
  of norm <= 1, and ||delta[t]||_2 <= ||delta[t]||_F (also for block-diagonal groups).
  """
  taps = delta.reshape(-1, *delta.shape[-2:])
  return float(sum(np.linalg.norm(t) for t in taps))


def check_conv_case(case) -> float:
  layer, shape = case["layer"], case["input_shape"]
  shapes = []
  norm = lipschitz.operator_norm(_as_fn(layer, shapes), shape)
  assert shapes[-1] == case["out_shape"]  # the drawn case is the one measured
  if case["dtype"] == jnp.float32:
    assert norm <= 1 + TOL, norm
    return norm
  # bfloat16 parameters: the layer applies K16 = round_bf16(K32), K32 the float32 rescaled
  # kernel, whatever its scaled operand. By the triangle inequality ||A(K16)|| <= ||A(K32)||
  # + ||A(K16 - K32)||, and the conv with the difference kernel has norm <= sum_t
  # ||(K16 - K32)[t]||_F. So we check
  # ||A(K32)|| <= 1 + TOL and ||A(K16)|| <= 1 + TOL + that sum, a proven bound, computed
  # from the actual kernels.
  raw = layer.kernel[...]
  k32, k16 = jax.jit(lambda r: (
      rescaling.rescale_conv(r.astype(jnp.float32), feature_group_count=layer.feature_group_count),
      layer.rescale(r)))(raw)
  assert k16.dtype == jnp.bfloat16
  norm32 = lipschitz.operator_norm(_as_fn(_with_kernel(layer, k32)), shape)
  assert norm32 <= 1 + TOL, norm32
  slack = _tapwise_frobenius(np.asarray(k16, np.float64) - np.asarray(k32, np.float64))
  # bf16 keeps 8 significant bits: the slack is ~2^-9 of the kernel's size, never vacuous.
  assert slack <= 2.0 ** -8 * _tapwise_frobenius(np.asarray(k32, np.float64)) + 1e-12
  assert norm <= 1 + TOL + slack, (norm, slack)
  return norm


@pytest.mark.parametrize("seed", range(N_CONV_CASES))
def test_conv_operator_norm_at_most_one(seed):
  check_conv_case(draw_conv_case(seed))


def test_conv_cases_cover_the_grid():
  """The drawn cases include every padding, rank, dtype, even/rectangular kernels, etc."""
  cfgs = [draw_conv_config(seed) for seed in range(N_CONV_CASES)]
  assert {PADDINGS[s % len(PADDINGS)] for s in range(N_CONV_CASES)} == set(PADDINGS)
  assert {len(c["ksize"]) for c in cfgs} == {1, 2, 3}
  assert {jnp.dtype(c["dtype"]).name for c in cfgs} == {"float32", "bfloat16"}
  assert {(p, jnp.dtype(c["dtype"]).name, c["operand"]) for p, c in zip(
      (PADDINGS[s % len(PADDINGS)] for s in range(N_CONV_CASES)), cfgs)} == {
      (p, d, o) for p in PADDINGS for d in ("float32", "bfloat16") for o in SCALED_OPERANDS}
  assert {k for c in cfgs for k in c["ksize"]} == {1, 2, 3, 4, 5}
  assert {v for c in cfgs for v in c["strides"]} == {1, 2, 3}
  assert {v for c in cfgs for v in c["dilation"]} == {1, 2}
  assert {1, 2, 3, 4} <= {c["groups"] for c in cfgs}
  assert {len(set(c["ksize"])) > 1 for c in cfgs} == {True, False}
  assert {np.sign(c["c_in"] - c["c_out"]) for c in cfgs} == {-1, 0, 1}
  assert {c["c_in"] for c in cfgs} == set(range(1, 9)) == {c["c_out"] for c in cfgs}
  # Kernels wider than the input (taps fall entirely into the padding / wrap around).
  assert any(any(k > n for k, n in zip(c["ksize"], c["spatial"])) for c in cfgs)


def test_bound_is_not_vacuous():
  """Random layers reach well above 1/2; identity / orthogonal kernels sit at 1 exactly."""
  norms = [check_conv_case(draw_conv_case(seed)) for seed in (0, 2, 6, 8, 12)]
  # (A sparse kernel whose taps only ever meet padding has norm 0; that is allowed.)
  assert max(norms) > 0.9 and np.median(norms) > 0.5
  layer = AOLConv(4, 4, (3, 3), padding="SAME", use_bias=False, rngs=nnx.Rngs(0))  # identity init
  assert abs(lipschitz.operator_norm(_as_fn(layer), (5, 5, 4)) - 1) < 1e-5
  ortho = jax.nn.initializers.orthogonal()(jax.random.key(1), (6, 6))
  layer = AOLConv(6, 6, (1, 1), kernel_init=lambda *_: ortho[None, None], use_bias=False,
                  rngs=nnx.Rngs(0))
  assert abs(lipschitz.operator_norm(_as_fn(layer), (3, 4, 6)) - 1) < 1e-5


@pytest.mark.parametrize("seed", range(60))
def test_dense_operator_norm_at_most_one(seed):
  rng = np.random.default_rng(10_000 + seed)
  dtype = (jnp.float32, jnp.bfloat16)[seed % 2]
  n_in, n_out = (int(v) for v in rng.integers(1, (9, 65)[seed % 3 == 0], size=2))
  kernel = _draw_kernel(rng, (n_in, n_out)) * 10.0 ** rng.uniform(-3, 3)
  layer = AOLDense(n_in, n_out, use_bias=False, param_dtype=dtype,
                   kernel_init=lambda key, shape, dt: _on_device(kernel, dt), rngs=nnx.Rngs(0))
  operand = SCALED_OPERANDS[(seed // 2) % 2]
  layer = nnx.view(layer, scaled_operand=operand)
  norm = lipschitz.operator_norm(_as_fn(layer), (n_in,))
  w = np.asarray(jax.jit(layer.rescale)(layer.kernel[...]), np.float64)
  # The layer's matrix is its rescaled kernel; recomputed eagerly here, so equal up to float32
  # ulps from a different compilation (the bound itself is asserted below, not this).
  np.testing.assert_allclose(norm, np.linalg.norm(w, 2), rtol=1e-6)
  if dtype == jnp.float32:
    assert norm <= 1 + TOL
  else:  # same proven bound as for conv (one tap): ||W16|| <= ||W32|| + ||W16 - W32||_F
    w32 = np.asarray(jax.jit(rescaling.rescale_dense)(layer.kernel[...].astype(jnp.float32)),
                     np.float64)
    assert np.linalg.norm(w32, 2) <= 1 + TOL
    assert norm <= 1 + TOL + np.linalg.norm(w - w32)


@pytest.mark.parametrize("seed", range(16))
def test_q_weighted_rescaling_is_one_lipschitz(seed):
  """The SLL generalisation: any positive q gives a 1-Lipschitz conv."""
  case = draw_conv_case(7 * seed)
  layer = case["layer"]
  raw = layer.kernel[...].astype(jnp.float32)
  q = np.random.default_rng(seed).lognormal(sigma=1.5, size=layer.in_features)
  k = rescaling.rescale_conv(raw, q=q, feature_group_count=layer.feature_group_count)
  assert lipschitz.operator_norm(_as_fn(_with_kernel(layer, k)), case["input_shape"]) <= 1 + TOL


# ---- adversarial kernels -----------------------------------------------------------------

def _adversarial(loss_norm, kernel, steps: int):
  """Normalised gradient ascent on the rescaled layer's exact norm, differentiated through
  the rescaling; returns the raw kernel with the largest norm seen."""
  grad_fn = jax.jit(jax.value_and_grad(loss_norm))
  k, best, best_k = kernel, -1.0, kernel
  for _ in range(steps):
    value, g = grad_fn(k)
    if float(value) > best:
      best, best_k = float(value), k
    k = k + 0.05 * jnp.linalg.norm(k) * g / (jnp.linalg.norm(g) + 1e-30)
  return best_k


@pytest.mark.parametrize("n_in,n_out", [(6, 6), (8, 3), (2, 7)])
def test_dense_adversarial(n_in, n_out):
  kernel = jnp.asarray(np.random.default_rng(n_in).normal(size=(n_in, n_out)), jnp.float32)
  norm = lambda k: jnp.linalg.norm(rescaling.rescale_dense(k), ord=2)
  k = _adversarial(norm, kernel, steps=30)
  before, after = float(norm(kernel)), float(norm(k))
  assert after >= before  # the best iterate; equal when the start already sits at the bound
  layer = AOLDense(n_in, n_out, kernel_init=lambda *_: k, use_bias=False, rngs=nnx.Rngs(0))
  exact = lipschitz.operator_norm(_as_fn(layer), (n_in,))
  assert exact <= 1 + TOL
  assert exact > 0.9  # the ascent reached the neighbourhood of the bound


@pytest.mark.parametrize("ksize,c_in,c_out,spatial,padding,groups", [
    ((3, 3), 2, 3, (5, 5), "SAME", 1),
    ((2, 3), 3, 2, (4, 5), "CIRCULAR", 1),
    ((3,), 4, 4, (9,), "VALID", 2),
    ((2, 2, 2), 2, 2, (3, 3, 3), "SAME", 1),
])
def test_conv_adversarial(ksize, c_in, c_out, spatial, padding, groups):
  """Gradient ascent on the rescaled conv's exact norm (SVD of its Jacobian), then check."""
  rng = np.random.default_rng(sum(ksize) + c_in)
  kernel = jnp.asarray(rng.normal(size=(*ksize, c_in // groups, c_out)), jnp.float32)
  layer = AOLConv(c_in, c_out, ksize, padding=padding, feature_group_count=groups,
                  use_bias=False, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(_with_kernel(layer, kernel))
  treedef = jax.tree.structure(state)  # no bias: the kernel is the only leaf
  x0 = jnp.zeros((*spatial, c_in))

  def norm(k):
    # The frozen layer applying rescale(k): gradients flow through the rescaling.
    applied = nnx.merge(graphdef, jax.tree.unflatten(treedef, [layer.rescale(k)]))
    f = lambda x: applied(x.reshape(x0.shape)[None]).reshape(-1)
    return jnp.linalg.norm(jax.jacfwd(f)(x0.reshape(-1)), ord=2)

  k = _adversarial(norm, kernel, steps=12)
  before, after = float(norm(kernel)), float(norm(k))
  assert after > before
  attacked = AOLConv(c_in, c_out, ksize, padding=padding, feature_group_count=groups,
                     kernel_init=lambda *_: k, use_bias=False, rngs=nnx.Rngs(0))
  exact = lipschitz.operator_norm(_as_fn(attacked), (*spatial, c_in))
  assert exact <= 1 + TOL
  # The float64 SVD of the layer confirms the norm the ascent itself measured.
  np.testing.assert_allclose(exact, after, rtol=1e-5)


# ---- circular padding against the FFT toolbox --------------------------------------------

@pytest.mark.parametrize("ksize,c_in,c_out,spatial,dilation", [
    ((3, 3), 2, 3, (5, 6), 1), ((2,), 3, 3, (7,), 1), ((4, 3), 1, 2, (3, 3), 1),
    ((5,), 2, 2, (3,), 1), ((3, 2), 3, 1, (6, 4), 2), ((2, 2, 2), 2, 2, (3, 4, 3), 1),
])
def test_circular_norm_matches_fft(ksize, c_in, c_out, spatial, dilation):
  """SVD norm of the circular layer == max FFT singular value of its (dilated) kernel.

  Includes kernels larger than the input, where taps wrap around and add up.
  """
  rng = np.random.default_rng(len(ksize) * 7 + c_in)
  kernel = rng.normal(size=(*ksize, c_in, c_out)).astype(np.float32)
  layer = AOLConv(c_in, c_out, ksize, padding="CIRCULAR", kernel_dilation=dilation,
                  kernel_init=lambda *_: kernel, use_bias=False, rngs=nnx.Rngs(0))
  rescaled = np.asarray(layer.rescale(layer.kernel[...]), np.float64)
  dilated = np.zeros(tuple((k - 1) * dilation + 1 for k in ksize) + (c_in, c_out))
  dilated[(slice(None, None, dilation),) * len(ksize)] = rescaled
  sv = lipschitz.circular_conv_singular_values(dilated, spatial)
  fn = _as_fn(layer)
  exact = lipschitz.operator_norm(fn, (*spatial, c_in))
  np.testing.assert_allclose(exact, sv[0], rtol=1e-6)
  # All singular values agree, not only the largest.
  all_sv = np.linalg.svd(lipschitz.explicit_matrix(fn, (*spatial, c_in)), compute_uv=False)
  np.testing.assert_allclose(all_sv[:sv.size], sv, rtol=1e-5, atol=1e-6)
  assert exact <= 1 + TOL
  x = jnp.asarray(rng.normal(size=(*spatial, c_in)), jnp.float32)
  est = float(jax.jit(lambda v: lipschitz.power_iteration(fn, v, num_iters=300))(x))
  assert exact * (1 - 1e-3) <= est <= exact * (1 + 1e-5)


# ---- layer behaviour ---------------------------------------------------------------------

def test_jit_and_eager_agree():
  for layer, shape in [
      (AOLConv(4, 6, (3, 2), 2, padding="CIRCULAR", kernel_dilation=(1, 2), feature_group_count=2,
               kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(1)), (2, 7, 6, 4)),
      (AOLDense(5, 3, kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(3)), (4, 5))]:
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    eager = layer(x)
    jitted = nnx.jit(lambda m, v: m(v))(layer, x)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)


def test_batch_dims_and_unbatched_inputs():
  layer = AOLConv(2, 3, (3, 3), kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 5, 2)), jnp.float32)
  call = nnx.jit(lambda m, v: m(v))
  y = call(layer, x)
  assert y.shape == (2, 3, 5, 5, 3)
  np.testing.assert_allclose(y[1, 2], call(layer, x[1, 2]), rtol=1e-6, atol=1e-6)


def test_bias_is_added_and_unconstrained():
  layer = AOLDense(3, 2, bias_init=nnx.initializers.constant(5.0), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layer(jnp.zeros((1, 3))), 5.0)
  assert AOLDense(3, 2, use_bias=False, rngs=nnx.Rngs(0)).bias is None


@pytest.mark.parametrize("make,shape", [
    (lambda init: AOLDense(4, 3, kernel_init=init, rngs=nnx.Rngs(0)), (2, 4)),
    (lambda init: AOLConv(2, 4, (3, 3), kernel_init=init, rngs=nnx.Rngs(0)), (2, 5, 5, 2)),
    (lambda init: AOLConv(4, 4, 2, feature_group_count=2, padding="CIRCULAR", kernel_init=init,
                          rngs=nnx.Rngs(0)), (2, 6, 4)),
])
@pytest.mark.parametrize("init", ["zeros", "normal"])
def test_gradients_are_finite(make, shape, init):
  layer = make(nnx.initializers.zeros_init() if init == "zeros" else nnx.initializers.normal(1.0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  loss = lambda m: jnp.sum(m(x) ** 2) + jnp.sum(m(x))
  grads = nnx.jit(nnx.grad(loss))(layer)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  assert np.any(grads["kernel"][...] != 0)


def test_bfloat16_params_keep_their_dtype():
  layer = AOLConv(2, 2, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert layer.kernel[...].dtype == jnp.bfloat16
  assert layer.rescale(layer.kernel[...]).dtype == jnp.bfloat16
  assert layer(jnp.ones((1, 5, 2))).dtype == jnp.float32  # promoted like nnx.Conv


def test_gram_method_does_not_change_the_layer():
  kw = dict(kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 6, 3)), jnp.float32)
  call = nnx.jit(lambda m, v: m(v))
  y_conv = call(AOLConv(3, 4, (3, 2), gram_method="conv", **kw), x)
  kw["rngs"] = nnx.Rngs(0)
  y_taps = call(AOLConv(3, 4, (3, 2), gram_method="taps", **kw), x)
  np.testing.assert_allclose(y_conv, y_taps, rtol=1e-5, atol=1e-6)


def test_same_padding_matches_nnx_conv():
  """A drop-in for nnx.Conv: same signature, same output given the rescaled kernel."""
  kw = dict(strides=2, padding="SAME", kernel_dilation=1, feature_group_count=1)
  ours = AOLConv(3, 4, (3, 3), kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0), **kw)
  theirs = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0), **kw)
  theirs.kernel[...] = ours.rescale(ours.kernel[...])
  theirs.bias[...] = ours.bias[...]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 7, 3)), jnp.float32)
  call = nnx.jit(lambda m, v: m(v))
  np.testing.assert_allclose(call(ours, x), call(theirs, x), rtol=1e-5, atol=1e-6)


# ---- bad inputs --------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["REFLECT", "reflect", "EDGE", "SYMMETRIC", "REPLICATE"])
def test_unsound_padding_is_refused(padding):
  with pytest.raises(ValueError, match="voids the AOL Lipschitz bound"):
    AOLConv(2, 2, 3, padding=padding, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("padding", ["FOO", "", "CAUSAL_X"])
def test_unknown_padding_is_refused(padding):
  with pytest.raises(ValueError, match="Unknown padding"):
    AOLConv(2, 2, 3, padding=padding, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("padding", [-1, [1, -2], [(0, 1), (-1, 0)]])
def test_negative_padding_is_refused(padding):
  with pytest.raises(ValueError, match="non-negative"):
    AOLConv(2, 2, (3, 3), padding=padding, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("padding", [[1], [(1, 1)], [(1, 2, 3), (0, 0)], [(1, 1), "a"], 1.5,
                                     [1.5, 1], None])
def test_malformed_explicit_padding_is_refused(padding):
  with pytest.raises(ValueError, match="padding"):
    AOLConv(2, 2, (3, 3), padding=padding, rngs=nnx.Rngs(0))


def test_padding_spellings_are_equivalent():
  from aol_jax._src.padding import normalize_padding
  want = ((1, 1), (2, 0))
  assert normalize_padding([1, (2, 0)], 2) == want
  assert normalize_padding([np.int64(1), (np.int32(2), 0)], 2) == want
  assert normalize_padding(np.int64(3), 2) == ((3, 3), (3, 3))
  assert normalize_padding("circular", 1) == "CIRCULAR"


def test_channel_mismatch_at_call_time():
  with pytest.raises(ValueError, match="expects 3 input features"):
    AOLDense(3, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 4)))
  conv = AOLConv(3, 2, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="3 channels"):
    conv(jnp.ones((1, 5, 5, 2)))
  with pytest.raises(ValueError, match="2 spatial dims"):
    conv(jnp.ones((5, 3)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_features=4, out_features=6, kernel_size=3, feature_group_count=4), "dividing"),
    (dict(in_features=4, out_features=6, kernel_size=3, feature_group_count=0), "dividing"),
    (dict(in_features=3, out_features=3, kernel_size=(3, 0)), "kernel_size"),
    (dict(in_features=3, out_features=3, kernel_size=()), "1, 2 or 3 spatial dims"),
    (dict(in_features=3, out_features=3, kernel_size=(1, 1, 1, 1)), "1, 2 or 3 spatial dims"),
    (dict(in_features=0, out_features=3, kernel_size=3), ">= 1"),
    (dict(in_features=3, out_features=3, kernel_size=3, strides=0), "strides"),
    (dict(in_features=3, out_features=3, kernel_size=(3, 3), strides=(1, 1, 1)), "strides"),
    (dict(in_features=3, out_features=3, kernel_size=3, kernel_dilation=-1), "kernel_dilation"),
    (dict(in_features=3, out_features=3, kernel_size=3, gram_method="fft"), "gram_method"),
])
def test_bad_conv_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AOLConv(**kwargs, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("n_in,n_out", [(0, 3), (3, 0)])
def test_zero_sized_dense(n_in, n_out):
  with pytest.raises(ValueError, match=">= 1"):
    AOLDense(n_in, n_out, rngs=nnx.Rngs(0))


def test_wrong_kernel_rank_from_init():
  bad = lambda key, shape, dtype: jnp.ones(shape[1:], dtype)
  with pytest.raises(ValueError, match="must have rank"):
    AOLDense(3, 2, kernel_init=bad, rngs=nnx.Rngs(0))(jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="must have rank"):
    AOLConv(3, 2, 3, kernel_init=bad, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 3)))


@pytest.mark.parametrize("make", [lambda **kw: AOLDense(40, 30, **kw, rngs=nnx.Rngs(0)),
                                  lambda **kw: AOLConv(40, 30, 3, **kw, rngs=nnx.Rngs(0))])
def test_gram_precision_is_read_at_call_time(make):
  """The attribute the experiment runner sets changes the rescaling of the next call: a
  bfloat16 Gram moves the output by about bfloat16's precision, 'highest' and 'default' (on
  CPU, float32) agree to float32 rounding."""
  layer = make(kernel_init=nnx.initializers.normal(1.0))
  assert layer.gram_precision == "default"
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 40) if isinstance(
      layer, AOLConv) else (2, 40)), jnp.float32)
  out = {}
  for p in ("highest", "default", "bfloat16"):
    layer.gram_precision = p
    out[p] = np.asarray(jax.jit(lambda v: layer(v))(x))
  scale = np.abs(out["highest"]).max()
  np.testing.assert_allclose(out["default"], out["highest"], rtol=0, atol=1e-5 * scale)
  diff = np.abs(out["bfloat16"] - out["highest"]).max()
  assert 1e-5 * scale < diff < 3e-2 * scale, diff


@pytest.mark.parametrize("make", [lambda **kw: AOLDense(3, 3, **kw, rngs=nnx.Rngs(0)),
                                  lambda **kw: AOLConv(3, 3, 3, **kw, rngs=nnx.Rngs(0))])
def test_bad_gram_precision_is_refused(make):
  with pytest.raises(ValueError, match=r"gram_precision='fp8' is not one of \('default', "
                                       r"'high', 'highest', 'bfloat16'\)"):
    make(gram_precision="fp8")
  layer = make()
  layer.gram_precision = "fp8"  # set after construction: refused at the call
  with pytest.raises(ValueError, match="gram_precision='fp8'"):
    layer(jnp.ones((1, 5, 3)) if isinstance(layer, AOLConv) else jnp.ones((1, 3)))


@pytest.mark.parametrize("make,x_shape", [
    (lambda: AOLDense(6, 4, use_bias=False, rngs=nnx.Rngs(0)), (3, 6)),
    (lambda: AOLConv(4, 6, (3, 3), use_bias=False, rngs=nnx.Rngs(0)), (2, 5, 5, 4)),
    (lambda: AOLConv(6, 4, (3,), strides=2, kernel_dilation=2, feature_group_count=2,
                     use_bias=False, rngs=nnx.Rngs(0)), (2, 9, 6)),
    (lambda: AOLConv(4, 4, (2, 3), padding="CIRCULAR", feature_group_count=2, use_bias=False,
                     rngs=nnx.Rngs(0)), (2, 5, 4, 4)),
])
@pytest.mark.parametrize("operand", ["kernel", "input", "smaller"])
def test_layer_gradient_matches_autodiff_of_the_rescaled_kernel(make, x_shape, operand):
  """The layer's call (rescale-and-apply under its jax.checkpoint policy, or the input
  scaled by the factors and the raw kernel applied) has the values and the gradients, in
  the kernel and in x, of applying the pure function's rescaled kernel with the same plain
  op (matmul, conv_general_dilated; the frozen layer would sum in another order)."""
  layer = nnx.view(make(), scaled_operand=operand)
  layer.gram_precision = "highest"
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  kernel = layer.kernel[...]
  weights = jnp.asarray(rng.normal(size=layer(x).shape), jnp.float32)
  graphdef, state = nnx.split(layer)
  treedef = jax.tree.structure(state)

  def plain(k, x):
    if isinstance(layer, AOLDense):
      return x @ k
    spatial = "DHW"[3 - len(layer.kernel_size):]
    padding = layer.padding
    if padding == "CIRCULAR":
      x = jnp.pad(x, [(0, 0)] + [((k - 1) // 2, k // 2) for k in layer.kernel_size] + [(0, 0)],
                  mode="wrap")
      padding = "VALID"
    return jax.lax.conv_general_dilated(
        x, k, layer.strides, padding, rhs_dilation=layer.kernel_dilation,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        feature_group_count=layer.feature_group_count)

  def through_layer(k, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, jax.tree.unflatten(treedef, [k]))(x)) * weights)

  def through_pure(k, x):
    return jnp.sum(jnp.sin(plain(layer.rescale(k), x)) * weights)

  np.testing.assert_allclose(layer(x), plain(layer.rescale(kernel), x), rtol=1e-5, atol=1e-6)
  got = jax.jit(jax.grad(through_layer, argnums=(0, 1)))(kernel, x)
  want = jax.jit(jax.grad(through_pure, argnums=(0, 1)))(kernel, x)
  assert np.any(np.asarray(got[0]) != 0)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# The bound a layer states (lipschitz_bound) against exact norms, layer by layer and for
# whole frozen networks.

BOUND_CONVS = [  # (in, out, kernel, strides, dilation, groups, padding, input spatial size)
    (3, 4, (3, 3), (1, 1), (1, 1), 1, "SAME", (6, 5)),
    (4, 4, (3, 3), (2, 2), (1, 1), 2, "SAME", (7, 7)),
    (2, 4, (3, 2), (1, 1), (2, 1), 1, "VALID", (8, 6)),
    (2, 2, (3, 3), (1, 1), (1, 1), 1, "CIRCULAR", (5, 5)),
    (2, 3, (2, 3), (1, 2), (1, 1), 1, ((1, 0), (2, 2)), (5, 6)),
]


@pytest.mark.parametrize("case", BOUND_CONVS, ids=str)
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
  graphdef, state = nnx.split(frozen)
  jacobians = jax.jit(jax.vmap(jax.jacobian(lambda s, v: nnx.merge(graphdef, s)(v[None])[0],
                                            argnums=1), in_axes=(None, 0)))
  with jax.default_matmul_precision("highest"):  # at trace time: the compiled precision
    jacs = np.asarray(jacobians(state, xs), np.float64).reshape(len(xs), 10, -1)
  worst = float(np.linalg.svd(jacs, compute_uv=False)[:, 0].max())
  print(f"largest local norm {worst:.6f} <= stated {stated:.6f}")
  assert worst <= stated < 1.0
