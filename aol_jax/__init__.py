"""aol_jax: certifiably robust Lipschitz networks from Almost-Orthogonal Lipschitz layers.

The user-facing names are here; :mod:`aol_jax.certification` holds the vocabulary for
certifying layers of your own, and :mod:`aol_jax.training` the sharded training machinery.
The implementation lives in ``aol_jax._src`` and is private.
"""

from aol_jax import certification, training
from aol_jax._src.architectures import (MODELS, aol_convnet, aol_fc, aol_large, aol_medium,
                                        aol_small, aol_std)
from aol_jax._src.attacks import pgd_l2
from aol_jax._src.blocks import (ConcatenationPooling, FirstChannels, Flatten, GroupSort, MaxMin,
                                 ZeroChannelPad)
from aol_jax._src.certification.dataset import certify_dataset
from aol_jax._src.certification.export import export_certified
from aol_jax._src.certification.radii import certified_radii
from aol_jax._src.certification.margins import margins
from aol_jax._src.certification.modes import ROUNDING_MODES
from aol_jax._src.certification.results import CertificationResult, certification_markdown
from aol_jax._src.certification.rule import STANDARD_RADII, certified_robust_accuracy, certify
from aol_jax._src.freeze import freeze
from aol_jax._src.gram import GRAM_METHODS, GRAM_PRECISIONS
from aol_jax._src.initializers import aol_init
from aol_jax._src.layers import AOLConv, AOLDense, RescaledKernel
from aol_jax._src.lipschitz import explicit_matrix, operator_norm, power_iteration
from aol_jax._src.losses import offset_cross_entropy
from aol_jax._src.network import AOLNetwork
from aol_jax._src.rescaling import (conv_factors, conv_gram, dense_factors, dense_gram,
                                   rescale_conv, rescale_dense)
from aol_jax._src.spectral_bounds import (conv_norm_bound, conv_row_sum_bound, dense_norm_bound,
                                          dense_row_sum_bound)
from aol_jax._src.version import __version__

__all__ = [
    # Layers and blocks
    "AOLConv", "AOLDense", "RescaledKernel", "ConcatenationPooling", "FirstChannels", "Flatten",
    "GroupSort", "MaxMin", "ZeroChannelPad",
    # Networks
    "AOLNetwork", "MODELS", "aol_convnet", "aol_fc", "aol_large", "aol_medium", "aol_small",
    "aol_std",
    # The rescaling as pure functions
    "GRAM_METHODS", "GRAM_PRECISIONS", "conv_factors", "conv_gram", "dense_factors",
    "dense_gram", "rescale_conv", "rescale_dense",
    # Bounds on a kernel's norm, and exact measurements
    "conv_norm_bound", "conv_row_sum_bound", "dense_norm_bound", "dense_row_sum_bound",
    "explicit_matrix", "operator_norm", "power_iteration",
    # Training, inference, attacks
    "aol_init", "freeze", "offset_cross_entropy", "pgd_l2",
    # Certification
    "CertificationResult", "ROUNDING_MODES", "STANDARD_RADII", "certification_markdown",
    "certified_radii", "certified_robust_accuracy", "certify", "certify_dataset",
    "export_certified", "margins",
    # Subpackages
    "certification", "training",
]
