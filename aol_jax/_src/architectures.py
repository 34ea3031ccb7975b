"""The AOL paper's networks (Table 2, and the FC and standard families of Table 6).

Every model maps images in ``[0, 1]``, NHWC, to logits, and is 1-Lipschitz (l2) by
construction: an :class:`~aol_jax.AOLNetwork` of AOL layers and 1-Lipschitz blocks.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from aol_jax._src.blocks import ConcatenationPooling, FirstChannels, Flatten, MaxMin
from aol_jax._src.layers import AOLConv, AOLDense
from aol_jax._src.network import AOLNetwork


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
