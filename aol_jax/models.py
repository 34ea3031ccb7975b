"""The AOL paper's networks (Table 2) as Flax NNX modules.

Every model maps images in ``[0, 1]``, NHWC, to logits, and is 1-Lipschitz (l2) by
construction; :meth:`AOLNetwork.lipschitz_bound` returns the constant to certify with: the
product of what its layers state (:mod:`aol_jax.certification.protocol`), times
``max(1 / std)`` when the model normalises its input.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from aol_jax.blocks import ConcatenationPooling, FirstChannels, Flatten, MaxMin
from aol_jax.certification import probabilistic, protocol, worst_case
from aol_jax.certification.probabilistic import RoundingTerms
from aol_jax.certification.worst_case import WorstCaseTerms
from aol_jax.layers import AOLConv, AOLDense


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


def _dense_tail(in_features: int, width: int, depth: int, num_classes: int,
                rngs: nnx.Rngs) -> list[nnx.Module]:
  """AOLDense(in -> width), ``depth - 1`` x [MaxMin, AOLDense(width -> width)],
  FirstChannels(num_classes): the dense part every family ends with (none for depth 0)."""
  layers: list[nnx.Module] = [AOLDense(in_features, width, rngs=rngs)] if depth else []
  for _ in range(depth - 1):
    layers += [MaxMin(), AOLDense(width, width, rngs=rngs)]
  layers.append(FirstChannels(num_classes))
  return layers


def aol_convnet(num_classes: int = 10, *, width: int = 16, channels: int = 192,
                conv_depth: int = 12, dense_depth: int = 14, pool: int = 4,
                image_size: int = 32, in_channels: int = 3, rngs: nnx.Rngs,
                **normalisation) -> AOLNetwork:
  """The AOL-{Small, Medium, Large} family of Table 2, with every size a parameter.

  ConcatenationPooling(pool) -> 1x1 conv to ``channels`` + MaxMin -> ``conv_depth`` x
  [3x3 conv + MaxMin] -> 1x1 conv -> FirstChannels(width) -> Flatten -> ``dense_depth``
  dense layers of ``(image_size / pool)^2 * width`` features with MaxMin between them ->
  FirstChannels(num_classes). Identity init for size-preserving layers, orthogonal else.
  """
  if image_size % pool:
    raise ValueError(f"image_size {image_size} must be divisible by pool {pool}.")
  features = (image_size // pool) ** 2 * width
  if not num_classes <= features or width > channels:
    raise ValueError(f"num_classes ({num_classes}) must be <= {features} dense features and "
                     f"width ({width}) <= channels ({channels}).")
  layers: list[nnx.Module] = [
      ConcatenationPooling(pool),
      AOLConv(in_channels * pool * pool, channels, (1, 1), rngs=rngs), MaxMin()]
  for _ in range(conv_depth):
    layers += [AOLConv(channels, channels, (3, 3), padding="SAME", rngs=rngs), MaxMin()]
  layers += [AOLConv(channels, channels, (1, 1), rngs=rngs), FirstChannels(width), Flatten()]
  layers += _dense_tail(features, features, dense_depth, num_classes, rngs)
  return AOLNetwork(layers, **normalisation)


def aol_small(num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> AOLNetwork:
  """AOL-Small (w = 16, about 18.7M parameters); ``kwargs`` override :func:`aol_convnet` sizes."""
  return aol_convnet(num_classes, **{"width": 16, **kwargs}, rngs=rngs)


def aol_medium(num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> AOLNetwork:
  """AOL-Medium (w = 32, about 62.8M parameters); ``kwargs`` override :func:`aol_convnet` sizes."""
  return aol_convnet(num_classes, **{"width": 32, **kwargs}, rngs=rngs)


def aol_large(num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> AOLNetwork:
  """AOL-Large (w = 48, about 136.2M parameters); ``kwargs`` override :func:`aol_convnet` sizes."""
  return aol_convnet(num_classes, **{"width": 48, **kwargs}, rngs=rngs)


def aol_fc(num_classes: int = 10, *, width: int = 1024, depth: int = 10, image_size: int = 32,
           in_channels: int = 3, rngs: nnx.Rngs, **normalisation) -> AOLNetwork:
  """Fully connected AOL network, the "FC" family of the paper's Table 6 ablation.

  The paper does not list its layers; this is our choice, kept parallel to the dense part
  of AOL-Small: Flatten -> AOLDense(``image_size^2 * in_channels`` -> ``width``)
  (orthogonal init) + MaxMin -> ``depth - 1`` x AOLDense(``width`` -> ``width``) (identity
  init), MaxMin between them and not after the last -> FirstChannels(num_classes).
  Defaults: 3072 -> 1024 then 9 x 1024 -> 1024, about 12.6M parameters.
  """
  if depth < 1 or width % 2 or num_classes > width:
    raise ValueError(f"Need depth >= 1, an even width and num_classes <= width; got depth="
                     f"{depth}, width={width}, num_classes={num_classes}.")
  features = image_size * image_size * in_channels
  layers = [Flatten(), *_dense_tail(features, width, depth, num_classes, rngs)]
  return AOLNetwork(layers, **normalisation)


def aol_std(num_classes: int = 10, *, channels: int = 32, num_stages: int = 3,
            blocks_per_stage: int = 2, dense_width: int = 1024, dense_depth: int = 2,
            image_size: int = 32, in_channels: int = 3, rngs: nnx.Rngs,
            **normalisation) -> AOLNetwork:
  """A standard AOL conv net that downsamples, the "std" family of the paper's Table 6.

  The paper specifies only the downsampling (ConcatenationPooling plus a 1x1 conv); the
  rest is our choice. 1x1 conv ``in_channels -> c`` + MaxMin, then per stage
  ``blocks_per_stage`` x [3x3 conv ``c -> c`` + MaxMin] followed by ConcatenationPooling(2)
  (``H x W x c -> H/2 x W/2 x 4c``) and a 1x1 conv ``4c -> 2c`` + MaxMin, so channels double
  as the side halves; then Flatten, ``dense_depth`` AOLDense layers of ``dense_width`` with
  MaxMin between them, and FirstChannels(num_classes). Defaults on 32x32x3: 32 -> 64 ->
  128 -> 256 channels, 4x4x256 -> 1024 -> 1024, about 5.8M parameters.
  """
  if image_size % (2 ** num_stages):
    raise ValueError(f"image_size {image_size} must be divisible by 2**num_stages = "
                     f"{2 ** num_stages}.")
  if dense_depth < 1 or channels % 2 or dense_width % 2 or num_classes > dense_width:
    raise ValueError("Need dense_depth >= 1, even channels and dense_width, and num_classes "
                     f"<= dense_width; got {dense_depth}, {channels}, {dense_width}, "
                     f"{num_classes}.")
  c = channels
  layers: list[nnx.Module] = [AOLConv(in_channels, c, (1, 1), rngs=rngs), MaxMin()]
  for _ in range(num_stages):
    for _ in range(blocks_per_stage):
      layers += [AOLConv(c, c, (3, 3), padding="SAME", rngs=rngs), MaxMin()]
    layers += [ConcatenationPooling(2), AOLConv(4 * c, 2 * c, (1, 1), rngs=rngs), MaxMin()]
    c *= 2
  features = (image_size // 2 ** num_stages) ** 2 * c
  layers += [Flatten(), *_dense_tail(features, dense_width, dense_depth, num_classes, rngs)]
  return AOLNetwork(layers, **normalisation)


MODELS: dict[str, Callable[..., AOLNetwork]] = {
    "aol_small": aol_small,
    "aol_medium": aol_medium,
    "aol_large": aol_large,
    "aol_fc": aol_fc,
    "aol_std": aol_std,
}
"""Model name -> constructor ``(num_classes=10, *, rngs, **sizes)``."""
