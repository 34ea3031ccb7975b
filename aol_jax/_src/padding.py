"""Which conv paddings keep the AOL bound, and how to apply them.

Theorem 2 of the AOL paper holds for zero padding of any amount and for circular padding.
Reflect / edge / symmetric padding copies input values, so one input pixel feeds several
padded positions and the layer's norm can exceed 1: those modes are refused.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]

_ACCEPTED = ("Accepted: 'SAME', 'VALID', 'CIRCULAR', an int, a sequence of ints, or a sequence "
             "of (low, high) int pairs (zeros).")
_UNSOUND = ("REFLECT", "EDGE", "SYMMETRIC", "REPLICATE", "WRAP_REFLECT")


def normalize_padding(padding: PaddingLike, num_spatial: int) -> str | tuple[tuple[int, int], ...]:
  """Returns 'SAME', 'VALID', 'CIRCULAR' or explicit ``((lo, hi),) * num_spatial`` zero pads."""
  if isinstance(padding, str):
    mode = padding.upper()
    if mode in ("SAME", "VALID", "CIRCULAR"):
      return mode
    if mode in _UNSOUND:
      raise ValueError(
          f"padding={padding!r} voids the AOL Lipschitz bound: it repeats input values at the "
          "border, so one input pixel reaches the output through several taps and the layer's "
          "norm can exceed 1. Use 'SAME', 'VALID', explicit zero padding or 'CIRCULAR'.")
    raise ValueError(f"Unknown padding {padding!r}. {_ACCEPTED}")
  if isinstance(padding, numbers.Integral):
    pads = ((int(padding), int(padding)),) * num_spatial
  else:
    if not isinstance(padding, Sequence):
      raise ValueError(f"Unknown padding {padding!r}. {_ACCEPTED}")
    padding = list(padding)
    # Each entry is one int (same low and high) or a (low, high) pair, per spatial dim.
    pads = tuple((p, p) if isinstance(p, numbers.Integral) else
                 tuple(p) if isinstance(p, Sequence) and not isinstance(p, str) else (p,)
                 for p in padding)
    if len(pads) != num_spatial or any(len(p) != 2 for p in pads):
      raise ValueError(f"Explicit padding {padding!r} must give one int or one (low, high) pair "
                       f"per spatial dimension ({num_spatial}).")
  if any(not isinstance(v, numbers.Integral) or v < 0 for p in pads for v in p):
    raise ValueError(f"Explicit padding must be non-negative integers, got {padding!r}.")
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return pads


def circular_pad(x: jax.Array, kernel_size: Sequence[int], dilation: Sequence[int]) -> jax.Array:
  """Wraps the spatial dims of ``x`` (``(batch, *spatial, c)``) as 'SAME' would zero-pad them."""
  pads = [(0, 0)]
  for k, r in zip(kernel_size, dilation):
    total = (k - 1) * r
    pads.append((total // 2, total - total // 2))
  pads.append((0, 0))
  return jnp.pad(x, pads, mode="wrap")
