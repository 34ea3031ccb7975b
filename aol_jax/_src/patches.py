"""A convolution as slices of its input and one dot product, for the certified evaluation.

``jax.lax.conv_general_dilated`` leaves the algorithm to the backend, and a GPU library may
choose one that is not a sum of products (Winograd, FFT), whose rounding no dot-product bound
covers. :func:`conv_as_dot` gathers each output's inputs with strided slices (exact copies)
and contracts them with the kernel in one ``dot_general`` at precision ``HIGHEST``: on every
platform the result is a sum of ``taps * c_in / g`` products in some order, which the rigorous
certificates bound (:mod:`aol_jax._src.certification.rigorous`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from aol_jax._src import padding as padding_lib


def conv_patches(x: jax.Array, ksize: Sequence[int], *, strides: Sequence[int],
                 dilation: Sequence[int], padding: padding_lib.PaddingLike) -> jax.Array:
  """``(batch, *out_spatial, taps, c)``: the input entries each output of the conv reads.

  ``x`` is ``(batch, *spatial, c)``; ``padding`` one of :func:`padding_lib.normalize_padding`'s
  values. Tap ``t`` (row-major over ``ksize``) of output ``p`` is input position
  ``p * strides + t * dilation`` of the padded input, as in ``conv_general_dilated``.
  """
  nd = len(ksize)
  if padding == "CIRCULAR":
    x = padding_lib.circular_pad(x, ksize, dilation)
    pads = [(0, 0)] * nd
  elif isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(ksize, dilation)]
    pads = jax.lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
  else:
    pads = list(padding)
  x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  spatial = x.shape[1:-1]
  out = [(n - (k - 1) * d - 1) // s + 1 for n, k, d, s in zip(spatial, ksize, dilation, strides)]
  taps = []
  for tap in itertools.product(*(range(k) for k in ksize)):  # row-major
    start = [0] + [t * d for t, d in zip(tap, dilation)] + [0]
    limit = ([x.shape[0]] + [t * d + (o - 1) * s + 1
                             for t, d, o, s in zip(tap, dilation, out, strides)] + [x.shape[-1]])
    taps.append(jax.lax.slice(x, start, limit, [1, *strides, 1]))
  return jnp.stack(taps, axis=-2)


def conv_as_dot(patches: jax.Array, kernel: jax.Array, feature_group_count: int,
                dtype: jnp.dtype) -> jax.Array:
  """The conv from its :func:`conv_patches` ``(batch, *out, taps, c_in)`` and its kernel
  ``(*k, c_in / g, c_out)``: one ``dot_general`` in ``dtype`` at precision ``HIGHEST``."""
  g = feature_group_count
  *lead, taps, c_in = patches.shape
  c_in_g, c_out = kernel.shape[-2:]
  lhs = patches.reshape(*lead, taps, g, c_in_g).astype(dtype)
  rhs = kernel.reshape(taps, c_in_g, g, c_out // g).astype(dtype)
  # Contract taps and the group's input channels; g is a batch dimension of the product.
  n = len(lead)
  out = jax.lax.dot_general(
      lhs, rhs, (((n, n + 2), (0, 1)), ((n + 1,), (2,))),
      precision=jax.lax.Precision.HIGHEST, preferred_element_type=dtype)
  # dot_general puts the batch dim (g) first: (g, *lead, c_out / g) -> (*lead, c_out).
  return jnp.moveaxis(out, 0, -2).reshape(*lead, c_out)
