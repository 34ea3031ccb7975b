"""The certified container: a sequence of layers that states its own Lipschitz bound.

:meth:`AOLNetwork.lipschitz_bound` returns the constant to certify with: the product of what
its layers state (the protocol of :mod:`aol_jax.certification`), times ``max(1 / std)`` when
the network normalises its input. The paper's architectures are built from it in
:mod:`aol_jax._src.architectures`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from aol_jax._src.certification import probabilistic, protocol, worst_case
from aol_jax._src.certification.probabilistic import RoundingTerms
from aol_jax._src.certification.worst_case import WorstCaseTerms


def _channel_values(values, name: str, *, positive: bool) -> tuple[float, ...] | None:
  """``values`` (a number or a sequence) as a tuple of finite floats, else ValueError."""
  if values is None:
    return None
  seq = (values,) if isinstance(values, numbers.Real) else tuple(values)
  try:
    out = tuple(float(v) for v in seq)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number or a sequence of numbers, got {values!r}.")
  if not out or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
    want = "finite and positive" if positive else "finite"
    raise ValueError(f"{name} must be one or more {want} numbers (one per input channel), "
                     f"got {values!r}.")
  return out


_FORWARD_METHODS = ("__call__", "_forward", "logits_and_activation_norm")


class AOLNetwork(nnx.Module):
  """A sequence of Lipschitz layers behind an optional per-channel normalisation.

  Each layer states its l2 Lipschitz constant and rounding
  (:mod:`aol_jax.certification.protocol`: the AOL layers and the blocks do; ``nnx.Linear``,
  ``nnx.Conv`` and unknown modules do not and are refused by :meth:`lipschitz_bound`, hence
  by certification). The network states the same three things about itself, so it can
  also be a layer of a larger ``AOLNetwork``. Every module its forward pass can reach must
  be declared: a module held outside ``layers`` (a subclass's extra head) is refused, and
  so is a subclass that overrides ``__call__`` without stating its own bounds (overriding
  the method asked for).

  Args:
    layers: the layers, applied in order.
    input_mean, input_std: optional normalisation ``(x - mean) / std`` applied first, a
      number or one value per input channel (the input's last axis must have that many
      channels, or the value is one number; never broadcast to more channels). It
      multiplies the Lipschitz constant by ``max(1 / std)``, which :meth:`lipschitz_bound`
      includes, so certificates stay sound.
  """

  def __init__(self, layers: Sequence[nnx.Module], *,
               input_mean: float | Sequence[float] | None = None,
               input_std: float | Sequence[float] | None = None):
    self.layers = nnx.List(list(layers))
    self.input_mean = _channel_values(input_mean, "input_mean", positive=False)
    self.input_std = _channel_values(input_std, "input_std", positive=True)

  def _paths(self):
    return [(("layers", i), layer) for i, layer in enumerate(self.layers)]

  def _check_declared(self, method: str) -> None:
    """Refuses a module outside ``layers``, and an overridden forward pass whose class
    does not state ``method`` itself."""
    for path, module in nnx.iter_modules(self):
      if path and path[0] != "layers":
        raise protocol.UndeclaredBoundError(
            path, module, method, "is held outside the network's layers, where no bound "
            "covers it (a subclass's forward pass may apply it)")
    cls = type(self)
    overridden = [m for m in _FORWARD_METHODS if getattr(cls, m) is not getattr(AOLNetwork, m)]
    if overridden and getattr(cls, method) is getattr(AOLNetwork, method):
      raise protocol.UndeclaredBoundError(
          (), self, method, f"overrides {overridden[0]} (its forward pass is no longer the "
          f"layers in order) but not {method}()")

  def _terms_in_order(self, layer_terms, normalisation):
    terms = []
    if self.input_mean is not None or self.input_std is not None:
      terms.append(normalisation)
    return terms + [layer_terms(path, layer) for path, layer in self._paths()]

  def lipschitz_bound(self) -> float:
    """``max(1 / std) * prod_k L_k``: the l2 Lipschitz constant from input to logits.

    Raises :class:`aol_jax.UndeclaredBoundError` (naming the layer and its path) if a layer
    states no constant, or a module outside ``layers`` could be applied.
    """
    self._check_declared("lipschitz_bound")
    lip = 1.0 if self.input_std is None else max(1.0 / s for s in self.input_std)
    for path, layer in self._paths():
      lip *= protocol.lipschitz_bound(layer, path)
    return lip

  def rounding_terms(self) -> RoundingTerms:
    """The layers' :class:`~aol_jax.certification.probabilistic.RoundingTerms` composed in
    order (:func:`~aol_jax.certification.probabilistic.compose`), the normalisation first."""
    self._check_declared("rounding_terms")
    terms = probabilistic.compose(self._terms_in_order(
        lambda path, layer: protocol.rounding_terms(layer, path),
        probabilistic.normalisation_terms(self.input_std)))
    # The same constant as lipschitz_bound(), whatever the order of the products.
    return dataclasses.replace(terms, lipschitz=max(terms.lipschitz, self.lipschitz_bound()))

  def worst_case_terms(self, input_shape: Sequence[int]) -> WorstCaseTerms:
    """The layers' :class:`~aol_jax.certification.worst_case.WorstCaseTerms` chained by
    :func:`~aol_jax.certification.worst_case.compose`, the normalisation first."""
    self._check_declared("worst_case_terms")
    shape = tuple(input_shape)
    self._check_channels(shape[-1])
    terms = []
    if self.input_mean is not None or self.input_std is not None:
      terms.append(worst_case.normalisation_terms(self.input_mean, self.input_std, shape))
    for path, layer in self._paths():
      terms.append(protocol.worst_case_terms(layer, shape, path))
      shape = jax.eval_shape(layer, jax.ShapeDtypeStruct((1, *shape), jnp.float32)).shape[1:]
    return worst_case.compose(terms)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self._forward(x, track_norm=False)[0]

  def logits_and_activation_norm(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The logits and, per example, ``M = max_k ||x_k||_2`` over every activation ``x_k``.

    ``x_0`` is the raw input, then the normalised input, then each layer's output, and
    inside a nested network (a layer with ``logits_and_activation_norm``) its own
    activations. ``M`` scales the float32 rounding allowance of
    :func:`aol_jax.certification.probabilistic.rounding_allowance`.
    """
    return self._forward(x, track_norm=True)

  def _check_channels(self, channels: int) -> None:
    for name, values in (("input_mean", self.input_mean), ("input_std", self.input_std)):
      if values is not None and len(values) not in (1, channels):
        raise ValueError(f"{name} has {len(values)} channels but the input has {channels} "
                         "(its last axis); the normalisation would broadcast the input to "
                         f"{len(values)} channels and raise the Lipschitz constant. Give "
                         f"one value per input channel, or one number.")

  def _forward(self, x: jax.Array, *, track_norm: bool) -> tuple[jax.Array, jax.Array | None]:
    batch = x.shape[0]
    max_norm = None

    def track(n: jax.Array) -> None:
      nonlocal max_norm
      max_norm = n if max_norm is None else jnp.maximum(max_norm, n)

    def norm(a: jax.Array) -> jax.Array:
      return jnp.linalg.norm(a.reshape(batch, -1).astype(jnp.float32), axis=-1)

    self._check_channels(x.shape[-1])
    if track_norm:
      track(norm(x))
    if self.input_mean is not None:
      x = x - jnp.asarray(self.input_mean, x.dtype)
    if self.input_std is not None:
      x = x / jnp.asarray(self.input_std, x.dtype)
    for layer in self.layers:
      if track_norm:
        track(norm(x))
      if track_norm and hasattr(layer, "logits_and_activation_norm"):
        x, inner = layer.logits_and_activation_norm(x)
        track(inner)
      else:
        x = layer(x)
    if track_norm:
      track(norm(x))
    return x, max_norm
