"""Empirical attacks, used to try to break the certificates."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from aol_jax._src.certification.margins import margins


def _project(x: jax.Array, x_adv: jax.Array, eps: jax.Array,
             clip: tuple[float, float] | None) -> jax.Array:
  """Into the box (if any), then onto the l2 ball ``||x_adv - x|| <= eps`` around ``x``.

  Shrinking towards ``x`` after clipping stays inside the box because the box is convex
  and contains ``x``, so the result lies in both sets.
  """
  if clip is not None:
    x_adv = jnp.clip(x_adv, *clip)
  delta = x_adv - x
  norm = jnp.sqrt(jnp.sum(delta ** 2, axis=tuple(range(1, x.ndim)), keepdims=True))
  scale = jnp.minimum(1.0, eps / jnp.maximum(norm, 1e-30))
  return x + delta * scale


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "clip"))
def _pgd(graphdef, state, x, y, eps, step_size, key, *, steps: int,
         clip: tuple[float, float] | None):
  model = nnx.merge(graphdef, state)
  eps = jnp.broadcast_to(jnp.asarray(eps, x.dtype), x.shape[:1]).reshape(
      (-1,) + (1,) * (x.ndim - 1))
  margin = lambda z: margins(model(z), y)
  grad = jax.grad(lambda z: jnp.sum(margin(z)))
  axes = tuple(range(1, x.ndim))

  start = x
  if key is not None:
    noise = jax.random.normal(key, x.shape, x.dtype)
    noise /= jnp.sqrt(jnp.sum(noise ** 2, axis=axes, keepdims=True))
    start = _project(x, x + 0.5 * eps * noise, eps, clip)

  def body(carry, _):
    z, best, best_m = carry
    g = grad(z)
    g = g / jnp.maximum(jnp.sqrt(jnp.sum(g ** 2, axis=axes, keepdims=True)), 1e-30)
    z = _project(x, z - step_size * eps * g, eps, clip)
    m = margin(z)
    better = m < best_m
    best = jnp.where(better.reshape(eps.shape), z, best)
    return (z, best, jnp.minimum(m, best_m)), None

  m0 = margin(start)
  (_, best, best_m), _ = jax.lax.scan(body, (start, start, m0), None, length=steps)
  return best, best_m


def pgd_l2(model: nnx.Module, x: ArrayLike, y: ArrayLike, eps: ArrayLike, *, steps: int = 50,
           step_size: float = 0.1, clip: tuple[float, float] | None = None,
           key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """l2 projected gradient descent on the margin ``s_y - max_{j != y} s_j``.

  ``x_{t+1} = Proj_{||x' - x|| <= eps} (x_t - alpha eps g_t / ||g_t||)`` with ``g_t`` the
  gradient of the margin, per example (Madry et al., ICLR 2018, in its l2 form). The
  attack succeeds on an example when the returned margin is <= 0 (label no longer the
  unique argmax). The whole loop is one ``jax.jit``-compiled ``lax.scan``.

  Args:
    model: maps ``x`` to logits (an ``AOLNetwork``, trained or frozen).
    x: ``(batch, ...)`` clean inputs.
    y: ``(batch,)`` integer labels.
    eps: l2 radius, scalar or one per example.
    steps: gradient steps.
    step_size: ``alpha``, the step as a fraction of ``eps``.
    clip: optional box, e.g. ``(0, 1)``, that adversarial inputs also stay in.
    key: optional PRNG key for a random start inside the ball (default: start at ``x``).

  Returns:
    ``(x_adv, margin)``: per example the iterate with the lowest margin seen (including
    the start) and that margin, computed by the same float32 forward pass.
  """
  graphdef, state = nnx.split(model)
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  return _pgd(graphdef, state, x, y, jnp.asarray(eps, jnp.float32),
              jnp.asarray(step_size, jnp.float32), key, steps=steps, clip=clip)
