"""An AOL network's unconstrained twin: the baseline that shows what the guarantee costs."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from aol_jax import aol_init
from aol_jax import AOLConv, AOLDense
from aol_jax import AOLNetwork


class PlainNetwork(nnx.Module):
  """An unconstrained network: the layers of an AOL network with plain convs and denses.

  It has no ``lipschitz_bound``, on purpose: nothing bounds its Lipschitz constant, so
  :func:`aol_jax.certify_dataset` must not (and cannot) certify it.
  """

  def __init__(self, layers: Sequence[nnx.Module]):
    self.layers = nnx.List(list(layers))

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


def plain_like(model: AOLNetwork, *, seed: int) -> PlainNetwork:
  """``model``'s architecture with each AOLConv / AOLDense replaced by ``nnx.Conv`` /
  ``nnx.Linear`` of the same shape, padding and (identity / orthogonal) initialisation."""
  if model.input_mean is not None or model.input_std is not None:
    raise ValueError("plain_like copies networks without input normalisation only.")
  rngs = nnx.Rngs(seed)
  layers = []
  for layer in model.layers:
    if isinstance(layer, AOLConv):
      layer = nnx.Conv(layer.in_features, layer.out_features, layer.kernel_size,
                       padding=layer.padding, kernel_init=aol_init(), rngs=rngs)
    elif isinstance(layer, AOLDense):
      layer = nnx.Linear(layer.in_features, layer.out_features, kernel_init=aol_init(),
                         rngs=rngs)
    layers.append(layer)
  return PlainNetwork(layers)
