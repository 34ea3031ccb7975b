"""The vocabulary for certifying networks with layers of your own.

A layer may sit in a certified network only if it states its l2 Lipschitz constant and its
rounding (see :class:`ExactMap` for the methods); :class:`UndeclaredBoundError` names any that
does not. The rounding models a mode certifies with are here too: their terms and allowances.
The drivers (:func:`aol_jax.certify_dataset`, :func:`aol_jax.certified_radii`,
:func:`aol_jax.export_certified`) are at the top level.
"""

from aol_jax._src.certification.modes import DEFAULT_ROUNDING, ROUNDING_MODES, RoundingMode
from aol_jax._src.certification.probabilistic import (RoundingTerms, operation_count,
                                                      rounding_allowance)
from aol_jax._src.certification.protocol import (ExactMap, UndeclaredBoundError,
                                                 lipschitz_bound, register_exact_map,
                                                 rounding_terms, worst_case_terms)
from aol_jax._src.certification.worst_case import WorstCaseTerms, worst_case_allowance

__all__ = [
    "DEFAULT_ROUNDING", "ExactMap", "ROUNDING_MODES", "RoundingMode", "RoundingTerms", "UndeclaredBoundError",
    "WorstCaseTerms", "lipschitz_bound", "operation_count", "register_exact_map",
    "rounding_allowance", "rounding_terms", "worst_case_allowance", "worst_case_terms",
]
