"""aol_jax: certifiably robust Lipschitz networks from Almost-Orthogonal Lipschitz layers."""

from aol_jax import attacks, lipschitz, models
from aol_jax.attacks import pgd_l2
from aol_jax.blocks import (ConcatenationPooling, FirstChannels, Flatten, GroupSort, MaxMin,
                            ZeroChannelPad)
from aol_jax.certify import (CertificationResult, certification_markdown, certified_robust_accuracy,
                             certify, certify_dataset, margins, rounding_allowance,
                             rounding_terms)
from aol_jax.freeze import freeze
from aol_jax.initializers import aol_init
from aol_jax.layers import AOLConv, AOLDense, RescaledKernel
from aol_jax.losses import offset_cross_entropy
from aol_jax.models import MODELS, AOLNetwork
from aol_jax.rescaling import conv_factors, conv_gram, dense_factors, rescale_conv, rescale_dense

__all__ = [
    "AOLConv", "AOLDense", "AOLNetwork", "CertificationResult", "ConcatenationPooling",
    "FirstChannels", "Flatten", "GroupSort", "MODELS", "MaxMin", "RescaledKernel",
    "ZeroChannelPad", "aol_init", "attacks", "certification_markdown",
    "certified_robust_accuracy", "certify", "certify_dataset", "conv_factors", "conv_gram",
    "dense_factors", "freeze", "lipschitz", "margins", "models", "offset_cross_entropy",
    "pgd_l2", "rescale_conv", "rescale_dense", "rounding_allowance", "rounding_terms",
]

__version__ = "0.1.0"
