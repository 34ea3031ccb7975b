"""AOL dense and conv layers as Flax NNX modules.

The modules own the raw parameter ``P`` and rescale it on every call with the pure functions
of :mod:`aol_jax.rescaling`, so gradients flow through the rescaling. Signatures follow
``nnx.Linear`` / ``nnx.Conv`` so an AOL layer drops in where one of those stood.
:func:`aol_jax.freeze` swaps the raw parameter for the precomputed rescaled kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype, Initializer, PrecisionLike

from aol_jax._src import padding as padding_lib
from aol_jax._src import rescaling, spectral_bounds
from aol_jax._src.certification import probabilistic, worst_case
from aol_jax._src.certification.probabilistic import RoundingTerms
from aol_jax._src.certification.worst_case import WorstCaseTerms
from aol_jax._src.gram import check_precision
from aol_jax._src.initializers import aol_init
from aol_jax._src.rescaled_apply import apply_rescaled
from aol_jax._src.sharding import batch_reshape


class RescaledKernel(nnx.Variable):
  """A kernel that already carries the AOL rescaling (set by :func:`aol_jax.freeze`).

  It is not an ``nnx.Param``, so an optimiser over ``nnx.Param`` leaves it alone.
  """


def _tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
  out = (value,) * n if isinstance(value, int) else tuple(value)
  if len(out) != n or any(not isinstance(v, int) or v < 1 for v in out):
    raise ValueError(f"{name} must be a positive int or {n} positive ints, got {value!r}.")
  return out


def _check_eps(eps: float) -> float:
  """The AOL stabiliser: finite and >= 0, or the factors can exceed the bound."""
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
      math.isfinite(eps) and eps >= 0):
    raise ValueError(f"eps (the AOL stabiliser) must be a finite number >= 0, got {eps!r}: a "
                     "negative eps enlarges the factors and breaks the 1-Lipschitz bound.")
  return float(eps)


def _frozen(layer) -> bool:
  return isinstance(layer.kernel, RescaledKernel)


def _apply_kernel(layer, op: Callable[[jax.Array, jax.Array], jax.Array],
                  x: jax.Array) -> jax.Array:
  """``op(x, kernel)`` with the kernel the layer applies: frozen, or rescaled now
  (:func:`aol_jax._src.rescaled_apply.apply_rescaled`, whole or split over the layer's
  ``rescaling_axis``; the training path of :meth:`AOLDense.applied_kernel`)."""
  if isinstance(layer.kernel, RescaledKernel):
    return op(x, layer.kernel[...])
  return apply_rescaled(layer, op, layer.kernel[...], x)


_UNCHANGED = object()


def _set_view(layer, rescaling_axis, gram_precision) -> None:
  """The static modes of an AOL layer, as ``nnx.view`` sets them (:meth:`AOLDense.set_view`)."""
  if rescaling_axis is not _UNCHANGED:
    if rescaling_axis is not None and not isinstance(rescaling_axis, str):
      raise ValueError(f"rescaling_axis must be a mesh axis name or None, got "
                       f"{rescaling_axis!r}: pass the name of the data axis, e.g. 'data'.")
    layer.rescaling_axis = rescaling_axis
  if gram_precision is not None:
    layer.gram_precision = check_precision(gram_precision)


def _host_kernel(layer) -> np.ndarray:
  """``layer.applied_kernel()`` as a float64 host array, refused if not finite."""
  kernel = np.asarray(layer.applied_kernel(), np.float64)
  if not np.all(np.isfinite(kernel)):
    raise ValueError(f"{type(layer).__name__} applies a kernel with non-finite entries (a zero "
                     "row rescaled with eps=0?); no Lipschitz bound can be stated for it.")
  return kernel


def _bias(layer) -> jax.Array | None:
  return None if layer.bias is None else layer.bias[...]


# One compiled rescaling per kernel shape and setting, shared by every layer (applied_kernel
# outside a trace); inside jax.jit it is inlined like any other call.
_rescale_dense = jax.jit(rescaling.rescale_dense, static_argnames=("eps", "gram_precision"))
_rescale_conv = jax.jit(rescaling.rescale_conv, static_argnames=(
    "eps", "feature_group_count", "method", "gram_precision"))


class AOLDense(nnx.Module):
  """``y = x @ (diag(d) P) + b``, 1-Lipschitz in l2 for every ``P`` (AOL, Theorem 1).

  Args mirror ``nnx.Linear``. ``eps`` is the AOL stabiliser inside the factor
  ``(sum_j |P P^T|_ij + eps) ** -1/2``. ``gram_precision`` is the precision of the
  training-time Gram products, a key of :data:`aol_jax.GRAM_PRECISIONS`;
  :func:`aol_jax.freeze` ignores it (float32, ``'highest'``). It and ``rescaling_axis``
  (split the rescaling over a mesh axis; default ``None``) are static attributes, set with
  ``nnx.view(model, gram_precision=..., rescaling_axis=...)`` (:meth:`set_view`), as
  ``aol_jax.training.create_train_state`` does.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, kernel_init: Initializer | None = None,
               bias_init: Initializer = nnx.initializers.zeros_init(), eps: float = 1e-6,
               gram_precision: rescaling.GramPrecision = "default", rngs: nnx.Rngs):
    if in_features < 1 or out_features < 1:
      raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, "
                       f"{out_features}.")
    eps = _check_eps(eps)
    kernel_init = aol_init() if kernel_init is None else kernel_init
    self.in_features, self.out_features = in_features, out_features
    self.use_bias, self.dtype, self.precision, self.eps = use_bias, dtype, precision, eps
    self.gram_precision = check_precision(gram_precision)
    self.rescaling_axis: str | None = None  # set by nnx.view (set_view)
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else None)

  def set_view(self, *, rescaling_axis: str | None = _UNCHANGED,
               gram_precision: rescaling.GramPrecision | None = None) -> None:
    """The static modes ``nnx.view(model, rescaling_axis=..., gram_precision=...)`` sets.

    Args:
      rescaling_axis: a mesh axis name: the training call splits the rescaling's work over
        that axis of the mesh set with ``jax.set_mesh`` (traced outside one, the call
        raises); ``None``: every device computes all of it. Results are the same.
      gram_precision: the precision of the training-time Gram products, a key of
        :data:`aol_jax.GRAM_PRECISIONS`.
    """
    _set_view(self, rescaling_axis, gram_precision)

  def factors(self, kernel: jax.Array, *, gram_precision: str | None = None,
              axis_name: str | None = None) -> jax.Array:
    """:func:`aol_jax.dense_factors` at ``gram_precision`` (default: the layer's), split
    over ``axis_name`` inside a ``jax.shard_map`` over it."""
    precision = self.gram_precision if gram_precision is None else gram_precision
    return rescaling.dense_factors(kernel, eps=self.eps, gram_precision=precision,
                                   axis_name=axis_name)

  def apply_factors(self, kernel: jax.Array, d: jax.Array) -> jax.Array:
    """``diag(d) @ kernel``."""
    return rescaling.scale_dense(kernel, d)

  def rescale(self, kernel: jax.Array, *, gram_precision: str | None = None,
              axis_name: str | None = None) -> jax.Array:
    """``diag(d) @ kernel`` (:func:`aol_jax.rescale_dense`), as :meth:`factors` computes."""
    return self.apply_factors(kernel, self.factors(kernel, gram_precision=gram_precision,
                                                   axis_name=axis_name))

  def applied_kernel(self, *, gram_precision: str | None = None) -> jax.Array:
    """The kernel this layer applies: the stored one once frozen, else ``diag(d) P``
    rescaled now at ``gram_precision`` (default: the layer's). The one definition used by
    the call, :func:`aol_jax.freeze` (at ``'highest'``) and :meth:`lipschitz_bound`."""
    if _frozen(self):
      return self.kernel[...]
    precision = self.gram_precision if gram_precision is None else gram_precision
    return _rescale_dense(self.kernel[...], eps=self.eps, gram_precision=precision)

  def lipschitz_bound(self) -> float:
    """A rigorous bound on the spectral norm of :meth:`applied_kernel`
    (:func:`aol_jax.dense_norm_bound`, float64, its own rounding included): at most
    about 1 by AOL's Theorem 1, usually less once trained."""
    return spectral_bounds.dense_norm_bound(_host_kernel(self))

  def rounding_terms(self) -> RoundingTerms:
    """:func:`aol_jax._src.certification.probabilistic.dense_terms`."""
    return probabilistic.dense_terms(self.in_features, self.out_features,
                                     self.lipschitz_bound(), frozen=_frozen(self))

  def worst_case_terms(self, input_shape: Sequence[int]) -> WorstCaseTerms:
    """:func:`aol_jax._src.certification.worst_case.dense_kernel_terms` of the applied kernel."""
    del input_shape
    return worst_case.dense_kernel_terms(_host_kernel(self), _bias(self),
                                         lipschitz=self.lipschitz_bound())

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_features:
      raise ValueError(f"AOLDense expects {self.in_features} input features on the last axis, "
                       f"got input of shape {x.shape}.")
    bias = None if self.bias is None else self.bias[...]

    def op(x, kernel):
      x, kernel = nnx.nn.dtypes.promote_dtype((x, kernel), dtype=self.dtype)
      return jnp.matmul(x, kernel, precision=self.precision)

    y = _apply_kernel(self, op, x)
    if bias is None:
      return y
    y, bias = nnx.nn.dtypes.promote_dtype((y, bias), dtype=self.dtype)
    return y + bias


class AOLConv(nnx.Module):
  """An AOL-rescaled convolution over 1, 2 or 3 spatial dims, 1-Lipschitz in l2.

  The bound (AOL, Theorem 2) holds for zero padding ('SAME', 'VALID', explicit ints) and
  'CIRCULAR', for any input size, stride and dilation; strides > 1 keep the bound but
  loosen it. Other padding modes raise ``ValueError``. As in ``nnx.Conv``, an int
  ``kernel_size`` means a 1D conv; inputs are ``(*batch, *spatial, in_features)``.
  ``gram_precision`` and ``rescaling_axis`` as in :class:`AOLDense`.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1, *, padding: padding_lib.PaddingLike = "SAME",
               kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
               use_bias: bool = True, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
               kernel_init: Initializer | None = None,
               bias_init: Initializer = nnx.initializers.zeros_init(), eps: float = 1e-6,
               gram_method: rescaling.GramMethod | None = None,
               gram_precision: rescaling.GramPrecision = "default", rngs: nnx.Rngs):
    ksize = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    nd = len(ksize)
    if not 1 <= nd <= 3:
      raise ValueError(f"AOLConv supports 1, 2 or 3 spatial dims, got kernel_size={kernel_size!r}.")
    self.kernel_size = _tuple(ksize, nd, "kernel_size")
    self.strides = _tuple(strides, nd, "strides")
    self.kernel_dilation = _tuple(kernel_dilation, nd, "kernel_dilation")
    self.padding = padding_lib.normalize_padding(padding, nd)
    g = feature_group_count
    if g < 1 or in_features % g or out_features % g:
      raise ValueError(f"feature_group_count={g} must divide in_features={in_features} and "
                       f"out_features={out_features}.")
    if in_features < 1 or out_features < 1:
      raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, "
                       f"{out_features}.")
    if gram_method is not None and gram_method not in rescaling.GRAM_METHODS:
      raise ValueError(f"gram_method must be one of {rescaling.GRAM_METHODS}, got {gram_method!r}.")
    eps = _check_eps(eps)
    kernel_init = aol_init(g) if kernel_init is None else kernel_init
    self.in_features, self.out_features, self.feature_group_count = in_features, out_features, g
    self.use_bias, self.dtype, self.precision, self.eps = use_bias, dtype, precision, eps
    self.gram_method = gram_method
    self.gram_precision = check_precision(gram_precision)
    self.rescaling_axis: str | None = None  # set by nnx.view (set_view)
    shape = (*self.kernel_size, in_features // g, out_features)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else None)

  def set_view(self, *, rescaling_axis: str | None = _UNCHANGED,
               gram_precision: rescaling.GramPrecision | None = None) -> None:
    """As :meth:`AOLDense.set_view`."""
    _set_view(self, rescaling_axis, gram_precision)

  def factors(self, kernel: jax.Array, *, gram_precision: str | None = None,
              axis_name: str | None = None) -> jax.Array:
    """:func:`aol_jax.conv_factors` at ``gram_precision`` (default: the layer's), split
    over ``axis_name`` inside a ``jax.shard_map`` over it."""
    precision = self.gram_precision if gram_precision is None else gram_precision
    return rescaling.conv_factors(kernel, eps=self.eps,
                                  feature_group_count=self.feature_group_count,
                                  method=self.gram_method, gram_precision=precision,
                                  axis_name=axis_name)

  def apply_factors(self, kernel: jax.Array, d: jax.Array) -> jax.Array:
    """Each input channel of the kernel scaled by its factor (per group)."""
    return rescaling.scale_conv(kernel, d, self.feature_group_count)

  def rescale(self, kernel: jax.Array, *, gram_precision: str | None = None,
              axis_name: str | None = None) -> jax.Array:
    """The rescaled kernel (:func:`aol_jax.rescale_conv`), as :meth:`factors` computes."""
    return self.apply_factors(kernel, self.factors(kernel, gram_precision=gram_precision,
                                                   axis_name=axis_name))

  def applied_kernel(self, *, gram_precision: str | None = None) -> jax.Array:
    """The kernel this layer applies: the stored one once frozen, else the raw kernel
    rescaled now at ``gram_precision`` (default: the layer's). The one definition used by
    the call, :func:`aol_jax.freeze` (at ``'highest'``) and :meth:`lipschitz_bound`."""
    if _frozen(self):
      return self.kernel[...]
    precision = self.gram_precision if gram_precision is None else gram_precision
    return _rescale_conv(self.kernel[...], eps=self.eps,
                         feature_group_count=self.feature_group_count, method=self.gram_method,
                         gram_precision=precision)

  def lipschitz_bound(self) -> float:
    """A rigorous bound on the l2 norm of the convolution with :meth:`applied_kernel`, for
    this layer's padding, strides, dilation and groups and any input size
    (:func:`aol_jax.conv_norm_bound`): at most about 1 by AOL's Theorem 2."""
    return spectral_bounds.conv_norm_bound(
        _host_kernel(self), strides=tuple(self.strides),
        kernel_dilation=tuple(self.kernel_dilation),
        feature_group_count=self.feature_group_count, padding=self.padding)

  def rounding_terms(self) -> RoundingTerms:
    """:func:`aol_jax.certification.probabilistic.conv_terms`."""
    return probabilistic.conv_terms(self.kernel_size, self.in_features, self.out_features,
                                    self.feature_group_count, self.lipschitz_bound(),
                                    frozen=_frozen(self))

  def worst_case_terms(self, input_shape: Sequence[int]) -> WorstCaseTerms:
    """:func:`aol_jax._src.certification.worst_case.conv_kernel_terms` of the applied kernel,
    for one example of ``input_shape``."""
    out = jax.eval_shape(self, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return worst_case.conv_kernel_terms(_host_kernel(self), _bias(self),
                                        feature_group_count=self.feature_group_count,
                                        output_positions=math.prod(out.shape[1:-1]),
                                        lipschitz=self.lipschitz_bound())

  def __call__(self, x: jax.Array) -> jax.Array:
    nd = len(self.kernel_size)
    if x.ndim < nd + 1 or x.shape[-1] != self.in_features:
      raise ValueError(f"AOLConv expects inputs (*batch, {nd} spatial dims, "
                       f"{self.in_features} channels), got shape {x.shape}.")
    batch_shape = x.shape[:-(nd + 1)]
    x = batch_reshape(x, (-1,) + x.shape[-(nd + 1):])
    bias = None if self.bias is None else self.bias[...]
    pad = self.padding
    if pad == "CIRCULAR":
      x = padding_lib.circular_pad(x, self.kernel_size, self.kernel_dilation)
      pad = "VALID"
    spatial = "DHW"[3 - nd:]

    def op(x, kernel):
      x, kernel = nnx.nn.dtypes.promote_dtype((x, kernel), dtype=self.dtype)
      return jax.lax.conv_general_dilated(
          x, kernel, window_strides=self.strides, padding=pad,
          rhs_dilation=self.kernel_dilation,
          dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
          feature_group_count=self.feature_group_count, precision=self.precision)

    y = _apply_kernel(self, op, x)
    if bias is not None:
      y, bias = nnx.nn.dtypes.promote_dtype((y, bias), dtype=self.dtype)
      y = y + bias
    return batch_reshape(y, batch_shape + y.shape[1:])
