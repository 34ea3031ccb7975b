"""A tiny run for smoke tests: a 3-epoch, few-layer AOL net on a handful of CIFAR-format images.

The same code path as :mod:`.paper` (tfds CIFAR-10, augmentation, checkpoints,
certification) on a generated archive of a few images per batch file; it finishes in
seconds and reaches nothing in particular.
"""

import math

from experiments.cifar.configs import Config


def get_config() -> Config:
  return Config(
      dataset="cifar10",  # through the real tfds builder
      data_dir=None,  # the test passes its own
      manual_dir=None,  # tfds default, <data_dir>/downloads/manual
      download=False,  # never touch the network in a smoke test
      model="aol_small",  # the paper's family ...
      model_kwargs={"width": 4, "channels": 16, "conv_depth": 1, "dense_depth": 2},  # ... shrunk
      epochs=3,  # enough to checkpoint, resume and evaluate more than once
      batch_size=8,  # divisible by 1 and by 8 simulated devices
      learning_rate=1e-2,  # larger than the paper's, to move in few steps
      momentum=0.9,  # as the paper
      nesterov=True,  # as the paper
      weight_decay=5e-4,  # as the paper
      loss_offset=math.sqrt(2),  # as the paper
      loss_temperature=0.25,  # as the paper
      augment=True,  # exercise the on-device augmentation
      seed=0,  # fixed, so runs can be compared
      num_devices=None,  # every device
      checkpoint_every=1,  # a checkpoint per epoch, for the resume test
      max_to_keep=2,  # checkpoints kept on disk
      eval_every=1,  # a test evaluation per epoch
      eval_batch_size=8,  # divisible by 1 and by 8 simulated devices
      log_every=1,  # update the progress bar every step
  )
