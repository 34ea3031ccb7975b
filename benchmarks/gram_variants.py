"""Prototype Gram formulations, measured by ``benchmarks.gram`` against the core's.

These are candidates for :mod:`aol_jax.rescaling`, kept here until they are adopted there;
each returns what the core function of the same role returns (``tests/test_benchmarks.py``).

* :func:`sym_gram`: ``A @ A.T`` with a hand-written backward pass. Autodiff of ``A @ A.T``
  forms two products, ``dG @ A + dG.T @ A``; since both factors are the same array one
  product, ``(dG + dG.T) @ A``, gives the same gradient: a third less work per step. As a
  ``custom_vjp`` it cannot be differentiated in forward mode with respect to ``A``; a
  ``custom_jvp`` with tangent ``t + t.T``, ``t = dA @ A.T``, transposes to the same single
  product and keeps forward mode (what the README recommends for the core).
* :func:`conv_gram_gemm`: the conv Gram from ONE matrix product over all pairs of kernel
  taps, ``Kf @ Kf.T`` with ``Kf`` the ``(taps * in, out)`` kernel, whose ``(p, q)`` block is
  ``K[p] K[q]^T``; ``G[s]`` sums the blocks with ``p - q = s`` through a static 0/1 matrix
  (the core's ``'taps'`` forms the same pairs with an einsum and sums them by
  ``segment_sum``).
* ``*_lowmem``: the same factors with a backward pass whose only residual besides the kernel
  is ``sign(G)`` as int8; a memory experiment (``aol_vs_plain --memory-variants``).
"""

from __future__ import annotations

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from aol_jax import rescaling

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.custom_vjp
def sym_gram(a: jax.Array) -> jax.Array:
  """``a @ a.T`` (float32-exact), with backward ``(dG + dG.T) @ a``: one product, not two."""
  return jnp.matmul(a, a.T, precision=_HIGHEST)


def _sym_gram_fwd(a):
  return sym_gram(a), a


def _sym_gram_bwd(a, dg):
  return (jnp.matmul(dg + dg.T, a, precision=_HIGHEST),)


sym_gram.defvjp(_sym_gram_fwd, _sym_gram_bwd)


def _offset_sum_matrix(ksize: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
  """0/1 matrix ``(offsets, taps * taps)``: which tap pairs ``(p, q)`` have ``p - q = s``."""
  taps = list(itertools.product(*[range(k) for k in ksize]))
  offsets = list(itertools.product(*[range(-(k - 1), k) for k in ksize]))
  index = {s: i for i, s in enumerate(offsets)}
  m = np.zeros((len(offsets), len(taps) ** 2), np.float32)
  for a, p in enumerate(taps):
    for b, q in enumerate(taps):
      m[index[tuple(pi - qi for pi, qi in zip(p, q))], a * len(taps) + b] = 1
  return m, tuple(2 * k - 1 for k in ksize)


def conv_gram_gemm(kernel: jax.Array, *, symmetric_vjp: bool = True) -> jax.Array:
  """``conv_gram(kernel)`` (``feature_group_count=1``) from one ``(taps*in)^2 x out`` GEMM."""
  nd = kernel.ndim - 2
  ksize = kernel.shape[:nd]
  c_in, c_out = kernel.shape[-2:]
  kernel = kernel.astype(rescaling.compute_dtype(kernel.dtype))
  t = int(np.prod(ksize))
  flat = kernel.reshape(t * c_in, c_out)
  pairs = sym_gram(flat) if symmetric_vjp else jnp.matmul(flat, flat.T, precision=_HIGHEST)
  if t == 1:
    return pairs.reshape(*(1,) * nd, c_in, c_in)
  pairs = pairs.reshape(t, c_in, t, c_in).transpose(0, 2, 1, 3).reshape(t * t, c_in, c_in)
  m, gsize = _offset_sum_matrix(ksize)
  gram = jnp.einsum("sk,kij->sij", jnp.asarray(m, pairs.dtype), pairs, precision=_HIGHEST)
  return gram.reshape(*gsize, c_in, c_in)


def dense_factors_sym(kernel: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """``rescaling.dense_factors`` with the Gram from :func:`sym_gram`."""
  p = kernel.astype(rescaling.compute_dtype(kernel.dtype))
  return jax.lax.rsqrt(jnp.abs(sym_gram(p)).sum(-1) + eps)


def rescale_dense_sym(kernel: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  d = dense_factors_sym(kernel, eps=eps)
  return (kernel.astype(d.dtype) * d[:, None]).astype(kernel.dtype)


def rescale_conv_gemm(kernel: jax.Array, *, eps: float = 1e-6,
                      symmetric_vjp: bool = True) -> jax.Array:
  gram = conv_gram_gemm(kernel, symmetric_vjp=symmetric_vjp)
  d = jax.lax.rsqrt(jnp.abs(gram).sum(axis=tuple(range(gram.ndim - 1))) + eps)
  return (kernel.astype(d.dtype) * d[:, None]).astype(kernel.dtype)


def _factors_vjp(gram_fn, pairs_grad_fn):
  """AOL factors ``d = (sum |G| + eps)^-1/2`` with a backward pass that keeps only
  ``sign(G)`` as int8 (a quarter of ``G``'s float32 bytes) besides the kernel.

  ``gram_fn(flat) -> (G, aux)`` builds the Gram (offsets first, factor axis second to
  last) from the ``(rows, out)`` matrix ``flat``; ``pairs_grad_fn(dG) -> dPairs`` maps a
  Gram cotangent to the cotangent of ``flat @ flat.T``, whose own backward is
  ``(dPairs + dPairs.T) @ flat``: one product.
  """

  @partial(jax.custom_vjp, nondiff_argnums=(1,))
  def factors(flat, eps):
    gram = gram_fn(flat)
    return jax.lax.rsqrt(jnp.abs(gram).sum(axis=(*range(gram.ndim - 2), gram.ndim - 1)) + eps)

  def fwd(flat, eps):
    gram = gram_fn(flat)
    d = jax.lax.rsqrt(jnp.abs(gram).sum(axis=(*range(gram.ndim - 2), gram.ndim - 1)) + eps)
    return d, (flat, d, jnp.sign(gram).astype(jnp.int8))

  def bwd(eps, res, dd):
    flat, d, sign = res
    ds = -0.5 * d ** 3 * dd  # d = (s + eps)^-1/2
    dgram = sign.astype(flat.dtype) * ds[:, None]  # s_i = sum_{offsets, j} |G[., i, j]|
    dpairs = pairs_grad_fn(dgram)
    return (jnp.matmul(dpairs + dpairs.T, flat, precision=_HIGHEST),)

  factors.defvjp(fwd, bwd)
  return factors


def rescale_dense_lowmem(kernel: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """``rescaling.rescale_dense`` whose backward stores ``sign(P P^T)`` as int8 only."""
  p = kernel.astype(rescaling.compute_dtype(kernel.dtype))
  factors = _factors_vjp(lambda f: jnp.matmul(f, f.T, precision=_HIGHEST), lambda dg: dg)
  d = factors(p, eps)
  return (p * d[:, None]).astype(kernel.dtype)


def rescale_conv_lowmem(kernel: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """``rescaling.rescale_conv`` (one GEMM over tap pairs) storing ``sign(G)`` as int8 only."""
  nd = kernel.ndim - 2
  ksize = kernel.shape[:nd]
  c_in, c_out = kernel.shape[-2:]
  k = kernel.astype(rescaling.compute_dtype(kernel.dtype))
  t = int(np.prod(ksize))
  m, _ = _offset_sum_matrix(ksize)
  m = jnp.asarray(m, k.dtype)

  def gram_fn(flat):
    pairs = jnp.matmul(flat, flat.T, precision=_HIGHEST)
    pairs = pairs.reshape(t, c_in, t, c_in).transpose(0, 2, 1, 3).reshape(t * t, c_in, c_in)
    return jnp.einsum("sk,kij->sij", m, pairs, precision=_HIGHEST)

  def pairs_grad_fn(dgram):
    dpairs = jnp.einsum("sk,sij->kij", m, dgram, precision=_HIGHEST)
    return dpairs.reshape(t, t, c_in, c_in).transpose(0, 2, 1, 3).reshape(t * c_in, t * c_in)

  d = _factors_vjp(gram_fn, pairs_grad_fn)(k.reshape(t * c_in, c_out), eps)
  return (k * d[:, None]).astype(kernel.dtype)


def conv_gram_fn(method: str):
  """``kernel -> Gram`` for a core method name or a prototype name."""
  if method in rescaling.GRAM_METHODS:
    return partial(rescaling.conv_gram, method=method)
  return {"gemm": partial(conv_gram_gemm, symmetric_vjp=False),
          "gemm_symvjp": conv_gram_gemm}[method]


def rescale_conv_fn(method: str):
  """``kernel -> rescaled kernel`` for a core method name or a prototype name."""
  if method in rescaling.GRAM_METHODS:
    return partial(rescaling.rescale_conv, method=method)
  return {"gemm": partial(rescale_conv_gemm, symmetric_vjp=False),
          "gemm_symvjp": rescale_conv_gemm, "gemm_lowmem": rescale_conv_lowmem}[method]


def rescale_dense_fn(method: str):
  return {"matmul": rescaling.rescale_dense, "symvjp": rescale_dense_sym,
          "lowmem": rescale_dense_lowmem}[method]


CONV_METHODS = ("conv", "taps", "gemm", "gemm_symvjp")  # Gram-level: conv_gram_fn
RESCALE_CONV_METHODS = CONV_METHODS + ("gemm_lowmem",)  # rescale-level: rescale_conv_fn
DENSE_METHODS = ("matmul", "symvjp", "lowmem")


def prototype_net(model, *, conv_method: str = "gemm_symvjp", dense_method: str = "symvjp",
                  conv_rescale=None, dense_rescale=None):
  """``model`` with its AOL layers rescaled by prototype formulations (same parameters).

  ``conv_rescale`` / ``dense_rescale`` (``(kernel, eps=) -> kernel``) override the methods.
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
