"""experiments.common.input_pipeline: digits, CIFAR through the real tfds builder, batches."""

import os

import numpy as np
import pytest

from aol_jax import training
from support.cifar_archive import accept_archive, write_cifar10_archive
from experiments.common import input_pipeline


def test_digits_split_is_fixed_stratified_and_disjoint():
  d = input_pipeline.load_digits()
  assert d.train_images.shape == (1437, 8, 8, 1) and d.test_images.shape == (360, 8, 8, 1)
  assert d.train_images.dtype == np.uint8 and d.train_images.max() == 16 and d.max_value == 16
  assert np.bincount(d.test_labels, minlength=10).min() >= 35
  train = {x.tobytes() + bytes([y]) for x, y in zip(d.train_images, d.train_labels)}
  assert not any(x.tobytes() + bytes([y]) in train for x, y in zip(d.test_images, d.test_labels))
  again = input_pipeline.load_digits()
  np.testing.assert_array_equal(again.test_images, d.test_images)
  assert 0 <= d.test_inputs().min() and d.test_inputs().max() == 1.0


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_the_registry_states_what_the_loader_loads(name):
  spec = input_pipeline.DATASETS[name]
  d = input_pipeline.load(name, data_dir="/never/read", download=False)
  assert d.test_images.shape[1:] == d.train_images.shape[1:] == spec.image_shape
  assert d.num_classes == spec.num_classes == len(np.unique(d.train_labels))
  assert len(d.train_labels) == spec.num_train == input_pipeline.num_train_examples(name)


def test_an_unknown_dataset_is_refused_with_the_registry_names():
  for call in (input_pipeline.load, input_pipeline.num_train_examples, input_pipeline.spec):
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'; choose one of cifar10, "
                                         "cifar100, digits, mnist5k"):
      call("mnist")


def test_process_shares_are_equal_disjoint_and_cover_all_but_the_remainder():
  shares = [input_pipeline.process_share(11, p, 3) for p in range(3)]
  assert {len(s) for s in shares} == {3}
  assert len(set(np.concatenate(shares))) == 9


def _digits_batches(num_devices: int, on_device: bool, batch: int = 64, seed: int = 3):
  order = input_pipeline.DataOrder(1437, batch, seed)
  d = input_pipeline.load_digits(train_indices=lambda n: order.share(0, 1))
  mesh = training.make_data_mesh(num_devices)
  return input_pipeline.TrainBatches(mesh, d.train_images, d.train_labels, max_value=16.0,
                                     order=order, on_device=on_device), d


@pytest.mark.parametrize("num_devices,on_device", [(1, False), (8, True), (8, False)])
def test_batches_are_the_same_on_device_or_host_on_1_or_8_devices(num_devices, on_device):
  reference, d = _digits_batches(1, True)
  batches, _ = _digits_batches(num_devices, on_device)
  order = batches.epoch_order(epoch=2)
  np.testing.assert_array_equal(order, reference.epoch_order(epoch=2))
  images, labels = batches.batch(order[1])
  want_images, want_labels = reference.batch(order[1])
  assert images.dtype == np.float32 and images.sharding == training.data_sharding(batches.mesh)
  np.testing.assert_array_equal(np.asarray(images), np.asarray(want_images))
  np.testing.assert_array_equal(np.asarray(labels), np.asarray(want_labels))
  # An independent truth: the stored pixels / 16 and labels at those indices.
  np.testing.assert_array_equal(np.asarray(images), d.train_images[order[1]] / np.float32(16))
  np.testing.assert_array_equal(np.asarray(labels), d.train_labels[order[1]])


def test_epoch_order_uses_each_example_at_most_once_and_changes_with_the_epoch():
  order = input_pipeline.DataOrder(1437, 64, seed=0)
  share = order.share(0, 1)
  a, b = order.epoch_order(0), order.epoch_order(1)
  assert a.shape == (1437 // 64, 64) == (order.steps_per_epoch, 64)
  examples = share[a.ravel()]
  assert len(set(examples)) == a.size and not np.array_equal(a, b)
  np.testing.assert_array_equal(a, order.epoch_order(0))
  # Over epochs every example is drawn (the 29 that do not fit one epoch rotate).
  drawn = set(np.concatenate([share[order.epoch_order(e).ravel()] for e in range(20)]))
  assert drawn == set(range(1437))


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_global_batches_do_not_depend_on_the_process_count(processes):
  """Each process reads only its share (1/P of the examples, disjoint) and the global batch
  that the processes fill together is the one a single process draws."""
  order = input_pipeline.DataOrder(1000, 64, seed=5)
  single = order.share(0, 1)[order.epoch_order(3)]  # (steps, 64) example indices
  shares = [order.share(p, processes) for p in range(processes)]
  real = [set(s) for s in shares]
  assert all(len(s) == len(shares[0]) for s in shares)
  assert sum(len(s) for s in real) == 1000 and set().union(*real) == set(range(1000))
  together = np.concatenate([shares[p][order.epoch_order(3, p, processes)]
                             for p in range(processes)], axis=1)
  np.testing.assert_array_equal(together, single)


def test_batch_size_not_divisible_by_devices_is_refused():
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    _digits_batches(8, True, batch=60)


def test_cifar10_prepared_by_tfds_from_a_manual_archive(tmp_path, monkeypatch):
  archive, truth = write_cifar10_archive(str(tmp_path / "manual"), per_file=4)
  accept_archive(monkeypatch, archive)
  data_dir = str(tmp_path / "data")
  d = input_pipeline.load("cifar10", data_dir=data_dir, manual_dir=str(tmp_path / "manual"),
                          download=False)
  assert os.path.isdir(os.path.join(data_dir, "cifar10"))
  assert any(f.endswith("-of-00001") and "array_record" in f
             for f in os.listdir(os.path.join(data_dir, "cifar10", "3.0.2")))
  assert d.num_classes == 10 and d.max_value == 255.0
  # The registry's entry, known before loading, is what was loaded.
  spec = input_pipeline.DATASETS["cifar10"]
  assert (spec.image_shape, spec.num_classes) == (d.test_images.shape[1:], d.num_classes)
  assert input_pipeline.num_train_examples("cifar10", data_dir=data_dir) == len(d.train_labels)
  for split, images, labels in (("train", d.train_images, d.train_labels),
                                ("test", d.test_images, d.test_labels)):
    want_images, want_labels = truth[split]
    assert images.shape == want_images.shape and images.dtype == np.uint8
    # tfds stores the records in its own order; match them by content.
    want = {x.tobytes(): y for x, y in zip(want_images, want_labels)}
    assert {x.tobytes(): y for x, y in zip(images, labels)} == want


def test_cifar10_share_of_one_process_out_of_two(tmp_path, monkeypatch):
  archive, truth = write_cifar10_archive(str(tmp_path / "manual"), per_file=4)
  accept_archive(monkeypatch, archive)
  kwargs = dict(data_dir=str(tmp_path / "data"), manual_dir=str(tmp_path / "manual"),
                download=False, process_count=2)
  shares = [input_pipeline.load_cifar("cifar10", process_index=p, **kwargs) for p in (0, 1)]
  seen = [x.tobytes() for s in shares for x in s.train_images]
  assert len(seen) == 20 == len(set(seen))
  assert all(len(s.test_labels) == 4 for s in shares)


def test_a_wrong_archive_fails_tfds_checksum_check(tmp_path):
  # Without the test's own checksum, tfds compares against the real archive's and refuses.
  from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError
  write_cifar10_archive(str(tmp_path / "manual"), per_file=2)
  with pytest.raises(NonMatchingChecksumError):
    input_pipeline.prepare_tfds("cifar10", data_dir=str(tmp_path / "data"),
                                manual_dir=str(tmp_path / "manual"), download=False)


def test_missing_cifar_says_where_to_put_the_archive(tmp_path):
  with pytest.raises(input_pipeline.DataMissingError) as err:
    input_pipeline.prepare_tfds("cifar100", data_dir=str(tmp_path / "data"), download=False)
  message = str(err.value)
  assert "cifar-100-binary.tar.gz" in message
  assert os.path.join(str(tmp_path / "data"), "downloads", "manual") in message
  assert "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz" in message
