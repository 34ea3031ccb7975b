"""The certified container: a sequence of layers that states its own Lipschitz bound.

:meth:`AOLNetwork.lipschitz_bound` returns the constant to certify with: the product of what
its steps state (the protocol of :mod:`aol_jax.certification`), the input normalisation's
``max(1 / std)`` included. The paper's architectures are built from it in
:mod:`aol_jax._src.architectures`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aol_jax._src.certification import protocol, rigorous, statistical
from aol_jax._src.certification.statistical import StatisticalTerms
from aol_jax._src.spectral_bounds import FloatFormat


def _channel_values(values, name: str, *, positive: bool) -> tuple[float, ...] | None:
  """``values`` (a number or a sequence) as a tuple of finite floats, else ValueError."""
  if values is None:
    return None
  seq = (values,) if isinstance(values, numbers.Real) else tuple(np.asarray(values).reshape(-1))
  try:
    out = tuple(float(v) for v in seq)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number or a sequence of numbers, got {values!r}.")
  if not out or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
    want = "finite and positive" if positive else "finite"
    raise ValueError(f"{name} must be one or more {want} numbers (one per input channel), "
                     f"got {values!r}.")
  return out


@protocol.library_class
class Normalisation:
  """The step ``(x - mean) / std`` per channel (the last axis), as a certificate sees it.

  Built from an :class:`AOLNetwork`'s attributes as they are when it is certified, validated
  then (``std`` finite and positive, one value or one per channel). Its Lipschitz constant
  is ``max(1 / std)`` for the values the evaluation divides by: float64, and float32 as the
  float32 evaluation rounds them (the larger of the two, rounded up).
  """

  def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None):
    self.mean = _channel_values(mean, "input_mean", positive=False) or (0.0,)
    self.std = _channel_values(std, "input_std", positive=True) or (1.0,)
    for value in self.std:
      held = float(np.float32(value))
      if not (math.isfinite(held) and held > 0):
        raise ValueError(f"input_std {value!r} is {held} in float32, which a float32 "
                         "evaluation divides by; use a value within float32's range.")

  def check_channels(self, channels: int) -> None:
    for name, values in (("input_mean", self.mean), ("input_std", self.std)):
      if len(values) not in (1, channels):
        raise ValueError(f"{name} has {len(values)} channels but the input has {channels} "
                         "(its last axis); the normalisation would broadcast the input to "
                         f"{len(values)} channels and raise the Lipschitz constant. Give "
                         f"one value per input channel, or one number.")

  def __call__(self, x: jax.Array) -> jax.Array:
    self.check_channels(x.shape[-1])
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

  def lipschitz_bound(self) -> float:
    worst = 0.0
    for s in self.std:
      for held in (s, float(np.float32(s))):
        worst = max(worst, rigorous.div_up(1.0, held))
    return worst

  def statistical_terms(self) -> StatisticalTerms:
    return statistical.normalisation_terms(self.lipschitz_bound())

  def rounding_error(self, x: jax.Array, fmt: FloatFormat) -> tuple[jax.Array, jax.Array]:
    self.check_channels(x.shape[-1])
    x = x.astype(fmt.name)
    return self(x), rigorous.normalisation_error(x, self.mean, self.std, fmt)

  def rounding_error_slope(self, fmt: FloatFormat) -> float:
    return rigorous.normalisation_slope(self.lipschitz_bound(), fmt)


@protocol.library_class
class AOLNetwork(nnx.Module):
  """A sequence of Lipschitz layers behind an optional per-channel normalisation.

  Each layer states its l2 Lipschitz constant and rounding (the protocol of
  :mod:`aol_jax.certification`: the AOL layers and the blocks do; ``nnx.Linear``,
  ``nnx.Conv`` and unknown modules do not and are refused by :meth:`lipschitz_bound`, hence
  by certification). A network inside a network is expanded into its own steps. Every
  module its forward pass can reach must be declared: a module held outside ``layers`` (a
  subclass's extra head) is refused, and so is a subclass that overrides ``__call__``
  without stating its own ``certification_steps``.

  Args:
    layers: the layers, applied in order.
    input_mean, input_std: optional normalisation ``(x - mean) / std`` applied first, a
      number or one value per input channel (the input's last axis must have that many
      channels, or the value is one number; never broadcast to more channels). It
      multiplies the Lipschitz constant by ``max(1 / std)``, which :meth:`lipschitz_bound`
      includes. Both are validated again whenever the network is certified or called.
  """
  _FORWARD_METHODS = ("_forward", "_normalisation")

  def __init__(self, layers: Sequence[nnx.Module], *,
               input_mean: float | Sequence[float] | None = None,
               input_std: float | Sequence[float] | None = None):
    self.layers = nnx.List(list(layers))
    self.input_mean = _channel_values(input_mean, "input_mean", positive=False)
    self.input_std = _channel_values(input_std, "input_std", positive=True)

  def _normalisation(self) -> Normalisation | None:
    if self.input_mean is None and self.input_std is None:
      return None
    return Normalisation(self.input_mean, self.input_std)

  def certification_steps(self) -> list[tuple[tuple, object]]:
    """``(path, step)`` in the order the forward pass applies them: the normalisation (if
    any), then each layer. Refuses a module held outside ``layers``."""
    for path, module in nnx.iter_modules(self):
      if path and path[0] != "layers":
        raise protocol.UndeclaredBoundError(
            path, module, "certification_steps", "is held outside the network's layers, "
            "where no bound covers it (a subclass's forward pass may apply it)")
    steps: list[tuple[tuple, object]] = []
    normalisation = self._normalisation()
    if normalisation is not None:
      steps.append((("normalisation",), normalisation))
    steps += [(("layers", i), layer) for i, layer in enumerate(self.layers)]
    return steps

  def lipschitz_bound(self) -> float:
    """``max(1 / std) * prod_k L_k``, rounded up: the l2 Lipschitz constant from input to
    logits in exact arithmetic.

    Raises :class:`aol_jax.certification.UndeclaredBoundError` (naming the layer and its
    path) if a layer states no constant, or computes something its statement does not cover.
    """
    return protocol.lipschitz_bound(self)

  def statistical_terms(self) -> StatisticalTerms:
    """The steps' :class:`~aol_jax.certification.StatisticalTerms` composed in order."""
    return protocol.statistical_terms(self)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self._forward(x)

  def _forward(self, x: jax.Array) -> jax.Array:
    normalisation = self._normalisation()
    if normalisation is not None:
      x = normalisation(x)
    for layer in self.layers:
      x = layer(x)
    return x
