"""The AOL factors ``d_i = (sum_{s, j} |G[s, i, j]| + eps) ** -1/2`` with a hand-written
derivative, whole or split over a ``jax.shard_map`` axis.

Forward: one triangle of the Gram (:func:`aol_jax.gram.half_gram_rows`); since
``G[-s] = G[s]^T``, row ``i``'s sum over the offsets ``s > 0`` is column ``i``'s sum over
``s < 0``. Reverse mode keeps the kernel, ``d`` and ``sign(H)`` of that triangle (in two bit
planes, :func:`_pack_signs`; as int8 when split), and spends one product's worth of
multiply-adds, as the forward of the whole Gram would.

Split over ``axis_name`` (size ``n``), for a conv kernel each device takes a block of
``ceil(in / n)`` input features (the kernel zero-padded to a multiple of ``n``) and forms
those rows of the triangle: ``1/n`` of the forward and of the backward products. A dense
kernel's Gram ``A A^T`` is cut into ``2n`` row blocks; device ``r`` forms the block pairs
``(r, r .. r + n)`` and ``(r + n, r + n .. r + 2n - 1)`` (cyclically), so the ``n`` devices
together form each pair on and above the diagonal once: ``(2n + 1) / (4 n^2)`` of the
product each, about half a row block's ``1/n`` (:func:`_paired_blocks`). The backward
pass takes ``1/n`` of a product either way. Each device's row and column sums are added over
the axis by one ``psum`` of an ``(in,)`` vector. In the backward pass each device
returns its share of the kernel's gradient, for a kernel varying over the axis: the ``psum``
that completes it is the transpose of the ``pcast`` that made the kernel varying (made here
if it is not), the one that also sums the gradients of the devices' batch shares.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from aol_jax._src.gram import dot, half_gram_rows, offset_table


def factors(kernel: jax.Array, ksize: tuple[int, ...], eps: float, precision: str,
            axis_name: str | None = None) -> jax.Array:
  """Factors of a ``(*ksize, in, out)`` kernel (``ksize = ()`` for dense), in its dtype.

  ``axis_name``: called inside a ``jax.shard_map`` over that axis, split the work over it
  (see the module docstring); ``None``: compute it all here.
  """
  if axis_name is not None and axis_name not in jax.typeof(kernel).manual_axis_type.varying:
    kernel = jax.lax.pcast(kernel, axis_name, to="varying")
  return _factors(kernel, ksize, eps, precision, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _factors(kernel, ksize, eps, precision, axis_name):
  return _fwd(kernel, ksize, eps, precision, axis_name)[0]


def _as_taps(kernel: jax.Array) -> jax.Array:
  return kernel.reshape(-1, *kernel.shape[-2:])


def _block(x: jax.Array, axis_name: str, axis: int) -> tuple[jax.Array, jax.Array]:
  """This device's block of ``x`` along ``axis``, zero-padded so that equal blocks cover it,
  and the block's start."""
  n_dev = jax.lax.axis_size(axis_name)
  b = -(-x.shape[axis] // n_dev)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n_dev * b - x.shape[axis])
  start = jax.lax.axis_index(axis_name) * b
  return jax.lax.dynamic_slice_in_dim(jnp.pad(x, pad), start, b, axis), start


def _place(block: jax.Array, start: jax.Array, n: int, axis: int) -> jax.Array:
  """``block`` at ``start`` along ``axis`` of zeros whose size there is ``n`` (cut to it)."""
  n_dev_b = -(-n // block.shape[axis]) * block.shape[axis]
  shape = list(block.shape)
  shape[axis] = n_dev_b
  full = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(shape, block.dtype), block, start, axis)
  return jax.lax.slice_in_dim(full, 0, n, axis=axis)


def _roll(x: jax.Array, shift: jax.Array) -> jax.Array:
  """``x`` rolled by ``-shift`` along axis 0 (a traced shift): ``out[q] = x[(q + shift) % len]``."""
  n = x.shape[0]
  return jax.lax.dynamic_slice_in_dim(jnp.concatenate([x, x]), jnp.mod(shift, n), n, 0)


def _paired_blocks(a: jax.Array, axis_name: str) -> tuple[jax.Array, jax.Array, int, int]:
  """This device's view of ``a`` ``(in, f)`` for the paired-block split of ``A A^T``.

  ``a`` is zero-padded to ``2m`` blocks of ``b = ceil(in / 2m)`` rows (``m`` the axis size)
  and rolled by device ``r``'s ``r`` blocks, so that its pairs are two contiguous products:
  rolled block 0 against blocks ``0 .. m`` and block ``m`` against blocks ``m .. 2m - 1``.
  Over ``r``, every block pair at cyclic distance below ``m`` is formed from its lower
  block, and each pair at distance ``m`` from its block below ``m``: once.

  Returns:
    The rolled, padded ``a``, the roll (``r * b``, undone by :func:`_roll` of ``-r * b``),
    ``m`` and ``b``.
  """
  m = jax.lax.axis_size(axis_name)
  b = -(-a.shape[0] // (2 * m))
  padded = jnp.pad(a, ((0, 2 * m * b - a.shape[0]), (0, 0)))
  shift = jax.lax.axis_index(axis_name) * b
  return _roll(padded, shift), shift, m, b


def _row_and_column_sums(half: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``sum_{s <= 0, j} |H[s, i, j]|`` per row ``i``, and ``sum_{s < 0, i} |H[s, i, j]|`` per
  column ``j`` (row ``j``'s sum over ``s > 0``); zeros for one offset (no empty slice: an
  empty array on an explicit mesh cannot be placed)."""
  a = jnp.abs(half)
  rows = a.sum(axis=(0, 2))
  if half.shape[0] == 1:
    return rows, jnp.zeros(half.shape[-1], half.dtype)
  return rows, a[:-1].sum(axis=(0, 1))


def _pack_signs(half: jax.Array) -> dict[str, jax.Array]:
  """``sign(H)`` as the bit planes ``H > 0`` and ``H < 0`` along its last axis (2 bits an
  entry; a zero stays zero). XLA:CPU fuses an elementwise int8 ``sign()`` into its use in
  the backward pass and so keeps the float32 Gram alive until then (AOL-Small's train step
  on CPU: 735 MiB peak, against 680 MiB with the planes); packed signs it must form."""
  return {"positive": jnp.packbits(half > 0, axis=-1),
          "negative": jnp.packbits(half < 0, axis=-1)}


def _unpack_signs(packed: dict[str, jax.Array], n: int) -> jax.Array:
  """The int8 ``sign(H)`` of :func:`_pack_signs`, ``n`` the last axis of ``H``."""
  plane = lambda key: jnp.unpackbits(packed[key], axis=-1, count=n).astype(jnp.int8)
  return plane("positive") - plane("negative")


def _fwd(kernel, ksize, eps, precision, axis_name):
  k = _as_taps(kernel)
  n = k.shape[1]
  table, _ = offset_table(ksize)
  if axis_name is None:
    half = half_gram_rows(k, k, table, precision, whole=True)
    row_sums, col_sums = _row_and_column_sums(half)
    sums = row_sums + col_sums
  elif k.shape[0] == 1 and jax.lax.axis_size(axis_name) > 1:
    a, shift, m, b = _paired_blocks(k[0], axis_name)
    # (b, (m + 1) b) and (b, m b); the first b columns of each are a diagonal block.
    half = (dot(a[:b], a[:(m + 1) * b], precision, (1, 1)),
            dot(a[m * b:(m + 1) * b], a[m * b:], precision, (1, 1)))
    ga, gb = (jnp.abs(g) for g in half)
    rolled = (jnp.pad(jnp.concatenate([ga.sum(1), ga[:, b:].sum(0)]), (0, (m - 1) * b))
              + jnp.pad(jnp.concatenate([gb.sum(1), gb[:, b:].sum(0)]), (m * b, 0)))
    sums = jax.lax.psum(_roll(rolled, -shift)[:n], axis_name)
  else:
    rows, start = _block(k, axis_name, 1)
    half = half_gram_rows(rows, k, table, precision, whole=False)
    row_sums, col_sums = _row_and_column_sums(half)
    sums = jax.lax.psum(_place(row_sums, start, n, 0) + col_sums, axis_name)
  d = jax.lax.rsqrt(sums + eps)
  if axis_name is None:
    return d, (kernel, d, _pack_signs(half))
  # Split over a mesh, the compilers keep int8 signs of each device's share. Packed, the
  # per-device peak / plain of AOL-Small's train step went 1.56 -> 1.50 on v5e 2x4 but
  # 1.13 -> 1.14 on v5p 2x2x2 (each compiled alone in a fresh process).
  return d, (kernel, d, jax.tree.map(lambda g: jnp.sign(g).astype(jnp.int8), half))


def _half_gram_rows_vjp(rows, k, sign, c_rows, c, table, precision):
  """``W A`` for the Gram product's cotangent ``W`` (``A`` the ``(taps * in, out)`` kernel).

  ``W[(t, i), (u, j)] = (c_i + c_j) sign(G[s(t, u), i, j])`` is symmetric. From the rows
  ``i`` of its triangle (the centre blocks ``W0`` and the blocks ``Wc[t, u > t]``):
  ``Wc A`` lands on the rows ``(t, i)`` (returned as ``(taps, b, out)``), ``Wc^T A_rows`` and
  ``W0_rows^T A_rows`` on every row (``(taps, n, out)``); summed over the row blocks these
  are ``W A``. ``taps^2 b n out`` multiply-adds, one product's worth.
  """
  taps, b, c_out = rows.shape
  n = k.shape[1]
  s = sign.astype(k.dtype)
  cc = c_rows[:, None] + c[None, :]
  # W0_rows^T A_rows, one product per tap, on the tap slices the loop below uses too. As one
  # product of the (b, taps * out) features-first kernel, XLA:CPU took the forward's copy
  # of it (sym_outer's) for this one and kept it alive from the forward pass to here:
  # AOL-Small's CPU train step peaked at 680 MiB, 1.31x the plain network's, now 665, 1.28.
  w0 = s[-1] * cc
  full = jnp.stack([dot(w0, rows[t], precision, (0, 0)) for t in range(taps)])
  on_rows = []
  for t in range(taps - 1):
    m = taps - t - 1
    w = (s[table[t, t + 1:]] * cc).transpose(1, 0, 2).reshape(b, m * n)
    on_rows.append(dot(w, k[t + 1:].reshape(m * n, c_out), precision))
    full = full + jnp.pad(dot(w, rows[t], precision, (0, 0)).reshape(m, n, c_out),
                          ((t + 1, 0), (0, 0), (0, 0)))
  on_rows.append(jnp.zeros((b, c_out), k.dtype))
  return jnp.stack(on_rows), full


def _bwd(ksize, eps, precision, axis_name, residuals, dd):
  kernel, d, sign = residuals
  # Past the barrier the kernel's layouts below (its taps, its paired blocks, their operands
  # at the Gram's precision) are formed anew instead of taken from the forward pass, which
  # the compilers otherwise keep alive from there to here: with the input scaled (TPU, see
  # rescaled_apply), 14 bf16 copies of AOL-Small's dense kernels on v5e 2x4, per-device
  # peak / plain 1.36 without the barrier, 1.21 with it.
  kernel = jax.lax.optimization_barrier(kernel)
  k = _as_taps(kernel)
  n = k.shape[1]
  table, _ = offset_table(ksize)
  # d(sums ** -1/2) = -1/2 d^3 d(sums). Under a shard_map, d is invariant over the axis, so
  # dd arrives summed over the devices' batch shares.
  c = -0.5 * dd * d ** 3
  if isinstance(sign, tuple):  # the paired blocks of a dense kernel (_fwd)
    a, shift, m, b = _paired_blocks(k[0], axis_name)
    c = _roll(jnp.pad(c, (0, 2 * m * b - n)), shift)
    wa = sign[0].astype(a.dtype) * (c[:b, None] + c[None, :(m + 1) * b])
    wb = sign[1].astype(a.dtype) * (c[m * b:(m + 1) * b, None] + c[None, m * b:])
    # W_IJ A_J onto block I, W_IJ^T A_I onto block J (a diagonal block: once).
    onto_a = dot(wa, a[:b], precision, (0, 0))  # ((m + 1) b, f) onto blocks 0 .. m
    onto_b = dot(wb, a[m * b:(m + 1) * b], precision, (0, 0))  # (m b, f) onto blocks m ..
    grad = jnp.concatenate([
        onto_a[:b] + dot(wa[:, b:], a[b:(m + 1) * b], precision), onto_a[b:m * b],
        onto_a[m * b:] + onto_b[:b] + dot(wb[:, b:], a[(m + 1) * b:], precision), onto_b[b:]])
    dk = _roll(grad, -shift)[:n]
    return (dk.reshape(kernel.shape).astype(kernel.dtype),)
  if axis_name is None:
    on_rows, full = _half_gram_rows_vjp(k, k, _unpack_signs(sign, n), c, c, table, precision)
    dk = full if k.shape[0] == 1 else on_rows + full
  else:
    rows, start = _block(k, axis_name, 1)
    c_rows, _ = _block(c, axis_name, 0)
    on_rows, full = _half_gram_rows_vjp(rows, k, sign, c_rows, c, table, precision)
    # A dense kernel (one tap) has no rows-only part: nothing to place.
    dk = full if k.shape[0] == 1 else _place(on_rows, start, n, 1) + full
  return (dk.reshape(kernel.shape).astype(kernel.dtype),)


_factors.defvjp(_fwd, _bwd)
