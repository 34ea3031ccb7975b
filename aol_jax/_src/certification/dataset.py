"""Certifying a whole dataset: the certified accuracy at each radius, as a table."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from aol_jax._src.certification import certifier as certifier_lib
from aol_jax._src.certification.margins import check_labels
from aol_jax._src.certification.modes import DEFAULT_ROUNDING, Rounding, get_mode
from aol_jax._src.certification.results import CertificationResult
from aol_jax._src.certification.rule import STANDARD_RADII


@jax.jit
def _accumulate(totals, out):
  return totals[0] + out[0], totals[1] + out[1], jnp.maximum(totals[2], out[2])


def certify_dataset(model: nnx.Module, images: ArrayLike, labels: ArrayLike, *,
                    eps_list: Sequence[float] = STANDARD_RADII, batch_size: int,
                    rounding: Rounding = DEFAULT_ROUNDING,
                    mesh: jax.sharding.Mesh | None = None,
                    platform: str | None = None) -> CertificationResult:
  """Certifies every example of a dataset at every radius; returns the table as data.

  The model is frozen into float32 (:func:`aol_jax.freeze`: bfloat16 parameters widened,
  per-layer precisions cleared), every step it applies must state its Lipschitz constant
  and its rounding (else :class:`~aol_jax.certification.UndeclaredBoundError` names the step
  and its path), and each example is certified at each radius with its own allowance by the
  prepared certifier (:func:`aol_jax.certification.prepare`), the decision that
  :func:`aol_jax.certified_radii` reports. ``rounding`` names what the certificates hold for
  (:data:`aol_jax.ROUNDING_MODES`):

  * ``'float32'`` (default): the prediction of every float32 evaluation of the frozen
    network (any summation order, fused multiply-add or not, subnormals flushed or not) is
    the same at every ``x'`` of the ball. Rigorous.
  * ``'float64'``: the same for the float64 evaluation of the frozen float32 weights
    (evaluated inside ``jax.enable_x64``, restored on exit; float64 images taken as given).
  * ``'float32_statistical'``: the float32 evaluation under a statistical rounding model
    (independent zero-mean errors); not a guarantee.

  float64 images in a float32 mode are rounded to float32 and certified at
  ``eps + ||x - x32||``. Every batch has ``batch_size`` rows, rounded up to a multiple of the
  mesh's ``'data'`` axis; the last one is padded and masked, never dropped. With a ``mesh``
  the batches are sharded over its ``'data'`` axis and the model replicated; without one it
  runs on the first device of ``platform`` (default: JAX's default backend). A mode covers
  the platforms of its row (CPU and CUDA GPUs); on a TPU pass ``platform='cpu'``. Networks
  of one architecture share one compiled evaluation in the rigorous modes (their parameters,
  ``L`` and rounding constants are its arguments): the checkpoints of a run compile once. The
  evaluation is traced anew for every model and shared only where it traces to the same
  program, so a method or class attribute changed in between is compiled as it is now.

  Args:
    model: an ``AOLNetwork`` (or any module stating the protocol of
      :mod:`aol_jax.certification`), trained or frozen.
    images: ``(n, ...)`` floating point, finite, in ``[0, 1]``.
    labels: ``(n,)`` integer class ids.
    eps_list: radii, finite and >= 0, default the paper's ``36/255, 72/255, 108/255, 1``.
    batch_size: rows per compiled call, an int >= 1.
    rounding: a key of :data:`aol_jax.ROUNDING_MODES`, reported in the result.
    mesh: optional mesh with a ``'data'`` axis.
    platform: where to run without a mesh: ``'cpu'``, ``'gpu'``, ...; default JAX's default.
  """
  mode = get_mode(rounding)
  images = certifier_lib.checked_images(images)
  batch_size = certifier_lib.checked_batch_size(batch_size)
  eps_arr = np.asarray(eps_list, np.float64)
  if eps_arr.ndim != 1 or not np.all(np.isfinite(eps_arr)) or (eps_arr < 0).any():
    raise ValueError(f"eps_list must be a sequence of finite radii >= 0, got {eps_list}.")
  labels = np.asarray(labels)
  on, state_at, batch_at = certifier_lib.placement(platform, mesh)
  prepared = certifier_lib.prepare(model, images.shape[1:], rounding=mode.name, platform=on)
  check_labels(labels, prepared.num_classes, batch=len(images))
  eps = certifier_lib.float_radii(eps_arr, mode.fmt.name)
  totals = None
  with mode.arithmetic(), (jax.set_mesh(mesh) if mesh is not None else
                                               contextlib.nullcontext()):
    for state, x, shift, y, valid in certifier_lib.batches(
        prepared, images, labels.astype(np.int32), batch_size=batch_size, mesh=mesh,
        state_at=state_at, batch_at=batch_at):
      out = certifier_lib.counts(prepared, state, x, shift, y, valid, eps)
      # Summed on the device, read once at the end: the host never waits between batches.
      totals = out if totals is None else _accumulate(totals, out)
    correct, certified, max_allow = jax.device_get(totals)
  return CertificationResult(
      num_examples=len(images), num_correct=int(correct),
      eps_list=tuple(float(e) for e in eps_arr),
      num_certified=tuple(int(c) for c in certified),
      lipschitz_constant=prepared.lipschitz,
      max_allowance=tuple(float(a) for a in max_allow), rounding=mode.name, platform=on)
