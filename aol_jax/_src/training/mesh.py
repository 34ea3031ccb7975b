"""A one-axis data-parallel device mesh, and global batches sharded over it.

The whole training state is replicated (``P()``) and every batch is split along its first
axis over the mesh axis ``'data'`` (``P('data')``): plain data parallelism, the layout
``jax.jit`` turns into per-device work plus one all-reduce of the gradients.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_data_mesh(num_devices: int | None = None) -> Mesh:
  """A mesh with one axis ``'data'`` over the first ``num_devices`` devices (default: all).

  The axis is ``AxisType.Explicit``, so shardings are part of the array types inside
  ``jax.jit`` rather than left to the compiler to guess; the AOL layers' and blocks'
  reshapes keep the batch sharding (``aol_jax.sharding.batch_reshape``), so a model runs on
  batch-sharded arrays as they are. In a multi-process job the mesh spans every device of
  the job (``num_devices`` None or the global device count).
  """
  available = jax.device_count()
  n = available if num_devices is None else num_devices
  if not 1 <= n <= available:
    raise ValueError(f"Asked for a mesh of {num_devices} devices, but {available} are available.")
  if jax.process_count() > 1 and n != available:
    raise ValueError(f"In a job of {jax.process_count()} processes the data mesh must span all "
                     f"{available} devices (every process feeds its share); got "
                     f"num_devices={num_devices}. Leave it unset.")
  devices = jax.devices()[:n]
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Split the leading (batch) axis over ``'data'``; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def check_batch_size(mesh: Mesh, global_batch_size: int) -> None:
  """Raise ``ValueError`` unless the mesh's device count divides ``global_batch_size``."""
  n = mesh.devices.size
  if global_batch_size % n:
    lower = global_batch_size // n * n
    suggestion = f"{lower} or {lower + n}" if lower else f"{n}"
    raise ValueError(
        f"The global batch size {global_batch_size} is not divisible by the {n} devices of the "
        f"'{DATA_AXIS}' mesh: every device needs the same number of examples. Use a batch size "
        f"that is a multiple of {n} (e.g. {suggestion}) or run on fewer devices.")


def global_batch(mesh: Mesh, *local_arrays: np.ndarray | jax.Array) -> tuple[jax.Array, ...]:
  """Global arrays sharded on ``'data'``, built from this process's share of the batch.

  Each process passes its own ``local_batch = global_batch / process_count`` examples (the
  same count on every process); in a single-process run that is the whole batch. Arrays of
  the batch (images, labels, ...) must agree on their leading dimension.

  Raises:
    ValueError: if the global batch size is not a multiple of the device count, or the
      arrays disagree on the batch size.
  """
  if not local_arrays:
    raise ValueError("global_batch needs at least one array.")
  sizes = {int(np.shape(a)[0]) for a in local_arrays}
  if len(sizes) != 1:
    raise ValueError(f"The arrays of a batch must share their leading (batch) size, got "
                     f"{sorted(sizes)}.")
  local = sizes.pop()
  # Processes whose devices are in the mesh each hold an equal share.
  processes = len({d.process_index for d in mesh.devices.flat})
  check_batch_size(mesh, local * processes)
  sharding = data_sharding(mesh)
  return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a))
               for a in local_arrays)
