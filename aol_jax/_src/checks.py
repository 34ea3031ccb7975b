"""Argument checks shared by the layers, the bounds and the certification: each exists once.

Every check raises ``ValueError`` naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx


def positive_ints(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
  """``value`` as ``n`` positive ints (one int stands for all ``n``)."""
  out = (value,) * n if isinstance(value, int) else tuple(value)
  if len(out) != n or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
    raise ValueError(f"{name} must be a positive int or {n} positive ints, got {value!r}.")
  return out


def non_negative(value: Any, what: str, why: str = "") -> float:
  """``value`` as a float if it is a finite real number >= 0 (``why``: what else breaks)."""
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      math.isfinite(value) and value >= 0):
    raise ValueError(f"{what} must be a finite number >= 0, got {value!r}{why}.")
  return float(value)


def feature_groups(groups: Any, what: str, **channels: int) -> int:
  """``groups`` if it is a positive int dividing every count in ``channels``."""
  if (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1
      or any(c % groups for c in channels.values())):
    counts = " and ".join(f"{k}={v}" for k, v in channels.items())
    raise ValueError(f"{what}: feature_group_count={groups!r} must be a positive int dividing "
                     f"{counts}.")
  return groups


def nnx_module(value: Any, what: str) -> None:
  """``value`` is a Flax NNX module (an AOL layer or network)."""
  if not isinstance(value, nnx.Module):
    raise ValueError(f"{what} needs an nnx.Module (an AOL layer or aol_jax.AOLNetwork), got "
                     f"{type(value).__name__}.")
