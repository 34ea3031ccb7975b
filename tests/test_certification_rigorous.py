"""The rigorous rounding model against evaluations that round as badly as they can.

Each layer's stated bound (``rounding_error``) is checked against its error measured two ways:
XLA's own float32 evaluation, and float32 sums emulated in NumPy in adversarial orders (left
to right, largest first, smallest first), with subnormal results flushed to zero, on inputs
that make errors add up (constant images, long chains of equal products, alternating signs,
sorted magnitudes, fan-in 16384). The exact value is the float64 evaluation of the same
float32 kernel (its own error, about 1e-16 relative, is far below float32's). The chain and
the allowance are checked on whole networks, at ``x`` and at points ``x'`` of the ball.
"""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aol_jax
from aol_jax._src import patches
from aol_jax._src.padding import normalize_padding
from aol_jax._src.certification import rigorous
from aol_jax._src.lipschitz import explicit_matrix
from aol_jax.certification import FLOAT32, FLOAT64
from support.certification import float64_logits, trained_like

TINY32 = np.float32(2.0 ** -126)


def _ordered_sum(terms: np.ndarray, order: str, flush: bool) -> np.ndarray:
  """``terms`` ``(batch, n, m)`` summed over axis 1 in float32, one term at a time in the
  given order (as they come, largest first, smallest first), subnormal results flushed."""
  magnitude = np.abs(terms)
  if order == "largest":
    terms = np.take_along_axis(terms, np.argsort(-magnitude, axis=1, kind="stable"), axis=1)
  elif order == "smallest":
    terms = np.take_along_axis(terms, np.argsort(magnitude, axis=1, kind="stable"), axis=1)
  acc = np.zeros((terms.shape[0], terms.shape[2]), np.float32)
  for i in range(terms.shape[1]):
    acc = acc + terms[:, i]
    if flush:
      acc = np.where(np.abs(acc) < TINY32, np.float32(0), acc)
  return acc


def _emulated_dense(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, order: str,
                    flush: bool) -> np.ndarray:
  """``x @ w + b`` as the certified evaluation structures it (aol_jax._src.patches: at most
  16 partial dot products per output, then their sum, then the bias), with every product and
  sum rounded to float32 and each sum taken in the given order."""
  x, w = x.astype(np.float32), w.astype(np.float32)
  n = x.shape[1]
  k = min(patches.CHUNKS, n)
  c = -(-n // k)
  terms = x[:, :, None] * w[None]  # (batch, n, m): each product rounded to float32
  if flush:
    terms = np.where(np.abs(terms) < TINY32, np.float32(0), terms)
  terms = np.pad(terms, ((0, 0), (0, k * c - n), (0, 0))).reshape(len(x), k, c, -1)
  partial = np.stack([_ordered_sum(terms[:, j], order, flush) for j in range(k)], axis=1)
  acc = _ordered_sum(partial, order, flush)
  if b is not None:
    acc = acc + b.astype(np.float32)
  return acc


def _inputs(n: int, batch: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      "constant": np.full((batch, n), 0.7, np.float32),
      "alternating": np.tile(np.array([1.0, -1.0], np.float32), (batch, n // 2)) * np.float32(
          0.3),
      "sorted": np.sort(rng.uniform(0, 1, (batch, n)).astype(np.float32), axis=1)[:, ::-1],
      "tiny": (rng.uniform(0, 1, (batch, n)) * 1e-36).astype(np.float32),
      "uniform": rng.uniform(0, 1, (batch, n)).astype(np.float32),
  }


def _equal_columns(n: int, m: int):
  def init(key, shape, dtype):
    del key
    return jnp.asarray(np.tile(np.where(np.arange(m) % 2 == 0, 1.0, -1.0), (n, 1)), dtype)
  return init


@pytest.mark.parametrize("n,kind", [(16384, "equal"), (64, "random")])
def test_dense_bound_covers_adversarial_summation(n, kind):
  m = 4
  init = _equal_columns(n, m) if kind == "equal" else nnx.initializers.normal(1.0)
  layer = aol_jax.freeze(aol_jax.AOLDense(n, m, kernel_init=init, rngs=nnx.Rngs(0)))
  layer.bias[...] = jnp.asarray(np.linspace(-0.5, 0.5, m), jnp.float32)
  w = np.asarray(layer.kernel[...], np.float64)
  b = np.asarray(layer.bias[...], np.float64)
  certified = jax.jit(lambda v: layer.rounding_error(v, FLOAT32))
  worst = 0.0
  for name, x in _inputs(n, 3, seed=n).items():
    exact = x.astype(np.float64) @ w + b
    y, bound = certified(jnp.asarray(x))
    bound = np.asarray(bound, np.float64)
    measured = {"xla": np.asarray(y, np.float64)}
    for order in ("left", "largest", "smallest"):
      for flush in (False, True):
        measured[f"{order}{'-ftz' if flush else ''}"] = _emulated_dense(x, w, b, order, flush)
    for how, value in measured.items():
      err = np.linalg.norm(value.astype(np.float64) - exact, axis=1)
      assert np.all(err <= bound), (name, how, err, bound)
      worst = max(worst, float(np.max(err / bound)))
  print(f"dense n={n} {kind}: worst measured error / bound = {worst:.3f}")
  assert worst > 0  # the measurement is not vacuous


CONVS = [  # (in, out, kernel, strides, dilation, groups, padding, input spatial size)
    (3, 4, (3, 3), (1, 1), (1, 1), 1, "SAME", (6, 5)),
    (4, 4, (3, 3), (2, 2), (1, 1), 2, "SAME", (7, 7)),
    (2, 4, (3, 2), (1, 1), (2, 1), 1, "VALID", (8, 6)),
    (2, 2, (3, 3), (1, 1), (1, 1), 1, "CIRCULAR", (5, 5)),
    (2, 3, (2, 3), (1, 2), (1, 1), 1, ((1, 0), (2, 2)), (5, 6)),
    (192, 8, (3, 3), (1, 1), (1, 1), 1, "SAME", (4, 4)),
]


@pytest.mark.parametrize("case", CONVS, ids=str)
def test_conv_bound_covers_xla_and_adversarial_summation(case):
  """The conv as XLA evaluates it (conv_general_dilated, the layer's own call, and the
  certified evaluation's slices and dot), and as left-to-right / sorted float32 sums of
  its explicit matrix, against the float64 evaluation of the same kernel."""
  c_in, c_out, ksize, strides, dilation, groups, padding, size = case
  layer = aol_jax.AOLConv(c_in, c_out, ksize, strides, padding=padding,
                          kernel_dilation=dilation, feature_group_count=groups,
                          rngs=nnx.Rngs(0))
  frozen = aol_jax.freeze(trained_like(layer, 0.3, seed=sum(size)))
  frozen.bias[...] = jnp.full((c_out,), 0.25, jnp.float32)
  n = math.prod(size) * c_in
  with jax.default_matmul_precision("highest"):
    matrix = explicit_matrix(lambda v: frozen(v[None])[0] - frozen(
        jnp.zeros_like(v)[None])[0], (*size, c_in))
  call, certified = jax.jit(frozen), jax.jit(lambda v: frozen.rounding_error(v, FLOAT32))
  bias = np.asarray(call(jnp.zeros((1, *size, c_in)))[0], np.float64).reshape(-1)
  kernel = np.asarray(frozen.kernel[...], np.float64)
  worst = 0.0
  for name, x in _inputs(n, 2, seed=n).items():
    images = x.reshape(2, *size, c_in)
    exact = x.astype(np.float64) @ matrix.T + bias
    y, bound = certified(jnp.asarray(images))
    bound = np.asarray(bound, np.float64)
    measured = {"certified": np.asarray(y, np.float64).reshape(2, -1),
                "call": np.asarray(call(jnp.asarray(images)), np.float64).reshape(2, -1)}
    if groups == 1:  # the chunked sums emulated on the columns the conv reads
      cols = np.asarray(jax.jit(lambda v: patches.conv_patches(
          v, ksize, strides=strides, dilation=dilation,
          padding=normalize_padding(padding, len(ksize))))(jnp.asarray(images)))
      rows = cols.reshape(-1, cols.shape[-2] * cols.shape[-1])
      w = kernel.reshape(-1, c_out)
      b = np.full(c_out, 0.25)
      for order in ("left", "largest"):
        out = _emulated_dense(rows, w, b, order, flush=True).reshape(2, -1)
        measured[order] = out
    for how, value in measured.items():
      err = np.linalg.norm(value - exact, axis=1)
      assert np.all(err <= bound), (name, how, err, bound)
      worst = max(worst, float(np.max(err / bound)))
  print(f"conv {case}: worst measured error / bound = {worst:.3f}")


def test_slopes_bound_the_change_of_the_stated_error():
  """d(z') <= d(z) + s ||z' - z|| for the dense, conv and normalisation steps."""
  rng = np.random.default_rng(0)
  dense = aol_jax.freeze(trained_like(aol_jax.AOLDense(32, 16, rngs=nnx.Rngs(0)), 0.3, 1))
  conv = aol_jax.freeze(trained_like(aol_jax.AOLConv(4, 6, (3, 3), rngs=nnx.Rngs(0)), 0.3, 2))
  norm = aol_jax.AOLNetwork([], input_mean=(0.5,), input_std=(0.25,))._normalisation()
  for step, shape in ((dense, (32,)), (conv, (5, 5, 4)), (norm, (5, 5, 1))):
    slope = step.rounding_error_slope(FLOAT32)
    z = rng.uniform(0, 1, (64, *shape)).astype(np.float32)
    dz = rng.normal(size=z.shape).astype(np.float32)
    dz /= np.linalg.norm(dz.reshape(64, -1), axis=1).reshape(64, *[1] * len(shape))
    error = jax.jit(lambda v, step=step: step.rounding_error(v, FLOAT32)[1])
    for r in (1e-3, 0.1, 3.0):
      here, there = error(jnp.asarray(z)), error(jnp.asarray(z + r * dz))
      moved = np.linalg.norm((r * dz).reshape(64, -1), axis=1)
      assert np.all(np.asarray(there) <= np.asarray(here) + slope * moved * (1 + 1e-6)), step


def _network(seed: int) -> aol_jax.AOLNetwork:
  rngs = nnx.Rngs(seed)
  layers = [aol_jax.AOLConv(1, 8, (3, 3), rngs=rngs), aol_jax.MaxMin(),
            aol_jax.AOLConv(8, 8, (3, 3), (2, 2), feature_group_count=2, rngs=rngs),
            aol_jax.MaxMin(), aol_jax.Flatten(), aol_jax.AOLDense(128, 64, rngs=rngs),
            aol_jax.MaxMin(), aol_jax.AOLDense(64, 10, rngs=rngs)]
  return trained_like(aol_jax.AOLNetwork(layers, input_mean=(0.4,), input_std=(0.3,)), 0.3,
                      seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_chain_bounds_the_logit_error_at_x_and_in_the_ball(seed):
  """``||F(x) - f(x)|| <= e_K`` and ``||F(x') - f(x')|| <= alpha + beta ||x' - x||`` for the
  whole network, F the float32 evaluation (the certified one and the network's own call)."""
  model = _network(seed)
  prepared = aol_jax.certification.prepare(model, (8, 8, 1))
  frozen = nnx.merge(prepared.graphdef, prepared.state)
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (16, 8, 8, 1)).astype(np.float32)
  logits, _, bounds = jax.jit(prepared.evaluate)(prepared.state, jnp.asarray(x))
  e, alpha = np.asarray(bounds.a, np.float64), np.asarray(bounds.b, np.float64)
  beta = prepared.constants.chain.beta
  exact = float64_logits(frozen, x)
  for value in (np.asarray(logits), np.asarray(jax.jit(frozen)(jnp.asarray(x)))):
    err = np.linalg.norm(value.astype(np.float64) - exact, axis=1)
    assert np.all(err <= e), (err, e)
  print(f"seed {seed}: logit error / e_K at x <= {np.max(err / e):.3f}, e_K ~ {e.max():.2e}")
  d = rng.normal(size=(3, *x.shape)).astype(np.float32)
  d *= np.array([1e-3, 0.05, 0.5])[:, None, None, None, None] / np.linalg.norm(
      d.reshape(3, 16, -1), axis=2)[:, :, None, None, None]
  x2 = np.clip(x[None] + d, 0, 1).astype(np.float32).reshape(48, 8, 8, 1)
  moved = np.linalg.norm((x2.astype(np.float64) - np.tile(x, (3, 1, 1, 1))).reshape(48, -1), 1)
  err2 = np.linalg.norm(np.asarray(jax.jit(frozen)(jnp.asarray(x2)), np.float64)
                        - float64_logits(frozen, x2), axis=1)
  assert np.all(err2 <= np.tile(alpha, 3) + beta * moved)


def test_float64_mode_bounds_are_about_2e_29_of_float32():
  model = _network(3)
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)), jnp.float32)
  e = {}
  for name in ("float32", "float64"):
    prepared = aol_jax.certification.prepare(model, (8, 8, 1), rounding=name)
    with prepared.mode.arithmetic():
      e[name] = float(np.max(jax.jit(prepared.evaluate)(prepared.state, x)[2].a))
  ratio = e["float64"] / e["float32"]
  assert 2.0 ** -30 < ratio < 2.0 ** -28, ratio


def test_gamma_and_the_host_arithmetic_round_up():
  assert rigorous.gamma(1, FLOAT32) >= 2.0 ** -24 / (1 - 2.0 ** -24)
  assert rigorous.gamma(10 ** 6, FLOAT32) > 10 ** 6 * 2.0 ** -24
  with pytest.raises(ValueError, match="too long"):
    rigorous.gamma(2 ** 22, FLOAT32)
  assert rigorous.mul_up(0.5, 4.0) == 2.0  # exact products stay exact
  assert fractions.Fraction(rigorous.mul_up(0.1, 3.0)) >= fractions.Fraction(0.1) * 3
  third = rigorous.div_up(1.0, 3.0)
  assert third > 1.0 / 3.0 and third == math.nextafter(1.0 / 3.0, math.inf)
  assert FLOAT64.unit_roundoff == 2.0 ** -53 and FLOAT32.tiny == 2.0 ** -126


def test_the_chain_refuses_scalars_of_another_length():
  """The scalars come from one network's steps: a chain of another length is refused, not
  evaluated with a missing or extra step's constants."""
  steps = [rigorous.StepConstants(lipschitz=1.0, slope=1e-6)] * 2
  scalars = rigorous.chain_scalars(steps, rigorous.chain_constants(steps), FLOAT32)
  d = [jnp.zeros(3, jnp.float32)] * 3
  with pytest.raises(ValueError, match="3 steps' bounds for the scalars of a chain of 2"):
    rigorous.chain(d, d + d[:1], scalars, FLOAT32)
  e, alpha, limit = rigorous.chain(d[:2], d, scalars, FLOAT32)
  assert e.shape == alpha.shape == limit.shape == (3,)
