"""A convolution as slices of its input and one dot product, for the certified evaluation.

``jax.lax.conv_general_dilated`` leaves the algorithm to the backend, and a GPU library may
choose one that is not a sum of products (Winograd, FFT), whose rounding no dot-product bound
covers. :func:`conv_as_dot` gathers each output's inputs with strided slices (exact copies)
and contracts them with the kernel by dot products at precision ``HIGHEST``, split into at
most 16 partial sums (:func:`chunked_contract`): on every platform an output is a sum of
products at most ``c + k - 1`` roundings deep, ``c = ceil(n / k)``, whatever order the backend
sums in, which the rigorous certificates bound (:mod:`aol_jax._src.certification.rigorous`).
A frozen AOL layer computes its forward pass this way (:func:`dense_as_dot` for a dense one).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from aol_jax._src import padding as padding_lib
from aol_jax._src.sharding import batch_reshape


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


CHUNKS = 16
"""How many partial dot products an output of the certified evaluation is split into."""


def chunked_contract(lhs: jax.Array, rhs: jax.Array, dtype) -> tuple[jax.Array, int]:
  """``out[r, g] = lhs[r, g] @ rhs[g]`` for ``lhs`` ``(rows, g, n)`` and ``rhs`` ``(g, n, o)``,
  each output a sum of ``k <= 16`` partial dot products of ``c = ceil(n / k)`` products.

  The partial sums come from one batched ``dot_general`` at precision ``HIGHEST``; an
  ``optimization_barrier`` keeps the compiler from merging them back into one long sum, and
  they are then added. Whatever order the backend sums in, a term of an output then goes
  through at most ``c + k - 1`` roundings (``c - 1`` additions and a product in its partial
  sum, ``k - 1`` additions of the partial sums), not ``n``: the rounding bound of
  :mod:`aol_jax._src.certification.rigorous` uses ``gamma`` of that depth (zero padding adds
  exact zeros). Returns ``(out (rows, g, o), c + k - 1)``.
  """
  rows, g, n = lhs.shape
  k = max(1, min(CHUNKS, math.isqrt(n)))  # c + k - 1 <= n; about 2 sqrt(n) up to 16 chunks
  c = -(-n // k)
  pad = k * c - n
  lhs = batch_reshape(jnp.pad(lhs.astype(dtype), ((0, 0), (0, 0), (0, pad))), (rows, g, k, c))
  rhs = jnp.pad(rhs.astype(dtype), ((0, 0), (0, pad), (0, 0))).reshape(g, k, c, -1)
  partial = jax.lax.dot_general(lhs, rhs, (((3,), (2,)), ((1, 2), (0, 1))),
                                precision=jax.lax.Precision.HIGHEST,
                                preferred_element_type=dtype)  # (g, k, rows, o)
  partial = jax.lax.optimization_barrier(partial)
  return jnp.moveaxis(jnp.sum(partial, axis=1), 0, 1), c + k - 1


def dense_as_dot(x: jax.Array, kernel: jax.Array, dtype) -> tuple[jax.Array, int]:
  """``x @ kernel`` for ``x`` ``(rows, n)``, as :func:`chunked_contract` computes it."""
  out, depth = chunked_contract(x[:, None, :], kernel[None], dtype)
  return out[:, 0, :], depth


def conv_as_dot(patches: jax.Array, kernel: jax.Array, feature_group_count: int,
                dtype) -> tuple[jax.Array, int]:
  """The conv from its :func:`conv_patches` ``(batch, *out, taps, c_in)`` and its kernel
  ``(*k, c_in / g, c_out)``, as :func:`chunked_contract` computes it (output channel ``o``
  in group ``o // (c_out / g)``, as ``conv_general_dilated`` orders them)."""
  g = feature_group_count
  *lead, taps, c_in = patches.shape
  c_in_g, c_out = kernel.shape[-2:]
  rows = math.prod(lead)
  # batch_reshape: the rows (batch-major) keep the batch's sharding on a mesh.
  lhs = batch_reshape(batch_reshape(patches, (rows, taps, g, c_in_g)).transpose(0, 2, 1, 3),
                      (rows, g, taps * c_in_g))
  rhs = kernel.reshape(taps, c_in_g, g, c_out // g).transpose(2, 0, 1, 3).reshape(
      g, taps * c_in_g, c_out // g)
  out, depth = chunked_contract(lhs, rhs, dtype)
  return batch_reshape(out, (*lead, c_out)), depth
