"""The rounding modes of certification: one table, what each certifies and when to use it."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class RoundingMode:
  """One way of certifying: the evaluation its certificates hold for, its rounding model,
  and when to choose it (both modes use the same ``L``; they differ in the allowance)."""
  evaluation: str
  model: str
  use: str


ROUNDING_MODES: dict[str, RoundingMode] = {
    "float32_statistical": RoundingMode(
        evaluation="float32 forward pass",
        model="probabilistic rounding model (aol_jax.certification.probabilistic)",
        use="serving a float32 model (or an export_certified artifact); allowance about 1e-4 "
            "of the margin"),
    "float64": RoundingMode(
        evaluation="float64 forward pass of the float32 weights, and exact arithmetic",
        model="worst-case rounding bounds (aol_jax.certification.worst_case)",
        use="a rigorous statement about exact arithmetic and the float64 pass; allowance "
            "about 1e-11, so it certifies as much or slightly more, but not for a float32 "
            "evaluation"),
}
"""The rounding modes of :func:`certify_dataset`, with what each certifies."""

DEFAULT_ROUNDING = "float32_statistical"
"""The mode of :func:`aol_jax.certify_dataset`, :func:`aol_jax.certified_radii`,
:func:`aol_jax.export_certified` and the experiments when none is named."""

Rounding = Literal[tuple(ROUNDING_MODES)]  # type: ignore[valid-type]

def mode_description(rounding: str) -> str:
  """``'<evaluation>, <model>'`` for a key of :data:`ROUNDING_MODES`."""
  mode = ROUNDING_MODES[rounding]
  return f"{mode.evaluation}, {mode.model}"
