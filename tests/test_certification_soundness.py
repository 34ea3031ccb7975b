"""Randomised soundness: many small networks built from every block, nested and not, at
several input scales and dtypes; every certificate either mode gives is attacked in float32
and in float64 at its radius, and must hold.

Hypothesis runs derandomised (the same examples on every run, so CI is reproducible); a
failure prints the drawn network (``print_blob``), and ``@reproduce_failure`` or the printed
draws rebuild it.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aol_jax
NUM_CLASSES = 3
SCALES = (1.0, 1e-3, 1e-30)  # the last puts every activation near float32's underflow


def _kernel_init(scale):
  return lambda key, shape, dtype: (scale * jax.random.normal(key, shape, jnp.float32)
                                    ).astype(dtype)


def _bias_init(key, shape, dtype):
  return (0.3 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@st.composite
def _conv_stage(draw, channels: int, seed: int, dtype):
  """Spatial layers on (4, 4, channels): convs, MaxMin / GroupSort, relu, pads, pooling."""
  layers, c, side = [], channels, 4
  for i in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(["conv", "maxmin", "groupsort", "relu", "pad", "pool"]))
    if kind == "conv":
      out = draw(st.sampled_from([2, 4]))
      layers.append(aol_jax.AOLConv(
          c, out, draw(st.sampled_from([(1, 1), (2, 2), (3, 3)])),
          padding=draw(st.sampled_from(["SAME", "CIRCULAR"])), param_dtype=dtype,
          kernel_init=_kernel_init(draw(st.sampled_from([0.1, 1.0]))), bias_init=_bias_init,
          rngs=nnx.Rngs(seed + i)))
      c = out
    elif kind == "maxmin" and c % 2 == 0:
      layers.append(aol_jax.MaxMin())
    elif kind == "groupsort" and c % 2 == 0:
      layers.append(aol_jax.GroupSort(c))
    elif kind == "relu":
      layers.append(jax.nn.relu)
    elif kind == "pad":
      layers.append(aol_jax.ZeroChannelPad(1))
      c += 1
    elif kind == "pool" and side == 4:
      layers.append(aol_jax.ConcatenationPooling(2))
      c, side = 4 * c, 2
  return layers, side * side * c


@st.composite
def _network(draw):
  seed = draw(st.integers(0, 2 ** 16))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  channels = draw(st.sampled_from([1, 2]))
  convs, features = draw(_conv_stage(channels, seed, dtype))
  if draw(st.booleans()):  # nest the conv stage, with its own normalisation or not
    convs = [aol_jax.AOLNetwork(convs or [jax.nn.relu],
                               input_std=draw(st.sampled_from([None, 0.5])))]
  convs.append(aol_jax.Flatten())
  width = draw(st.sampled_from([4, 6]))
  dense = [aol_jax.AOLDense(features, width, param_dtype=dtype,
                            kernel_init=_kernel_init(draw(st.sampled_from([0.1, 1.0]))),
                            bias_init=_bias_init, rngs=nnx.Rngs(seed + 10))]
  if draw(st.booleans()):
    dense += [aol_jax.MaxMin(), aol_jax.AOLDense(width, width, param_dtype=dtype,
                                                 bias_init=_bias_init,
                                                 rngs=nnx.Rngs(seed + 11))]
  dense.append(aol_jax.FirstChannels(NUM_CLASSES))
  std = draw(st.sampled_from([None, 0.25, 2.0]))
  norm = {} if std is None else {"input_mean": (0.5,) * channels, "input_std": (std,) * channels}
  model = aol_jax.AOLNetwork(convs + dense, **norm)
  if draw(st.booleans()):
    model = aol_jax.freeze(model)  # frozen by the user, in its own dtype
  scale = draw(st.sampled_from(SCALES))
  image_dtype = draw(st.sampled_from([np.float32, np.float64]))
  return model, channels, seed, scale, image_dtype


def _attack(frozen, x, y, radius, dtype, steps: int = 15) -> float:
  """The lowest margin l2 PGD finds in the ball, evaluated in ``dtype`` (float32 or 64):
  one jit-compiled ``lax.scan``, the radius an argument."""
  with jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext():
    graphdef, state = nnx.split(frozen)
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                         else a, state)

    @jax.jit
    def run(state, x, r):
      margin = lambda z: aol_jax.margins(nnx.merge(graphdef, state)(z), jnp.asarray(y))[0]

      def step(carry, _):
        z, best = carry
        g = jax.grad(margin)(z)
        gn = jnp.linalg.norm(g)
        z = z - jnp.where(gn > 0, 0.2 * r / jnp.where(gn > 0, gn, 1), 0) * g
        d = z - x
        dn = jnp.linalg.norm(d)
        z = x + d * jnp.where(dn > r, r / jnp.where(dn > 0, dn, 1), 1)
        return (z, jnp.minimum(best, margin(z))), None

      (_, best), _ = jax.lax.scan(step, (x, margin(x)), None, length=steps)
      return best

    return float(run(state, jnp.asarray(x, dtype), jnp.asarray(radius, dtype)))


@settings(max_examples=6, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(_network())
def test_every_certificate_survives_float32_and_float64_attacks(drawn):
  model, channels, seed, scale, image_dtype = drawn
  rng = np.random.default_rng(seed)
  x = (scale * rng.uniform(size=(1, 4, 4, channels))).astype(image_dtype)
  frozen = aol_jax.freeze(model, dtype=jnp.float32)  # what certify_dataset certifies
  logits = frozen(jnp.asarray(x, jnp.float32))
  y = np.asarray(jnp.argmax(logits, axis=-1))
  lip = max(frozen.lipschitz_bound(), 1e-30)
  m = float(aol_jax.margins(logits, y)[0])
  # Radii just inside and around the exact-arithmetic boundary m / (sqrt(2) L).
  eps_list = tuple(max(m, 0.0) / (math.sqrt(2) * lip) * f for f in (0.5, 0.999, 1.0, 1.001))
  # The largest radius each evaluation is certified at: 'float32_statistical' covers float32
  # (and, through its derivation, exact arithmetic), 'float64' exact arithmetic and float64.
  largest = {np.float32: 0.0, np.float64: 0.0}
  for rounding in aol_jax.ROUNDING_MODES:
    result = aol_jax.certify_dataset(model, x, y, eps_list=eps_list, batch_size=1,
                                     rounding=rounding)
    certified = [e for e, c in zip(result.eps_list, result.num_certified) if c]
    if certified:
      for dtype in (np.float32, np.float64) if rounding == "float32_statistical" else (np.float64,):
        largest[dtype] = max(largest[dtype], max(certified))
  for dtype, eps in largest.items():
    if eps > 0:
      # float32 points lie within ||x - x32|| of x: attack inside the ball of x.
      gap = float(np.linalg.norm(x.astype(np.float64) - x.astype(dtype).astype(np.float64)))
      worst = _attack(frozen, x, y, max(eps - gap, 0.0), dtype)
      assert worst > 0, (dtype, eps, m, worst)
