"""aol_jax: certifiably robust Lipschitz networks from Almost-Orthogonal Lipschitz layers."""

from aol_jax import lipschitz
from aol_jax.blocks import ConcatenationPooling, FirstChannels, Flatten, GroupSort, MaxMin, ZeroChannelPad
from aol_jax.freeze import freeze
from aol_jax.initializers import aol_init
from aol_jax.layers import AOLConv, AOLDense, RescaledKernel
from aol_jax.rescaling import conv_factors, conv_gram, dense_factors, rescale_conv, rescale_dense

__all__ = [
    "AOLConv", "AOLDense", "ConcatenationPooling", "FirstChannels", "Flatten", "GroupSort",
    "MaxMin", "RescaledKernel", "ZeroChannelPad", "aol_init", "conv_factors", "conv_gram",
    "dense_factors", "freeze", "lipschitz", "rescale_conv", "rescale_dense",
]

__version__ = "0.1.0"
