"""The paper's optimiser: SGD with Nesterov momentum, step decay, and kernel-only weight decay.

AOL section 5 (reference Keras code): SGD, momentum 0.9, Nesterov, lr 1e-3, 1000 epochs,
lr / 10 at epochs 900, 990 and 999, and an l2 penalty ``5e-4 * sum(P^2)`` on the raw
(un-rescaled) kernels ``P`` only; biases are not decayed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# Fractions of the run (in thousandths) at which the paper divides the lr by 10:
# epochs 900, 990 and 999 of 1000.
_DROPS_PER_MILLE = (900, 990, 999)


def paper_schedule(learning_rate: float, steps_per_epoch: int, epochs: int) -> optax.Schedule:
  """``lr(step) = learning_rate * 0.1 ** #{b in boundaries : step >= b}``.

  The boundaries are at 90%, 99% and 99.9% of the ``steps_per_epoch * epochs`` steps (exactly
  epochs 900, 990, 999 for 1000 epochs), rounded down to a whole step. In a short run
  boundaries may coincide; each still divides by 10.
  """
  if steps_per_epoch < 1 or epochs < 1:
    raise ValueError(f"steps_per_epoch and epochs must be >= 1, got {steps_per_epoch}, {epochs}.")
  total = steps_per_epoch * epochs
  boundaries = jnp.asarray([total * d // 1000 for d in _DROPS_PER_MILLE], jnp.int32)

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    drops = jnp.sum(jnp.asarray(step) >= boundaries)
    return learning_rate * jnp.asarray(0.1, jnp.float32) ** drops

  return schedule


def is_decayed(path: tuple, leaf: object = None) -> bool:
  """True for the raw AOL kernels (a parameter named ``kernel``), False for everything else.

  ``path`` is a jax key path into the parameter state of ``nnx.split(model, nnx.Param, ...)``,
  e.g. ``('layers', 3, 'kernel', 'value')``.
  """
  names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
  names = [n for n in names if n != "value"]
  return bool(names) and names[-1] == "kernel"


def weight_decay_mask(params) -> object:
  """A tree like ``params`` with True at the raw kernels (see :func:`is_decayed`)."""
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(schedule: optax.ScalarOrSchedule, *, momentum: float = 0.9,
                   nesterov: bool = True, weight_decay: float = 5e-4,
                   decay_mask: Callable | None = None) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum on ``grad(loss + weight_decay * sum_kernels P^2)``.

  The penalty follows Keras' ``l2(weight_decay)`` of the reference code, whose gradient is
  ``2 * weight_decay * P`` (PyTorch's ``weight_decay=w`` would be ``w / 2`` here). It is added
  to the gradient before momentum, as a loss term would be, and only where ``decay_mask``
  (default :func:`weight_decay_mask`: the parameters named ``kernel``) is True.
  """
  mask = weight_decay_mask if decay_mask is None else decay_mask
  return optax.chain(
      optax.masked(optax.add_decayed_weights(2.0 * weight_decay), mask),
      optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
  )
