"""AOL rescalings whose derivative differs from the core's, for the benchmarks to measure.

The core (:mod:`aol_jax.rescaling`) forms the Gram of a dense kernel ``P`` as ``P P^T`` and
that of a conv kernel from ONE matrix product over all pairs of taps, ``Kf Kf^T`` with ``Kf``
the ``(taps * in, out)`` kernel, and differentiates the factors with a hand-written backward
pass of one product that keeps only ``sign(G)`` as int8 (since the split rescaling of issue
9). The benchmarks take all of that from the core. Kept here:

* ``autodiff``: the same factors with JAX's own derivative of ``a a^T``, two products
  (``dG a + dG^T a``) in the backward pass: the baseline the core's one-product derivative
  is measured against (``benchmarks.gram``).
* ``lowmem``: the prototype of the core's current backward (one product, ``sign(G)`` as
  int8), written before the core adopted it and now measuring the same idea again
  (``aol_vs_plain --memory-variants``); a candidate for removal.

Both work on dense ``(in, out)`` and conv ``(*spatial, in, out)`` kernels alike: a dense
kernel is a conv kernel with one tap. ``tests/test_benchmarks.py`` checks that they give the
core's factors and gradients.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from aol_jax import rescaling

_HIGHEST = jax.lax.Precision.HIGHEST


def _pair_offsets(ksize: tuple[int, ...]) -> tuple[np.ndarray, int]:
  """Offset index ``s = p - q`` (row-major over ``[-(k - 1), k - 1]``) of each pair of taps
  ``(p, q)`` in row-major pair order, and the number of offsets."""
  taps = list(itertools.product(*[range(k) for k in ksize]))
  offsets = list(itertools.product(*[range(-(k - 1), k) for k in ksize]))
  index = {s: i for i, s in enumerate(offsets)}
  pairs = [index[tuple(pi - qi for pi, qi in zip(p, q))] for p in taps for q in taps]
  return np.asarray(pairs, np.int32), len(offsets)


def _flat(kernel: jax.Array) -> tuple[jax.Array, tuple[int, ...], int]:
  """The ``(taps * in, out)`` matrix of a dense or conv kernel, its taps' shape and ``in``."""
  ksize, (c_in, c_out) = tuple(kernel.shape[:-2]), kernel.shape[-2:]
  k = kernel.astype(rescaling.compute_dtype(kernel.dtype))
  return k.reshape(-1, c_out), ksize, c_in


def _pairs_to_gram(pairs: jax.Array, ksize: tuple[int, ...], c_in: int) -> jax.Array:
  """``(taps * in)^2`` products of tap pairs -> Gram ``(offsets, in, in)``: each pair's
  ``(in, in)`` block summed into its offset."""
  t = int(np.prod(ksize))
  pairs = pairs.reshape(t, c_in, t, c_in).transpose(0, 2, 1, 3).reshape(t * t, c_in, c_in)
  segment, n = _pair_offsets(ksize)
  return jax.ops.segment_sum(pairs, segment, num_segments=n)


def _gram_to_pairs(dgram: jax.Array, ksize: tuple[int, ...], c_in: int) -> jax.Array:
  """The transpose of :func:`_pairs_to_gram` (for a Gram cotangent)."""
  t = int(np.prod(ksize))
  dpairs = dgram[_pair_offsets(ksize)[0]]
  return dpairs.reshape(t, t, c_in, c_in).transpose(0, 2, 1, 3).reshape(t * c_in, t * c_in)


def _factors(gram: jax.Array, eps: float) -> jax.Array:
  """``d_i = (sum_{s, j} |G[s, i, j]| + eps)^-1/2``."""
  return jax.lax.rsqrt(jnp.abs(gram).sum(axis=(0, 2)) + eps)


def gram_autodiff(kernel: jax.Array) -> jax.Array:
  """The Gram (``rescaling.conv_gram``'s shape for a conv kernel, ``(in, in)`` for a dense
  one) from the tap-pair product ``Kf Kf^T`` differentiated by JAX itself."""
  flat, ksize, c_in = _flat(kernel)
  gram = _pairs_to_gram(jnp.matmul(flat, flat.T, precision=_HIGHEST), ksize, c_in)
  return gram.reshape(*(2 * k - 1 for k in ksize), c_in, c_in)


def rescale_autodiff(kernel: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """The core's rescaled kernel, with the derivative of ``Kf Kf^T`` left to autodiff."""
  flat, ksize, c_in = _flat(kernel)
  gram = _pairs_to_gram(jnp.matmul(flat, flat.T, precision=_HIGHEST), ksize, c_in)
  d = _factors(gram, eps)
  return (kernel.astype(d.dtype) * d[:, None]).astype(kernel.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _factors_lowmem(flat: jax.Array, ksize: tuple[int, ...], c_in: int,
                    eps: float) -> jax.Array:
  gram = _pairs_to_gram(jnp.matmul(flat, flat.T, precision=_HIGHEST), ksize, c_in)
  return _factors(gram, eps)


def _factors_lowmem_fwd(flat, ksize, c_in, eps):
  gram = _pairs_to_gram(jnp.matmul(flat, flat.T, precision=_HIGHEST), ksize, c_in)
  d = _factors(gram, eps)
  return d, (flat, d, jnp.sign(gram).astype(jnp.int8))


def _factors_lowmem_bwd(ksize, c_in, eps, res, dd):
  flat, d, sign = res
  ds = -0.5 * d ** 3 * dd  # d = (s + eps)^-1/2
  dgram = sign.astype(flat.dtype) * ds[:, None]  # s_i = sum_{offsets, j} |G[., i, j]|
  dpairs = _gram_to_pairs(dgram, ksize, c_in)
  return (jnp.matmul(dpairs + dpairs.T, flat, precision=_HIGHEST),)


_factors_lowmem.defvjp(_factors_lowmem_fwd, _factors_lowmem_bwd)


def rescale_lowmem(kernel: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """The core's rescaled kernel, whose backward pass keeps only ``sign(G)`` as int8 (and the
  kernel) and forms the kernel's cotangent with one product, ``(dM + dM^T) Kf``."""
  flat, ksize, c_in = _flat(kernel)
  d = _factors_lowmem(flat, ksize, c_in, eps)
  return (kernel.astype(d.dtype) * d[:, None]).astype(kernel.dtype)


CONV_METHODS = (*rescaling.GRAM_METHODS, "autodiff", "lowmem")
DENSE_METHODS = ("matmul", "autodiff", "lowmem")


def conv_gram_fn(method: str) -> Callable[[jax.Array], jax.Array]:
  """``kernel -> Gram`` for a core method name or ``'autodiff'`` / ``'lowmem'`` (which share
  their forward pass)."""
  if method in rescaling.GRAM_METHODS:
    return partial(rescaling.conv_gram, method=method)
  return {"autodiff": gram_autodiff, "lowmem": gram_autodiff}[method]


def rescale_conv_fn(method: str) -> Callable[..., jax.Array]:
  """``(kernel, eps=) -> rescaled kernel`` for a name in :data:`CONV_METHODS`."""
  if method in rescaling.GRAM_METHODS:
    return partial(rescaling.rescale_conv, method=method)
  return {"autodiff": rescale_autodiff, "lowmem": rescale_lowmem}[method]


def rescale_dense_fn(method: str) -> Callable[..., jax.Array]:
  """``(kernel, eps=) -> rescaled kernel`` for a name in :data:`DENSE_METHODS`."""
  return {"matmul": rescaling.rescale_dense, "autodiff": rescale_autodiff,
          "lowmem": rescale_lowmem}[method]


def prototype_net(model, *, conv_method: str = "lowmem", dense_method: str = "lowmem",
                  conv_rescale=None, dense_rescale=None):
  """``model`` with its AOL layers rescaled by other formulations (same parameters).

  By default the ``lowmem`` backward in every layer. ``conv_rescale`` / ``dense_rescale``
  (``(kernel, eps=) -> kernel``) override the methods.
  """
  from flax import nnx
  from aol_jax.layers import AOLConv, AOLDense
  from benchmarks import nets

  conv_rescale = conv_rescale or rescale_conv_fn(conv_method)
  dense_rescale = dense_rescale or rescale_dense_fn(dense_method)

  class ProtoConv(AOLConv):
    def rescale(self, kernel):
      return conv_rescale(kernel, eps=self.eps)

  class ProtoDense(AOLDense):
    def rescale(self, kernel):
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
