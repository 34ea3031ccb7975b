"""Test helpers: a small archive in CIFAR-10's own binary format, and its checksum for tfds.

The layout is that of ``cifar-10-binary.tar.gz``: ``cifar-10-batches-bin/`` holding
``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin`` and ``batches.meta.txt``;
each record is 1 label byte followed by 3072 image bytes (R, G, B planes of 32x32).
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))


def write_cifar10_archive(directory: str, *, per_file: int = 8, seed: int = 0
                          ) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Write ``<directory>/cifar-10-binary.tar.gz`` with ``per_file`` random images per file.

  Returns:
    The archive's path and, per split, ``(images (n, 32, 32, 3) uint8, labels (n,))`` in
    file order, decoded independently of tfds.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "cifar-10-binary.tar.gz")
  splits = {"train": [], "test": []}
  with tarfile.open(path, "w:gz") as tar:
    def add(name: str, data: bytes) -> None:
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))

    for name in TRAIN_FILES + ("test_batch.bin",):
      labels = rng.integers(0, 10, per_file, dtype=np.uint8)
      planes = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
      records = np.concatenate([labels[:, None], planes.reshape(per_file, -1)], axis=1)
      add(name, records.tobytes())
      splits["test" if name == "test_batch.bin" else "train"].append(
          (planes.transpose(0, 2, 3, 1), labels.astype(np.int32)))
    add("batches.meta.txt", ("\n".join(CIFAR10_CLASSES) + "\n\n").encode())
  return path, {k: (np.concatenate([i for i, _ in v]), np.concatenate([l for _, l in v]))
                for k, v in splits.items()}


def accept_archive(monkeypatch, archive: str) -> None:
  """Make tfds' CIFAR-10 builder expect ``archive``'s size and sha256 (this test only).

  tfds checks a manually provided archive against the checksum it ships for the real one;
  a generated archive needs its own. ``monkeypatch`` undoes this after the test.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download import checksums

  info = checksums.compute_url_info(archive)
  monkeypatch.setattr(tfds.builder_cls("cifar10"), "url_infos", {CIFAR10_URL: checksums.UrlInfo(
      size=info.size, checksum=info.checksum, filename="cifar-10-binary.tar.gz")})


def prepare_cifar10(directory, *, per_file: int = 8) -> str:
  """Write an archive under ``directory/manual`` and prepare it with tfds into
  ``directory/data`` (the runner's own ``prepare_tfds``); returns that data dir."""
  import pytest

  from experiments.common import input_pipeline

  directory = str(directory)
  archive, _ = write_cifar10_archive(os.path.join(directory, "manual"), per_file=per_file)
  with pytest.MonkeyPatch.context() as mp:
    accept_archive(mp, archive)
    input_pipeline.prepare_tfds("cifar10", data_dir=os.path.join(directory, "data"),
                                manual_dir=os.path.join(directory, "manual"), download=False)
  return os.path.join(directory, "data")
