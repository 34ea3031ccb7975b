"""Rigorous kernel norm bounds against the exact SVD of the explicit operator.

Every bound must be >= the largest singular value of the explicit matrix of the map (dense:
the kernel itself; conv: the Jacobian of ``jax.lax.conv_general_dilated`` as AOLConv calls
it, for several input sizes per kernel), and close to it: dense within 1e-4 relative (the
method's margin is 2^-20), conv within 1.02 % of the symbol's sup, measured by the circular conv
refined by a local search.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.optimize

import aol_jax
from aol_jax._src import padding as padding_lib
from aol_jax._src import spectral_bounds
from aol_jax._src.lipschitz import circular_conv_singular_values
from aol_jax._src.spectral_bounds import conv_norm_bound, dense_norm_bound

DENSE_TIGHTNESS = 1e-4
CONV_TOLERANCE = 0.0102 + 1e-5  # the second level's factor, and the shift's margin


def _exact(w: np.ndarray) -> float:
  return float(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0])


DENSE_SHAPES = [(1, 1), (5, 3), (3, 5), (16, 16), (64, 64), (256, 10), (10, 256), (40, 90)]

_rescale_dense = jax.jit(aol_jax.rescale_dense)


@functools.cache
def _dense_cases() -> dict[str, np.ndarray]:
  """Built on first use, not at collection (every pytest-xdist worker collects the module);
  the AOL kernels of every shape in one compiled program."""
  rng = np.random.default_rng(0)
  cases, raws = {}, []
  for shape in DENSE_SHAPES:
    m, n = shape
    cases[f"gauss{shape}"] = rng.standard_normal(shape)
    q, _ = np.linalg.qr(rng.standard_normal((max(m, n), max(m, n))))
    cases[f"orth{shape}"] = q[:m, :n] + 1e-4 * rng.standard_normal(shape)
    r = min(2, m, n)
    cases[f"rank{r}{shape}"] = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    raws.append(jnp.asarray(rng.standard_normal(shape), jnp.float32))

  @jax.jit
  def aol_kernels(raws):
    inits = [aol_jax.aol_init()(jax.random.key(m * 1000 + n), (m, n), jnp.float32)
             for m, n in DENSE_SHAPES]
    return [aol_jax.rescale_dense(w) for w in raws], [aol_jax.rescale_dense(w) for w in inits]

  for shape, aol, init in zip(DENSE_SHAPES, *aol_kernels(raws)):
    cases[f"aol{shape}"] = np.asarray(aol)
    cases[f"aol_init{shape}"] = np.asarray(init)
  cases["diag_spread"] = np.diag([1.0, 1 - 1e-9, 1e-3, 0.0])
  cases["one_entry"] = np.eye(1, 9) * 3.0
  return cases


DENSE_CASE_NAMES = [f"{kind}{shape}" for shape in DENSE_SHAPES
                    for kind in ("gauss", "orth", f"rank{min(2, *shape)}", "aol", "aol_init")]
DENSE_CASE_NAMES += ["diag_spread", "one_entry"]


@pytest.mark.parametrize("name", DENSE_CASE_NAMES)
def test_dense_bound_is_above_exact_norm_and_tight(name):
  kernel = _dense_cases()[name]
  for dtype in (ml_dtypes.bfloat16, np.float16, np.float32, np.float64):
    w = np.asarray(kernel).astype(dtype)
    exact = _exact(w.astype(np.float64))  # the stored values
    bound = dense_norm_bound(w)
    assert exact <= bound <= exact * (1 + DENSE_TIGHTNESS), (name, dtype, exact, bound)


def test_dense_bound_large_kernel():
  """From 512 wide on, the shift comes from Lanczos (scipy's eigsh) instead of eigvalsh."""
  rng = np.random.default_rng(5)
  raw = jnp.asarray(rng.standard_normal((700, 600)), jnp.float32)
  for w in (np.asarray(_rescale_dense(raw)), np.asarray(raw).T):
    exact = _exact(w)
    assert exact <= dense_norm_bound(w) <= exact * (1 + DENSE_TIGHTNESS)


@pytest.mark.parametrize("scale", [1e-300, 2.0 ** -1060, 1e-30, 1e30, 1e300])
def test_dense_bound_at_extreme_magnitudes(scale):
  rng = np.random.default_rng(1)
  base = rng.standard_normal((12, 7))
  w = base * scale
  exact = _exact(base) * scale
  bound = dense_norm_bound(w)
  # Subnormal entries keep only a few bits: compare with the stored values there.
  if scale < 1e-307:
    exact = _exact(w / scale) * scale
  assert exact <= bound <= exact * (1 + DENSE_TIGHTNESS), (exact, bound)


def test_dense_bound_huge_dynamic_range_stays_above():
  w = np.array([[1e300, 0.0], [0.0, 1e-300]])
  assert dense_norm_bound(w) >= 1e300


def test_zero_kernels_give_zero():
  assert dense_norm_bound(np.zeros((4, 3), np.float32)) == 0.0
  assert conv_norm_bound(np.zeros((3, 3, 2, 4))) == 0.0


def test_dense_never_above_schur():
  rng = np.random.default_rng(2)
  for _ in range(5):
    w = np.asarray(_rescale_dense(jnp.asarray(rng.standard_normal((20, 30)), jnp.float32)))
    assert dense_norm_bound(w) <= spectral_bounds.dense_row_sum_bound(w)


@pytest.mark.parametrize("wrong", [0.0, 0.5, 0.999, 1.5])
def test_bounds_are_verified_not_estimated(monkeypatch, wrong):
  """The eigenvalue estimate only places the shift; a wrong one must not weaken the bound."""
  true_dense = spectral_bounds._estimate_lambda_max
  true_batch = spectral_bounds._estimate_batch_lambda_max
  monkeypatch.setattr(spectral_bounds, "_estimate_lambda_max", lambda h: wrong * true_dense(h))
  monkeypatch.setattr(spectral_bounds, "_estimate_batch_lambda_max",
                      lambda *args, **kwargs: wrong * true_batch(*args, **kwargs))
  monkeypatch.setattr(spectral_bounds, "_schur_dense", lambda *args, **kwargs: math.inf)
  monkeypatch.setattr(spectral_bounds, "_schur_conv", lambda *args, **kwargs: math.inf)
  rng = np.random.default_rng(4)
  for shape in [(6, 4), (30, 30), (70, 50)]:
    w = rng.standard_normal(shape)
    assert _exact(w) <= dense_norm_bound(w)
  kernel = rng.standard_normal((3, 3, 3, 2))
  assert _symbol_sup_estimate(kernel, 1) <= conv_norm_bound(kernel)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 2, 2)), "2-D"), (np.array([[np.nan]]), "NaN"),
    (np.ones((2, 2), np.int32), "floating"), (np.ones((0, 3)), "zero-sized")])
def test_dense_bad_input(bad, match):
  with pytest.raises(ValueError, match=match):
    dense_norm_bound(bad)


def _conv_fn(kernel, strides, dilation, groups, padding):
  """The conv as AOLConv calls it, ``f(x, kernel)`` on one unbatched input."""
  nd = kernel.ndim - 2
  spatial = "DHW"[3 - nd:]
  pad = padding_lib.normalize_padding(padding, nd)

  def f(x, k):
    x = x[None]
    p = pad
    if p == "CIRCULAR":
      x = padding_lib.circular_pad(x, kernel.shape[:nd], dilation)
      p = "VALID"
    y = jax.lax.conv_general_dilated(
        x, k, window_strides=strides, padding=p, rhs_dilation=dilation,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)
    return y[0]

  return f


def _explicit_matrices(f, kernels, input_shape) -> jax.Array:
  """The explicit matrix of ``x -> f(x, k)`` on ``input_shape`` for each of the stacked
  ``kernels``: the Jacobian at 0, by forward mode (exact for a linear map)."""
  x0 = jnp.zeros(tuple(input_shape), jnp.float32)
  flat = lambda v, k: f(v.reshape(x0.shape), k).reshape(-1)
  return jax.vmap(jax.jacfwd(flat), in_axes=(None, 0))(x0.reshape(-1), kernels)


def _largest_singular_values(matrices) -> list[float]:
  return [float(np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)[0])
          for m in np.asarray(matrices)]


# (kernel size, c_in, c_out, groups, strides, dilation, padding, input sizes)
CONV_CASES = [
    ((3,), 2, 3, 1, (1,), (1,), "SAME", [(5,), (9,), (16,)]),
    ((5,), 3, 2, 1, (2,), (1,), "VALID", [(7,), (12,)]),
    ((4,), 2, 2, 2, (1,), (3,), ((2, 5),), [(6,), (11,)]),
    ((3,), 2, 2, 1, (1,), (2,), "CIRCULAR", [(3,), (8,), (13,)]),
    ((3, 3), 3, 4, 1, (1, 1), (1, 1), "SAME", [(4, 4), (7, 5)]),
    ((3, 3), 4, 4, 2, (2, 2), (1, 1), "SAME", [(5, 5), (8, 6)]),
    ((3, 3), 2, 3, 1, (1, 1), (2, 2), "VALID", [(6, 6), (7, 9)]),
    ((2, 3), 2, 2, 1, (1, 2), (1, 1), ((1, 0), (2, 2)), [(4, 5), (6, 3)]),
    ((3, 3), 2, 2, 1, (1, 1), (1, 1), "CIRCULAR", [(3, 3), (4, 6), (7, 7)]),
    ((3, 3), 2, 4, 2, (1, 1), (2, 1), "CIRCULAR", [(5, 4), (6, 6)]),
    ((1, 1), 3, 5, 1, (1, 1), (1, 1), "SAME", [(3, 3)]),
    ((2, 2, 2), 2, 2, 1, (1, 1, 1), (1, 1, 1), "SAME", [(3, 3, 3), (4, 3, 2)]),
]


def _symbol_norm(kernel: np.ndarray, w: np.ndarray) -> float:
  """``||sum_t K_t exp(-i w.t)||_2`` for one group's kernel ``(*k, a, b)``."""
  nd = kernel.ndim - 2
  t = np.array(list(np.ndindex(*kernel.shape[:nd])))
  phases = np.exp(-1j * (t @ w))
  symbol = np.tensordot(phases, kernel.reshape(len(t), *kernel.shape[nd:]), axes=1)
  return float(np.linalg.svd(symbol, compute_uv=False)[0])


def _symbol_sup_estimate(kernel: np.ndarray, groups: int) -> float:
  """A lower estimate of the symbol's sup: the circular conv's norm on a fine grid (the
  largest symbol sample), refined by a local search from the best sample."""
  nd = kernel.ndim - 2
  n = {1: 720, 2: 120, 3: 36}[nd]
  c_out_g = kernel.shape[-1] // groups
  best = 0.0
  for j in range(groups):
    kg = kernel[..., j * c_out_g:(j + 1) * c_out_g]
    folded = np.zeros((n,) * nd + kg.shape[nd:])
    for tap in np.ndindex(*kg.shape[:nd]):
      folded[tap] += kg[tap]
    sv = np.linalg.svd(np.fft.fftn(folded, axes=tuple(range(nd))), compute_uv=False)[..., 0]
    m = np.array(np.unravel_index(np.argmax(sv), sv.shape), np.float64)
    res = scipy.optimize.minimize(lambda w: -_symbol_norm(kg, w), 2 * np.pi * m / n,
                                  method="Nelder-Mead", options=dict(xatol=1e-9, fatol=1e-14))
    best = max(best, float(sv.max()), -float(res.fun))
  return best


@functools.cache
def _conv_cases() -> list[tuple[np.ndarray, np.ndarray, dict]]:
  """Per case of CONV_CASES: the raw kernel, its AOL rescaling and, per input size, the exact
  norms of both convs; one compiled program for all of them (built on first use)."""
  raws = []
  for case in CONV_CASES:
    ksize, c_in, c_out, groups = case[:4]
    rng = np.random.default_rng(len(str(case)))
    raws.append(rng.standard_normal((*ksize, c_in // groups, c_out)).astype(np.float32))

  @jax.jit
  def compute(raws):
    out = []
    for case, raw in zip(CONV_CASES, raws):
      ksize, c_in, c_out, groups, strides, dilation, padding, sizes = case
      rescaled = aol_jax.rescale_conv(raw, feature_group_count=groups)
      f = _conv_fn(raw, strides, dilation, groups, padding)
      out.append((rescaled, [_explicit_matrices(f, jnp.stack([raw, rescaled]), (*size, c_in))
                             for size in sizes]))
    return out

  cases = []
  for case, raw, (rescaled, matrices) in zip(CONV_CASES, raws, compute(raws)):
    norms = {size: _largest_singular_values(m) for size, m in zip(case[-1], matrices)}
    cases.append((raw, np.asarray(rescaled), norms))
  return cases


@pytest.mark.parametrize("index", range(len(CONV_CASES)), ids=[str(c) for c in CONV_CASES])
def test_conv_bound_is_above_exact_norm_for_every_input_size(index):
  ksize, c_in, c_out, groups, strides, dilation, padding, sizes = case = CONV_CASES[index]
  raw, rescaled, exact = _conv_cases()[index]
  for j, kernel in enumerate((raw, rescaled)):
    bound = conv_norm_bound(kernel, strides=strides, kernel_dilation=dilation,
                            feature_group_count=groups, padding=padding)
    for size in sizes:
      assert exact[size][j] <= bound, (case, size, exact[size][j], bound)
    sup = _symbol_sup_estimate(kernel.astype(np.float64), groups)
    assert bound <= sup * (1 + CONV_TOLERANCE), (case, sup, bound)
    schur = spectral_bounds.conv_row_sum_bound(kernel, feature_group_count=groups)
    assert bound <= schur


def test_wide_conv_shifts_from_lanczos_estimates(monkeypatch):
  """A side above _EIGVALSH_UP_TO (here the transposed one, c_in > c_out): the shifts come
  from complex64 Lanczos estimates of P + i Q, close enough that no sample needs LAPACK's
  eigenvalues after a failed factorisation, and the bound is as tight as the refinement
  allows."""
  kernel = np.random.default_rng(1).standard_normal((3, 40, 36))
  assert min(kernel.shape[-2:]) > spectral_bounds._EIGVALSH_UP_TO
  exact_estimates = []
  true_batch = spectral_bounds._estimate_batch_lambda_max

  def counting(h, exact=False):
    exact_estimates.extend([len(h)] if exact else [])
    return true_batch(h, exact)

  monkeypatch.setattr(spectral_bounds, "_estimate_batch_lambda_max", counting)
  monkeypatch.setattr(spectral_bounds, "_schur_conv", lambda *args, **kwargs: math.inf)
  bound = conv_norm_bound(kernel)
  sup = _symbol_sup_estimate(kernel, 1)
  assert sup <= bound <= sup * (1 + CONV_TOLERANCE), (sup, bound)
  assert not exact_estimates


@pytest.mark.parametrize("grid_size", [2, 3, 4, 6])
def test_coarse_grid_bound_still_holds(grid_size):
  """The correction 1 / (1 - theta^2 / 2) carries the bound from the grid to the whole torus:
  with a very coarse grid the samples alone fall below the exact circular norms."""
  rng = np.random.default_rng(grid_size)
  for trial in range(20):
    kernel = rng.standard_normal((2, 2, 2))
    try:
      bound = conv_norm_bound(kernel, grid_size=grid_size)
    except ValueError as err:  # the grid is too coarse for this kernel: refused, not unsound
      assert "grid_size" in str(err)
      continue
    for n in range(2, 40):
      exact = circular_conv_singular_values(kernel, (n,))[0]
      assert exact <= bound, (trial, n, exact, bound)


def test_conv_bound_at_aol_init_is_tight():
  """Identity at the centre tap (AOL's init) trims to one tap: the bound is the dense one."""
  init = lambda key: aol_jax.rescale_conv(aol_jax.aol_init()(key, (3, 3, 8, 8), jnp.float32))
  kernel = np.asarray(jax.jit(init)(jax.random.key(0)))
  exact, = _largest_singular_values(jax.jit(_explicit_matrices, static_argnums=(0, 2))(
      _conv_fn(kernel, (1, 1), (1, 1), 1, "SAME"), jnp.asarray(kernel)[None], (5, 5, 8)))
  bound = conv_norm_bound(kernel)
  assert exact <= bound <= exact * (1 + DENSE_TIGHTNESS)


def test_conv_extreme_magnitudes_and_dtypes():
  rng = np.random.default_rng(3)
  base = rng.standard_normal((3, 3, 2, 2))
  sup = _symbol_sup_estimate(base, 1)
  for scale in (1e-300, 1e300):
    assert sup * scale * (1 - 1e-9) <= conv_norm_bound(base * scale) <= sup * scale * (
        1 + CONV_TOLERANCE)
  for dtype in (ml_dtypes.bfloat16, np.float16, np.float32):
    k = base.astype(dtype)
    stored = k.astype(np.float64)
    bound = conv_norm_bound(k)
    assert circular_conv_singular_values(stored, (11, 11))[0] <= bound


@pytest.mark.parametrize("kwargs,match", [
    (dict(padding="REFLECT"), "REFLECT"), (dict(strides=0), "strides"),
    (dict(kernel_dilation=(1,)), "kernel_dilation"), (dict(feature_group_count=3), "feature_group"),
    (dict(grid_size=1), "grid_size"), (dict(tolerance=0.0), "tolerance"),
    (dict(max_samples=0), "max_samples")])
def test_conv_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    conv_norm_bound(np.ones((3, 3, 2, 4)), **kwargs)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_sign_kernels_bounded_without_gram(monkeypatch, sign):
  """|W| (what the certificate's rounding terms bound): the power path alone is tight, with a
  zero row and a zero block (a reducible matrix) too; a slow one falls back to the Gram."""
  rng = np.random.default_rng(6)
  raw = jnp.asarray(rng.standard_normal((300, 200)), jnp.float32)
  blocks = np.zeros((40, 30))
  blocks[:20, :10] = rng.uniform(size=(20, 10))
  blocks[20:, 10:] = rng.uniform(size=(20, 20))
  blocks[5] = 0.0
  cases = [np.abs(np.asarray(_rescale_dense(raw))), rng.uniform(size=(64, 1)), blocks]
  monkeypatch.setattr(spectral_bounds, "_sigma_max_upper_gram", lambda *args: math.inf)
  for w in cases:
    w = sign * w
    exact = _exact(w)
    assert exact <= dense_norm_bound(w) <= exact * (1 + DENSE_TIGHTNESS)
  monkeypatch.undo()
  w = cases[0]
  power, converged = spectral_bounds._nonneg_norm_bound(w, iterations=1)
  assert not converged and _exact(w) * (1 + DENSE_TIGHTNESS) < power  # one iterate: loose
  monkeypatch.setattr(spectral_bounds, "_nonneg_norm_bound", lambda w: (power, False))
  assert _exact(w) <= dense_norm_bound(w) <= _exact(w) * (1 + DENSE_TIGHTNESS)  # the Gram
