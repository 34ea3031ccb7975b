"""The radii a run reports, and their labels in result files (``36/255``, ``1``, ``1.58``)."""

from __future__ import annotations

from aol_jax import STANDARD_RADII
from aol_jax.certification import radius_label

__all__ = ["MNIST_RADIUS", "STANDARD_RADII", "radii", "radius_label"]

# The l2 radius that MNIST papers report (in [0, 1] pixel units), beside the standard ones.
MNIST_RADIUS = 1.58
_EXTRA_RADII = {"mnist5k": (MNIST_RADIUS,)}


def radii(dataset: str) -> tuple[float, ...]:
  """The radii of ``dataset``'s results: the standard ones, and 1.58 for MNIST."""
  return tuple(STANDARD_RADII) + _EXTRA_RADII.get(dataset, ())
