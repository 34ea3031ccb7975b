"""The vocabulary for certifying, and for certifying layers of your own.

A network is certified as the sequence of steps it applies; a step may be certified only if
it states its l2 Lipschitz constant and its rounding (the protocol: see :class:`ExactMap` and
:func:`flatten`); :class:`UndeclaredBoundError` names any that does not. The modes
(:data:`ROUNDING_MODES`) say what a certificate holds for; :func:`prepare` gives the prepared
certifier that :func:`aol_jax.certify_dataset`, :func:`aol_jax.certified_radii` and
:func:`aol_jax.export_certified` share. The formats, the rigorous and the statistical
rounding models' formulas are here for layers of your own.
"""

from aol_jax._src.certification.certifier import Certifier, prepare
from aol_jax._src.certification.modes import DEFAULT_ROUNDING, ROUNDING_MODES, Mode
from aol_jax._src.certification.results import radius_label
from aol_jax._src.certification.protocol import (ExactMap, UndeclaredBoundError, flatten,
                                                 lipschitz_bound, register_exact_map,
                                                 statistical_terms)
from aol_jax._src.certification.rigorous import affine_error, affine_slope
from aol_jax._src.certification.statistical import StatisticalTerms, statistical_allowance
from aol_jax._src.spectral_bounds import FLOAT32, FLOAT64, FloatFormat

__all__ = [
    "Certifier", "DEFAULT_ROUNDING", "ExactMap", "FLOAT32", "FLOAT64", "FloatFormat", "Mode",
    "ROUNDING_MODES", "StatisticalTerms", "UndeclaredBoundError", "affine_error",
    "affine_slope", "flatten", "lipschitz_bound", "prepare", "radius_label", "register_exact_map",
    "statistical_allowance", "statistical_terms",
]
