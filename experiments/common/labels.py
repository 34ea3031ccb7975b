"""The radii a run reports, and their labels in result files (``36/255``, ``1``, ``1.58``)."""

from __future__ import annotations

from aol_jax import STANDARD_RADII

__all__ = ["MNIST_RADIUS", "STANDARD_RADII", "radii", "radius_label"]

# The l2 radius that MNIST papers report (in [0, 1] pixel units), beside the standard ones.
MNIST_RADIUS = 1.58
_EXTRA_RADII = {"mnist5k": (MNIST_RADIUS,)}


def radii(dataset: str) -> tuple[float, ...]:
  """The radii of ``dataset``'s results: the standard ones, and 1.58 for MNIST."""
  return tuple(STANDARD_RADII) + _EXTRA_RADII.get(dataset, ())


def radius_label(eps: float) -> str:
  """``36/255`` for a multiple of 1/255 other than 1, else ``1``, ``1.58``: the label of a
  table's column and of a key of ``results.json``, as in the library's Markdown tables."""
  k = eps * 255
  if eps != 1.0 and abs(k - round(k)) < 1e-6:
    return f"{round(k)}/255"
  return f"{eps:g}"
