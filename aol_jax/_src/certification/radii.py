"""Per example, the prediction and the radius within which it is certified."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from aol_jax._src.certification import certifier as certifier_lib
from aol_jax._src.certification.modes import DEFAULT_ROUNDING, Rounding, get_mode


def certified_radii(model: nnx.Module, images: ArrayLike, *,
                    rounding: Rounding = DEFAULT_ROUNDING, batch_size: int,
                    mesh: jax.sharding.Mesh | None = None,
                    platform: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per example, the predicted class and the l2 radius within which it is certified.

  ``radii[i] > eps`` exactly when the prediction for ``images[i]`` is certified at radius
  ``eps`` under ``rounding``: the same prepared certifier, freezing, validation, batching
  and sharding as :func:`aol_jax.certify_dataset`, whose certified count at ``eps`` is
  therefore ``sum((predictions == labels) & (radii > eps))`` for every float ``eps``.
  ``radii[i]`` is the smallest float64 above the largest radius certified (a float of the
  mode's format: radii are rounded up to it as in :func:`aol_jax.certify_dataset`), so the
  prediction holds on the open ball of that radius; 0 where nothing is certified. The radius
  comes from an exact bisection on the float's bits of the rule's own decision.

  Args:
    model: as for :func:`aol_jax.certify_dataset`.
    images: ``(n, ...)`` floating point, finite, in ``[0, 1]``.
    rounding: a key of :data:`aol_jax.ROUNDING_MODES`.
    batch_size: rows per compiled call, an int >= 1.
    mesh: optional mesh with a ``'data'`` axis.
    platform: where to run without a mesh (default: JAX's default backend).

  Returns:
    ``(predictions, radii)``: ``(n,)`` int32 class ids and ``(n,)`` float64 radii, numpy.
  """
  mode = get_mode(rounding)
  images = certifier_lib.checked_images(images)
  batch_size = certifier_lib.checked_batch_size(batch_size)
  on, state_at, batch_at = certifier_lib.placement(platform, mesh)
  prepared = certifier_lib.prepare(model, images.shape[1:], rounding=mode.name, platform=on)
  n = len(images)
  with mode.arithmetic(), (jax.set_mesh(mesh) if mesh is not None else
                           contextlib.nullcontext()):
    outs = [certifier_lib.radii(prepared, state, x, shift)
            for state, x, shift, _, _ in certifier_lib.batches(
                prepared, images, np.zeros(n, np.int32), batch_size=batch_size, mesh=mesh,
                state_at=state_at, batch_at=batch_at)]
    outs = jax.device_get(outs)
  preds = np.concatenate([o[0] for o in outs])[:n]
  largest = np.concatenate([np.asarray(o[1], np.float64) for o in outs])[:n]
  at_zero = np.concatenate([o[2] for o in outs])[:n]
  radii = np.where(at_zero, np.nextafter(largest, np.inf), 0.0)
  return preds.astype(np.int32), radii
