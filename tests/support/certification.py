"""Shared by the certification tests: an independent margin, data, small models, and the
float64 comparison the statistical allowance is checked against."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import aol_jax
from aol_jax._src.certification.protocol import flatten
from aol_jax._src.certification.protocol import statistical_terms as rounding_terms
from aol_jax._src.certification.statistical import operation_count
from aol_jax._src.spectral_bounds import FLOAT32_UNIT_ROUNDOFF


def logits_and_activation_norm(model, x):
  """The logits and, per example, the largest l2 norm of the input and of every step's
  output (the network's own float32 forward pass, step by step)."""
  norm = lambda a: jnp.linalg.norm(a.reshape(a.shape[0], -1).astype(jnp.float32), axis=-1)
  largest = norm(x)
  for _, step in flatten(model):
    x = step(x)
    largest = jnp.maximum(largest, norm(x))
  return x, largest


def numpy_margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  out = []
  for s, y in zip(logits.astype(np.float64), labels):
    others = [s[j] for j in range(len(s)) if j != y]
    out.append(s[y] - max(others))
  return np.array(out)


# At XLA's default level the CPU compiler unrolls jax.random's small nested loops: one
# eager normal draw of a small conv kernel's shape compiles for 1-3 s, at the lowest level
# in 0.1 s. (A few values differ from the default level's draw in the last bit: its erfinv
# rounds differently.)
@functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                              "xla_llvm_disable_expensive_passes": True})
def _perturbed(leaves: list, key: jax.Array, scale: float) -> list:
  keys = jax.random.split(key, len(leaves))
  return [(p + scale * jax.random.normal(k, p.shape)).astype(p.dtype)
          for p, k in zip(leaves, keys)]


def trained_like(model: nnx.Module, scale: float, seed: int) -> nnx.Module:
  """Perturbs every parameter so kernels and biases look trained (not identity-like)."""
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  leaves = _perturbed(leaves, jax.random.key(seed), scale)
  nnx.update(model, jax.tree.unflatten(tree, leaves))
  return model


SMALL_FAMILIES = {
    "aol_small": dict(channels=32, conv_depth=3, dense_depth=4, image_size=16, pool=4),
    "aol_medium": dict(channels=32, conv_depth=2, dense_depth=3, image_size=16, pool=4),
    "aol_large": dict(channels=64, conv_depth=2, dense_depth=3, image_size=16, pool=4),
    "aol_fc": dict(width=256, depth=6, image_size=16),
    "aol_std": dict(channels=16, num_stages=2, blocks_per_stage=2, dense_width=256,
                    image_size=16),
}


@jax.jit(static_argnums=0)
def _logits_and_norm(graphdef, state, x):
  return logits_and_activation_norm(nnx.merge(graphdef, state), x)


@jax.jit(static_argnums=0)
def _call(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def float64_logits(frozen: nnx.Module, x) -> np.ndarray:
  """The logits of ``frozen``'s own call evaluated in float64 on its float32 parameters
  (promoted exactly): far more precise than any float32 evaluation, and independent of the
  step-by-step evaluation that certification uses."""
  graphdef, state = nnx.split(frozen)
  with jax.enable_x64(True), jax.default_matmul_precision("highest"):
    state64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
    logits64 = _call(graphdef, state64, jnp.asarray(x, jnp.float64))
    assert logits64.dtype == jnp.float64
    return np.asarray(logits64)


def float64_logit_error(frozen: nnx.Module, x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Per example: the l2 gap between the float32 logits and a float64 evaluation of the same
  frozen float32 kernels, and the modelled bound ``u S_f M`` for it."""
  logits32, act_norm = _logits_and_norm(*nnx.split(frozen), x)
  err = np.linalg.norm(float64_logits(frozen, x) - np.asarray(logits32, np.float64), axis=-1)
  bound = FLOAT32_UNIT_ROUNDOFF * rounding_terms(frozen).forward * np.asarray(act_norm)
  return err, bound


def digits_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(n, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, n)


def tiny_std_model(**kw) -> aol_jax.AOLNetwork:
  return aol_jax.aol_std(10, rngs=nnx.Rngs(0), channels=8, num_stages=1, blocks_per_stage=1,
                        dense_width=32, dense_depth=2, image_size=8, in_channels=1, **kw)


def reference_counts(model, images, labels, eps_list):
  """Certifies the whole set in one unbatched call, independently of certify_dataset's
  batching, with the allowance of the derivation written out."""
  frozen = aol_jax.freeze(model)
  logits, act_norm = logits_and_activation_norm(frozen, jnp.asarray(images))
  terms = rounding_terms(frozen)
  lip = max(terms.lipschitz, frozen.lipschitz_bound())  # the same constant in every mode
  m = numpy_margin(np.asarray(logits), labels)
  # M(x) <= P (1 + u S_r) ||x|| + M(0); never below the measured largest activation norm.
  zero_norm = logits_and_activation_norm(frozen, jnp.zeros((1, *images.shape[1:])))[1][0]
  growth = terms.prefix * (1.0 + FLOAT32_UNIT_ROUNDOFF * terms.rescale)
  bound = growth * np.linalg.norm(images.reshape(len(images), -1), axis=1) + float(zero_norm)
  assert np.all(bound >= np.asarray(act_norm))
  graphdef, state = nnx.split(frozen)
  ops = operation_count(lambda s, v: nnx.merge(graphdef, s)(v), state,
                        jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
  u, tiny = FLOAT32_UNIT_ROUNDOFF, 2.0 ** -126
  counts = []
  for e in eps_list:
    allow = (math.sqrt(2) * u * (1 + 2 ** -10) * (terms.forward * (2 * bound + terms.prefix * e)
                                                  + terms.rescale * lip * e)
             + 2 * math.sqrt(2) * terms.amplification * ops * tiny * (1 + 2 ** -10))
    # The rule's own rounding: 8 u above the threshold, plus the smallest normal.
    threshold = (math.sqrt(2) * lip * e + allow) * (1 + 8 * u) + np.finfo(np.float32).tiny
    counts.append(int(np.sum(m > threshold)))
  return int(np.sum(m > 0)), tuple(counts)
