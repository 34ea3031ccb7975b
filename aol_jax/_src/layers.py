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
from aol_jax._src import checks, patches, rescaling, spectral_bounds
from aol_jax._src.certification import protocol, rigorous, statistical
from aol_jax._src.certification.statistical import StatisticalTerms
from aol_jax._src.gram import check_precision
from aol_jax._src.initializers import aol_init
from aol_jax._src.rescaled_apply import SCALED_OPERANDS, apply_rescaled
from aol_jax._src.sharding import batch_reshape


class RescaledKernel(nnx.Variable):
  """A kernel that already carries the AOL rescaling (set by :func:`aol_jax.freeze`).

  It is not an ``nnx.Param``, so an optimiser over ``nnx.Param`` leaves it alone.
  """


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


def _host_kernel(layer) -> np.ndarray:
  """The kernel ``layer`` applies (the stored one once frozen, else ``applied_kernel()``) as
  a float64 host array, refused if not finite."""
  kernel = np.asarray(layer.kernel[...] if _frozen(layer) else layer.applied_kernel(),
                      np.float64)
  if not np.all(np.isfinite(kernel)):
    raise ValueError(f"{type(layer).__name__} applies a kernel with non-finite entries (a zero "
                     "row rescaled with eps=0?); no Lipschitz bound can be stated for it.")
  return kernel


def _bias(layer) -> jax.Array | None:
  return None if layer.bias is None else layer.bias[...]


def _frozen_kernel(layer) -> jax.Array:
  """The stored kernel of a frozen layer: a rounding-error bound is stated for the kernel
  whose norm was bounded, which only a frozen layer holds as an array."""
  if not _frozen(layer):
    raise ValueError(f"{type(layer).__name__}.rounding_error() needs a frozen layer (the "
                     "kernel it bounds must be the one it applies); call aol_jax.freeze "
                     "first (certify_dataset, certified_radii and export_certified do).")
  return layer.kernel[...]


def _affine_error(layer, y: jax.Array, absolute: jax.Array, kernel: jax.Array, *,
                  products: int, abs_products: int, fmt: spectral_bounds.FloatFormat
                  ) -> tuple[jax.Array, jax.Array]:
  """``(y + b, bound)`` of an affine layer evaluated in ``fmt``: ``y`` its linear part,
  ``absolute`` an evaluation (sums of ``abs_products`` products) of an entrywise upper bound
  on ``|T| |x|``, ``products`` the dot length of ``y``
  (:func:`aol_jax._src.certification.rigorous.affine_error`)."""
  dtype = jnp.dtype(fmt.name)
  bias = _bias(layer)
  max_weight = jnp.max(jnp.abs(kernel))
  if bias is not None:
    bias = bias.astype(dtype)
    y = y + bias
    absolute = absolute + jnp.abs(bias)
    max_weight = jnp.maximum(max_weight, jnp.max(jnp.abs(bias)))
  bound = rigorous.affine_error(absolute, products=products, abs_products=abs_products,
                                has_bias=bias is not None, max_abs_weight=max_weight, fmt=fmt)
  return y, bound


def _conv_columns(layer, x: jax.Array, ksize: tuple[int, ...]) -> jax.Array:
  """The inputs each output of ``layer``'s conv reads (:func:`aol_jax._src.patches.
  conv_patches`), with its padding, strides and dilation as they are now."""
  nd = len(ksize)
  return patches.conv_patches(
      x, ksize, strides=checks.positive_ints(layer.strides, nd, "strides"),
      dilation=checks.positive_ints(layer.kernel_dilation, nd, "kernel_dilation"),
      padding=padding_lib.normalize_padding(layer.padding, nd))


def _conv_abs_bound(cols: jax.Array, kernel: jax.Array, groups: int,
                    dtype) -> tuple[jax.Array, int]:
  """An entrywise upper bound on ``|T| |x|`` of a conv, evaluated at 2 / taps of its cost,
  and the rounding depth of that evaluation.

  At output ``p``, channel ``o``, ``(|T| |x|) = sum_{t, c} |K[t, c, o]| |x[p + t, c]|``. With
  ``t*`` the tap of the largest ``sum |K[t]|`` (the centre of a kernel that starts as the
  identity), it is at most ``sum_c |K[t*, c, o]| |x[p + t*, c]| + sum_c (sum_{t != t*}
  |K[t, c, o]|) max_{t != t*} |x[p + t, c]|``: one contraction over ``2 c_in / g`` terms.
  ``cols`` are the conv's columns ``(batch, *out, taps, c_in)``; the tap sums add up to
  ``taps`` roundings to a term.
  """
  taps = cols.shape[-2]
  absk = jnp.abs(kernel).reshape(taps, *kernel.shape[-2:])
  absc = jnp.abs(cols)
  star = jnp.argmax(jnp.sum(absk, axis=(1, 2)))
  others = (jnp.arange(taps) != star)
  rest = jnp.max(jnp.where(others[:, None], absc, 0), axis=-2)
  # Columns [x at t*, max of the others], per input channel: (..., 2, c_in), as two taps.
  lhs = jnp.stack([jnp.take(absc, star, axis=-2), rest], axis=-2)
  rhs = jnp.stack([absk[star], jnp.sum(jnp.where(others[:, None, None], absk, 0), axis=0)])
  absolute, depth = patches.conv_as_dot(lhs, rhs, groups, dtype)
  return absolute, depth + taps


def _frozen_dtype(layer, x: jax.Array, kernel: jax.Array):
  """The dtype a frozen layer computes in: its ``dtype``, else that of ``x`` and the kernel,
  at least float32."""
  if layer.dtype is not None:
    return jnp.dtype(layer.dtype)
  return jnp.promote_types(jnp.promote_types(x.dtype, kernel.dtype), jnp.float32)


def _abs_norm_bound(kernel: np.ndarray) -> float:
  """A rigorous bound on ``|| |T| ||_2``, ``T`` the layer's map with every weight made
  non-negative: ``|| |W| ||`` for a dense kernel; for a conv, ``max_g || sum_t |K_t| ||``
  (a non-negative kernel's symbol is largest at frequency 0, for any padding, stride,
  dilation and input size)."""
  return spectral_bounds.dense_norm_bound(np.abs(kernel))


@protocol.library_class
class _AOLLayer(nnx.Module):
  """What :class:`AOLDense` and :class:`AOLConv` share: the static modes, the rescaling
  from the factors, and the kernel applied. A subclass defines ``factors``,
  ``apply_factors`` and ``_rescale_now`` (the whole rescaling: one compiled program per
  kernel shape and setting outside a trace, shared by every layer)."""
  _FORWARD_METHODS = ("applied_kernel", "rescale", "factors", "apply_factors",
                      "_rescale_now", "rounding_error")

  def set_view(self, *, rescaling_axis: str | None = _UNCHANGED,
               gram_precision: rescaling.GramPrecision | None = None,
               scaled_operand: str | None = None) -> None:
    """The static modes ``nnx.view(model, rescaling_axis=..., gram_precision=...,
    scaled_operand=...)`` sets.

    Args:
      rescaling_axis: a mesh axis name: the training call splits the rescaling's work over
        that axis of the mesh set with ``jax.set_mesh`` (traced outside one, the call
        raises); ``None``: every device computes all of it. Results are the same.
      gram_precision: the precision of the training-time Gram products, a key of
        :data:`aol_jax.GRAM_PRECISIONS`.
      scaled_operand: what the training call multiplies by the factors, one of
        :data:`~aol_jax._src.rescaled_apply.SCALED_OPERANDS`: ``'kernel'`` (the default)
        forms the rescaled kernel and applies it; ``'input'`` scales the layer's input
        features and applies the raw kernel, the same map
        (:func:`aol_jax._src.rescaled_apply.apply_rescaled`);
        ``'smaller'`` scales the input where it has at most twice the kernel's elements,
        else the kernel (``aol_jax.training``'s choice on a TPU). A frozen layer applies its
        stored kernel whatever this says.
    """
    if rescaling_axis is not _UNCHANGED:
      if rescaling_axis is not None and not isinstance(rescaling_axis, str):
        raise ValueError(f"rescaling_axis must be a mesh axis name or None, got "
                         f"{rescaling_axis!r}: pass the name of the data axis, e.g. 'data'.")
      self.rescaling_axis = rescaling_axis
    if gram_precision is not None:
      self.gram_precision = check_precision(gram_precision)
    if scaled_operand is not None:
      if scaled_operand not in SCALED_OPERANDS:
        raise ValueError(f"scaled_operand must be one of {SCALED_OPERANDS}, got "
                         f"{scaled_operand!r}.")
      self.scaled_operand = scaled_operand

  def _init_parameters(self, shape: tuple[int, ...], *, use_bias: bool, dtype: Dtype | None,
                       precision: PrecisionLike, eps: float, gram_precision: str,
                       kernel_init: Initializer, bias_init: Initializer, param_dtype: Dtype,
                       rngs: nnx.Rngs) -> None:
    """The attributes and parameters both layers have: the kernel of ``shape`` (its last
    axis the output features) and the bias, drawn in that order."""
    self.use_bias, self.dtype, self.precision = use_bias, dtype, precision
    self.eps = checks.non_negative(eps, "eps (the AOL stabiliser)",
                                   ": a negative eps enlarges the factors and breaks the "
                                   "1-Lipschitz bound")
    self.gram_precision = check_precision(gram_precision)
    self.rescaling_axis: str | None = None  # set by nnx.view (set_view)
    self.scaled_operand = "kernel"  # set by nnx.view (set_view)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (shape[-1],), param_dtype))
                 if use_bias else None)

  def rescale(self, kernel: jax.Array, *, gram_precision: str | None = None,
              axis_name: str | None = None) -> jax.Array:
    """The rescaled ``kernel`` (input feature ``i`` scaled by ``d_i``), with the factors
    :meth:`factors` computes."""
    return self.apply_factors(kernel, self.factors(kernel, gram_precision=gram_precision,
                                                   axis_name=axis_name))

  def applied_kernel(self, *, gram_precision: str | None = None) -> jax.Array:
    """The kernel this layer applies: the stored one once frozen, else the raw kernel
    rescaled now at ``gram_precision`` (default: the layer's). The one definition used by
    the call, :func:`aol_jax.freeze` (at ``'highest'``) and :meth:`lipschitz_bound`."""
    if _frozen(self):
      return self.kernel[...]
    precision = self.gram_precision if gram_precision is None else gram_precision
    return self._rescale_now(self.kernel[...], precision)


@protocol.library_class
class AOLDense(_AOLLayer):
  """``y = x @ (diag(d) P) + b``, 1-Lipschitz in l2 for every ``P`` (AOL, Theorem 1).

  Args mirror ``nnx.Linear``. ``eps`` is the AOL stabiliser inside the factor
  ``(sum_j |P P^T|_ij + eps) ** -1/2``. ``gram_precision`` is the precision of the
  training-time Gram products, a key of :data:`aol_jax.GRAM_PRECISIONS`;
  :func:`aol_jax.freeze` ignores it (float32, ``'highest'``). It, ``rescaling_axis``
  (split the rescaling over a mesh axis; default ``None``) and ``scaled_operand`` (what the
  factors multiply: ``'kernel'``, the default, ``'input'`` or ``'smaller'``) are static
  attributes, set with ``nnx.view(model, gram_precision=..., rescaling_axis=...,
  scaled_operand=...)`` (:meth:`set_view`), as ``aol_jax.training.create_train_state`` does.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, kernel_init: Initializer | None = None,
               bias_init: Initializer = nnx.initializers.zeros_init(), eps: float = 1e-6,
               gram_precision: rescaling.GramPrecision = "default", rngs: nnx.Rngs):
    if in_features < 1 or out_features < 1:
      raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, "
                       f"{out_features}.")
    self.in_features, self.out_features = in_features, out_features
    self._init_parameters((in_features, out_features), use_bias=use_bias, dtype=dtype,
                          precision=precision, eps=eps, gram_precision=gram_precision,
                          kernel_init=aol_init() if kernel_init is None else kernel_init,
                          bias_init=bias_init, param_dtype=param_dtype, rngs=rngs)

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

  def _rescale_now(self, kernel: jax.Array, precision: str) -> jax.Array:
    return rescaling.rescale_dense(kernel, eps=self.eps, gram_precision=precision)

  def lipschitz_bound(self) -> float:
    """A rigorous bound on the spectral norm of :meth:`applied_kernel`
    (:func:`aol_jax.dense_norm_bound`, float64, its own rounding included): at most
    about 1 by AOL's Theorem 1, usually less once trained."""
    return spectral_bounds.dense_norm_bound(_host_kernel(self))

  def statistical_terms(self) -> StatisticalTerms:
    """:func:`aol_jax._src.certification.statistical.dense_terms` of the kernel's shape."""
    n_in, n_out = self.kernel[...].shape
    return statistical.dense_terms(n_in, n_out, self.lipschitz_bound(), frozen=_frozen(self))

  def rounding_error(self, x: jax.Array, fmt: spectral_bounds.FloatFormat
                     ) -> tuple[jax.Array, jax.Array]:
    """``(x @ W + b, bound)`` evaluated in ``fmt`` with the frozen kernel, and per example the
    rigorous bound on its error (:func:`aol_jax._src.certification.rigorous.affine_error`)."""
    kernel = _frozen_kernel(self)
    if x.ndim != 2 or x.shape[-1] != kernel.shape[0]:
      raise ValueError(f"AOLDense expects inputs (batch, {kernel.shape[0]}), got shape "
                       f"{x.shape}.")
    dtype = jnp.dtype(fmt.name)
    kernel = kernel.astype(dtype)
    y, depth = patches.dense_as_dot(x.astype(dtype), kernel, dtype)
    absolute, abs_depth = patches.dense_as_dot(jnp.abs(x.astype(dtype)), jnp.abs(kernel), dtype)
    return _affine_error(self, y, absolute, kernel, products=depth, abs_products=abs_depth,
                         fmt=fmt)

  def rounding_error_slope(self, fmt: spectral_bounds.FloatFormat) -> float:
    """``gamma_N || |W| ||_2`` (:func:`aol_jax._src.certification.rigorous.affine_slope`)."""
    kernel = _host_kernel(self)
    return rigorous.affine_slope(_abs_norm_bound(kernel), products=kernel.shape[0],
                                 has_bias=self.bias is not None, fmt=fmt)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_features:
      raise ValueError(f"AOLDense expects {self.in_features} input features on the last axis, "
                       f"got input of shape {x.shape}.")
    bias = None if self.bias is None else self.bias[...]

    def op(x, kernel):
      x, kernel = nnx.nn.dtypes.promote_dtype((x, kernel), dtype=self.dtype)
      return jnp.matmul(x, kernel, precision=self.precision)

    if _frozen(self):
      # Frozen: the certified evaluation (chunked dot products, precision HIGHEST), so the
      # network a certificate covers is the one that runs.
      kernel = self.kernel[...]
      dtype = _frozen_dtype(self, x, kernel)
      flat = batch_reshape(x, (-1, x.shape[-1]))
      y = patches.dense_as_dot(flat, kernel, dtype)[0]
      y = batch_reshape(y, (*x.shape[:-1], y.shape[-1]))
    else:
      y = _apply_kernel(self, op, x)
    if bias is None:
      return y
    y, bias = nnx.nn.dtypes.promote_dtype((y, bias), dtype=self.dtype)
    return y + bias


@protocol.library_class
class AOLConv(_AOLLayer):
  """An AOL-rescaled convolution over 1, 2 or 3 spatial dims, 1-Lipschitz in l2.

  The bound (AOL, Theorem 2) holds for zero padding ('SAME', 'VALID', explicit ints) and
  'CIRCULAR', for any input size, stride and dilation; strides > 1 keep the bound but
  loosen it. Other padding modes raise ``ValueError``. As in ``nnx.Conv``, an int
  ``kernel_size`` means a 1D conv; inputs are ``(*batch, *spatial, in_features)``.
  ``gram_precision``, ``rescaling_axis`` and ``scaled_operand`` as in :class:`AOLDense`.
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
    self.kernel_size = checks.positive_ints(ksize, nd, "kernel_size")
    self.strides = checks.positive_ints(strides, nd, "strides")
    self.kernel_dilation = checks.positive_ints(kernel_dilation, nd, "kernel_dilation")
    self.padding = padding_lib.normalize_padding(padding, nd)
    g = checks.feature_groups(feature_group_count, "AOLConv", in_features=in_features,
                              out_features=out_features)
    if in_features < 1 or out_features < 1:
      raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, "
                       f"{out_features}.")
    if gram_method is not None and gram_method not in rescaling.GRAM_METHODS:
      raise ValueError(f"gram_method must be one of {rescaling.GRAM_METHODS}, got {gram_method!r}.")
    self.in_features, self.out_features, self.feature_group_count = in_features, out_features, g
    self.gram_method = gram_method
    self._init_parameters((*self.kernel_size, in_features // g, out_features),
                          use_bias=use_bias, dtype=dtype, precision=precision, eps=eps,
                          gram_precision=gram_precision,
                          kernel_init=aol_init(g) if kernel_init is None else kernel_init,
                          bias_init=bias_init, param_dtype=param_dtype, rngs=rngs)

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

  def _rescale_now(self, kernel: jax.Array, precision: str) -> jax.Array:
    return rescaling.rescale_conv(kernel, eps=self.eps,
                                  feature_group_count=self.feature_group_count,
                                  method=self.gram_method, gram_precision=precision)

  def lipschitz_bound(self) -> float:
    """A rigorous bound on the l2 norm of the convolution with :meth:`applied_kernel`, for
    this layer's padding, strides, dilation and groups and any input size
    (:func:`aol_jax.conv_norm_bound`): at most about 1 by AOL's Theorem 2."""
    return spectral_bounds.conv_norm_bound(
        _host_kernel(self), strides=tuple(self.strides),
        kernel_dilation=tuple(self.kernel_dilation),
        feature_group_count=self.feature_group_count, padding=self.padding)

  def statistical_terms(self) -> StatisticalTerms:
    """:func:`aol_jax._src.certification.statistical.conv_terms` of the kernel's shape."""
    kernel = self.kernel[...]
    g = self.feature_group_count
    return statistical.conv_terms(kernel.shape[:-2], kernel.shape[-2] * g, kernel.shape[-1], g,
                                  self.lipschitz_bound(), frozen=_frozen(self))

  def rounding_error(self, x: jax.Array, fmt: spectral_bounds.FloatFormat
                     ) -> tuple[jax.Array, jax.Array]:
    """The convolution evaluated in ``fmt`` as slices and one dot product
    (:func:`aol_jax._src.patches.conv_as_dot`, a sum of products on every platform) with the
    frozen kernel and this layer's padding, strides, dilation and groups, and per example
    the rigorous bound on its error (:func:`aol_jax._src.certification.rigorous.affine_error`)."""
    kernel = _frozen_kernel(self)
    ksize = kernel.shape[:-2]
    nd = len(ksize)
    g = self.feature_group_count
    if x.ndim != nd + 2 or x.shape[-1] != kernel.shape[-2] * g:
      raise ValueError(f"AOLConv expects inputs (batch, {nd} spatial dims, "
                       f"{kernel.shape[-2] * g} channels), got shape {x.shape}.")
    dtype = jnp.dtype(fmt.name)
    kernel = kernel.astype(dtype)
    cols = _conv_columns(self, x.astype(dtype), ksize)
    y, depth = patches.conv_as_dot(cols, kernel, g, dtype)
    absolute, abs_depth = _conv_abs_bound(cols, kernel, g, dtype)
    return _affine_error(self, y, absolute, kernel, products=depth, abs_products=abs_depth,
                         fmt=fmt)

  def rounding_error_slope(self, fmt: spectral_bounds.FloatFormat) -> float:
    """``gamma_N max_g || sum_t |K_t| ||_2``, ``N`` the taps times the group's input channels
    (:func:`aol_jax._src.certification.rigorous.affine_slope`)."""
    kernel = _host_kernel(self)
    nd = kernel.ndim - 2
    g = self.feature_group_count
    c_in_g, c_out = kernel.shape[-2:]
    summed = np.abs(kernel).sum(axis=tuple(range(nd))).reshape(c_in_g, g, c_out // g)
    abs_norm = max(_abs_norm_bound(summed[:, i, :]) for i in range(g))
    return rigorous.affine_slope(abs_norm, products=math.prod(kernel.shape[:-1]),
                                 has_bias=self.bias is not None, fmt=fmt)

  def __call__(self, x: jax.Array) -> jax.Array:
    nd = len(self.kernel_size)
    if x.ndim < nd + 1 or x.shape[-1] != self.in_features:
      raise ValueError(f"AOLConv expects inputs (*batch, {nd} spatial dims, "
                       f"{self.in_features} channels), got shape {x.shape}.")
    batch_shape = x.shape[:-(nd + 1)]
    x = batch_reshape(x, (-1,) + x.shape[-(nd + 1):])
    bias = None if self.bias is None else self.bias[...]
    if _frozen(self):
      # Frozen: the certified evaluation (slices and chunked dot products at precision
      # HIGHEST), so the network a certificate covers is the one that runs.
      kernel = self.kernel[...]
      dtype = _frozen_dtype(self, x, kernel)
      cols = _conv_columns(self, x.astype(dtype), kernel.shape[:-2])
      y = patches.conv_as_dot(cols, kernel, self.feature_group_count, dtype)[0]
      if bias is not None:
        y = y + bias.astype(y.dtype)
      return batch_reshape(y, batch_shape + y.shape[1:])
    pad = self.padding
    if pad == "CIRCULAR":  # by the stored kernel's size, whatever the attribute says
      x = padding_lib.circular_pad(x, self.kernel[...].shape[:nd], self.kernel_dilation)
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
