"""aol_jax._src.training.mesh: the data mesh, the batch-size check and global batches, on the
8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from aol_jax import training


@pytest.mark.parametrize("n", [1, 3, 8])
def test_make_data_mesh_spans_the_first_n_devices_on_one_explicit_axis(n):
  mesh = training.make_data_mesh(n)
  assert mesh.axis_names == (training.DATA_AXIS,)
  assert list(mesh.devices.flat) == jax.devices()[:n]
  assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
  assert training.make_data_mesh().devices.size == jax.device_count()


@pytest.mark.parametrize("n", [0, -1, 9])
def test_make_data_mesh_refuses_a_device_count_it_does_not_have(n):
  with pytest.raises(ValueError, match=f"mesh of {n} devices, but 8 are available"):
    training.make_data_mesh(n)


@pytest.mark.parametrize("batch,suggestion", [(12, "8 or 16"), (3, "8"), (20, "16 or 24")])
def test_check_batch_size_names_the_nearest_multiples(batch, suggestion):
  mesh = training.make_data_mesh(8)
  with pytest.raises(ValueError, match=f"batch size {batch} is not divisible by the 8 devices"
                                       f".*e.g. {suggestion}"):
    training.check_batch_size(mesh, batch)
  training.check_batch_size(mesh, 16)
  training.check_batch_size(training.make_data_mesh(3), 12)


def test_global_batch_splits_the_rows_over_the_devices_in_order():
  mesh = training.make_data_mesh(8)
  images = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  labels = np.arange(16, dtype=np.int32)
  x, y = training.global_batch(mesh, images, labels)
  assert x.sharding == training.data_sharding(mesh) and x.sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(x), images)
  np.testing.assert_array_equal(np.asarray(y), labels)
  for shard in x.addressable_shards:
    i = jax.devices().index(shard.device)
    np.testing.assert_array_equal(np.asarray(shard.data), images[2 * i:2 * i + 2])


def test_global_batch_refuses_bad_batches():
  mesh = training.make_data_mesh(8)
  with pytest.raises(ValueError, match="leading"):
    training.global_batch(mesh, np.zeros((16, 2)), np.zeros((8,)))
  with pytest.raises(ValueError, match="at least one array"):
    training.global_batch(mesh)
  with pytest.raises(ValueError, match=r"global batch size 12 .* 8 devices.*multiple of 8"):
    training.global_batch(mesh, np.zeros((12, 2)))


def test_replicated_sharding_is_whole_on_every_device():
  mesh = training.make_data_mesh(4)
  x = jax.device_put(np.arange(6.0), training.replicated_sharding(mesh))
  assert len(x.addressable_shards) == 4
  assert all(np.asarray(s.data).shape == (6,) for s in x.addressable_shards)
