"""aol_jax: certifiably robust Lipschitz networks from Almost-Orthogonal Lipschitz layers."""

from aol_jax import attacks, certification, lipschitz, models, sharding
from aol_jax.attacks import pgd_l2
from aol_jax.blocks import (ConcatenationPooling, FirstChannels, Flatten, GroupSort, MaxMin,
                            ZeroChannelPad)
from aol_jax.certification.dataset import ROUNDING_MODES, certified_radii, certify_dataset
from aol_jax.certification.export import export_certified
from aol_jax.certification.margins import margins
from aol_jax.certification.probabilistic import RoundingTerms, rounding_allowance
from aol_jax.certification.protocol import (ExactMap, UndeclaredBoundError, register_exact_map,
                                            rounding_terms)
from aol_jax.certification.results import CertificationResult, certification_markdown
from aol_jax.certification.rule import STANDARD_RADII, certified_robust_accuracy, certify
from aol_jax.certification.worst_case import WorstCaseTerms
from aol_jax.freeze import freeze
from aol_jax.initializers import aol_init
from aol_jax.layers import AOLConv, AOLDense, RescaledKernel
from aol_jax.losses import offset_cross_entropy
from aol_jax.models import MODELS, AOLNetwork
from aol_jax.rescaling import conv_factors, conv_gram, dense_factors, rescale_conv, rescale_dense
from aol_jax.sharding import sharded_rescaling

__all__ = [
    "AOLConv", "AOLDense", "AOLNetwork", "CertificationResult", "ConcatenationPooling",
    "ExactMap", "FirstChannels", "Flatten", "GroupSort", "MODELS", "MaxMin", "ROUNDING_MODES",
    "RescaledKernel", "RoundingTerms", "STANDARD_RADII", "UndeclaredBoundError",
    "WorstCaseTerms", "ZeroChannelPad", "aol_init", "attacks", "certification",
    "certification_markdown", "certified_radii", "certified_robust_accuracy", "certify",
    "certify_dataset",
    "conv_factors", "conv_gram", "dense_factors", "export_certified", "freeze", "lipschitz", "margins", "models",
    "offset_cross_entropy", "pgd_l2", "register_exact_map", "rescale_conv", "rescale_dense",
    "rounding_allowance", "rounding_terms", "sharded_rescaling", "sharding",
]

__version__ = "0.1.0"
