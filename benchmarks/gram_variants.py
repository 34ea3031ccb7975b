"""An AOL rescaling whose derivative differs from the core's, for the benchmarks to measure.

The core (:mod:`aol_jax.rescaling`) forms one triangle of the Gram (:mod:`aol_jax.gram`)
and differentiates the factors with a hand-written backward pass of one product's worth
that keeps only the signs of that triangle as int8 (:mod:`aol_jax.factors`). Kept here:

* ``autodiff``: the same factors from the whole tap-pair product ``Kf Kf^T`` (``Kf`` the
  ``(taps * in, out)`` kernel), with JAX's own derivative, two products (``dG Kf + dG^T
  Kf``) in the backward pass: the baseline the core is measured against
  (``benchmarks.gram``).

It works on dense ``(in, out)`` and conv ``(*spatial, in, out)`` kernels alike: a dense
kernel is a conv kernel with one tap. ``tests/test_benchmarks.py`` checks that it gives the
core's factors and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from aol_jax._src import rescaling
from aol_jax._src.gram import offset_table

_HIGHEST = jax.lax.Precision.HIGHEST


def _flat(kernel: jax.Array) -> tuple[jax.Array, tuple[int, ...], int]:
  """The ``(taps * in, out)`` matrix of a dense or conv kernel, its taps' shape and ``in``."""
  ksize, (c_in, c_out) = tuple(kernel.shape[:-2]), kernel.shape[-2:]
  k = kernel.astype(rescaling.compute_dtype(kernel.dtype))
  return k.reshape(-1, c_out), ksize, c_in


def _pairs_to_gram(pairs: jax.Array, ksize: tuple[int, ...], c_in: int) -> jax.Array:
  """``(taps * in)^2`` products of tap pairs -> Gram ``(offsets, in, in)``: each pair's
  ``(in, in)`` block summed into its offset (:func:`aol_jax.gram.offset_table`)."""
  table, count = offset_table(ksize)
  t = table.shape[0]
  pairs = pairs.reshape(t, c_in, t, c_in).transpose(0, 2, 1, 3).reshape(t * t, c_in, c_in)
  return jax.ops.segment_sum(pairs, table.reshape(-1), num_segments=count)


def _factors(gram: jax.Array, eps: float) -> jax.Array:
  """``d_i = (sum_{s, j} |G[s, i, j]| + eps)^-1/2``."""
  return jax.lax.rsqrt(jnp.abs(gram).sum(axis=(0, 2)) + eps)


def gram_autodiff(kernel: jax.Array) -> jax.Array:
  """The Gram (``rescaling.conv_gram``'s shape for a conv kernel, ``(in, in)`` for a dense
  one) from the whole tap-pair product ``Kf Kf^T`` differentiated by JAX itself."""
  flat, ksize, c_in = _flat(kernel)
  gram = _pairs_to_gram(jnp.matmul(flat, flat.T, precision=_HIGHEST), ksize, c_in)
  return gram.reshape(*(2 * k - 1 for k in ksize), c_in, c_in)


def rescale_autodiff(kernel: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """The core's rescaled kernel, with the derivative of ``Kf Kf^T`` left to autodiff."""
  flat, ksize, c_in = _flat(kernel)
  gram = _pairs_to_gram(jnp.matmul(flat, flat.T, precision=_HIGHEST), ksize, c_in)
  d = _factors(gram, eps)
  return (kernel.astype(d.dtype) * d[:, None]).astype(kernel.dtype)


CONV_METHODS = (*rescaling.GRAM_METHODS, "autodiff")
DENSE_METHODS = ("matmul", "autodiff")


def conv_gram_fn(method: str) -> Callable[[jax.Array], jax.Array]:
  """``kernel -> Gram`` for a core method name or ``'autodiff'``."""
  if method in rescaling.GRAM_METHODS:
    return partial(rescaling.conv_gram, method=method)
  return {"autodiff": gram_autodiff}[method]


def rescale_conv_fn(method: str) -> Callable[..., jax.Array]:
  """``(kernel, eps=) -> rescaled kernel`` for a name in :data:`CONV_METHODS`."""
  if method in rescaling.GRAM_METHODS:
    return partial(rescaling.rescale_conv, method=method)
  return {"autodiff": rescale_autodiff}[method]


def rescale_dense_fn(method: str) -> Callable[..., jax.Array]:
  """``(kernel, eps=) -> rescaled kernel`` for a name in :data:`DENSE_METHODS`."""
  return {"matmul": rescaling.rescale_dense, "autodiff": rescale_autodiff}[method]


def prototype_net(model, *, conv_rescale, dense_rescale):
  """``model`` with its AOL layers rescaled by other functions ``(kernel, eps=) -> kernel``
  (same parameters)."""
  from flax import nnx
  from aol_jax import AOLConv, AOLDense
  from benchmarks import nets

  # The layers' call is factors -> apply_factors; a prototype's whole rescaling sits in
  # apply_factors (differentiated by its own rules), its factors are a placeholder.
  class ProtoConv(AOLConv):
    def factors(self, kernel, **kwargs):
      return jnp.zeros((), kernel.dtype)

    def apply_factors(self, kernel, d):
      return conv_rescale(kernel, eps=self.eps)

  class ProtoDense(AOLDense):
    def factors(self, kernel, **kwargs):
      return jnp.zeros((), kernel.dtype)

    def apply_factors(self, kernel, d):
      return dense_rescale(kernel, eps=self.eps)

  def conv(layer):
    new = ProtoConv(layer.in_features, layer.out_features, layer.kernel_size, padding="SAME",
                    rngs=nnx.Rngs(0))
    new.kernel = nnx.Param(jnp.copy(layer.kernel[...]))  # own buffer: steps donate
    return new

  def dense(layer):
    new = ProtoDense(layer.in_features, layer.out_features, rngs=nnx.Rngs(0))
    new.kernel = nnx.Param(jnp.copy(layer.kernel[...]))  # own buffer: steps donate
    return new

  return nets.replace_layers(model, conv, dense)
