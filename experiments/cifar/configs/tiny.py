"""A tiny run for smoke tests, derived from :mod:`.paper` (big_vision's ``runlocal`` style).

The same code path as the paper's run (tfds CIFAR-10, augmentation, checkpoints,
certification), shrunk: a 3-epoch, few-layer AOL net, on a generated archive of a few
images per batch file in the tests. It finishes in seconds and reaches nothing in particular.
Only the fields that differ from the paper's recipe are set here.
"""

import dataclasses

from experiments.cifar.configs import Config, paper


def get_config() -> Config:
  return dataclasses.replace(
      paper.get_config(),
      download=False,  # never touch the network in a smoke test
      model_kwargs={"width": 4, "channels": 16, "conv_depth": 1, "dense_depth": 2},  # shrunk
      epochs=3,  # enough to checkpoint, resume and evaluate more than once
      batch_size=8,  # divisible by 1, 2, 4 and 8 devices
      learning_rate=1e-2,  # larger than the paper's, to move in few steps
      checkpoint_every=1,  # a checkpoint per epoch, for the resume test
      max_to_keep=2,  # checkpoints kept on disk
      eval_every=1,  # a test evaluation per epoch
      eval_batch_size=6,  # deliberately not a multiple of the device count: padded
      log_every=1,  # update the progress bar every step
  )
