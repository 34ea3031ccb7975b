"""scikit-learn's handwritten digits: a real end-to-end run in about a minute on a laptop CPU.

Offline (the data installs with scikit-learn)::

  python -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits

8x8 greyscale images (values 0..16 scaled to [0, 1]), 1437 for training and 360 for the
test, no augmentation. The README states what it reaches, on which machine, with the spread
across CPU instruction sets and seeds; ``tests/test_experiment_digits.py`` checks the
lower end.
"""

import math

from aol_jax.certification import DEFAULT_ROUNDING
from experiments.cifar.configs import Config


def get_config() -> Config:
  return Config(
      dataset="digits",  # 8x8x1, 10 classes, no download
      data_dir=None,  # unused: the data ships with scikit-learn
      manual_dir=None,  # unused
      download=False,  # unused
      model="aol_small",  # the paper's conv net family ...
      model_kwargs={"pool": 2, "channels": 32, "conv_depth": 2, "dense_depth": 4},  # ... sized for 8x8
      epochs=40,  # about a minute on a laptop CPU
      batch_size=64,  # 22 steps per epoch
      learning_rate=0.05,  # larger than the paper's for a short run
      momentum=0.9,  # as the paper
      nesterov=True,  # as the paper
      weight_decay=5e-4,  # as the paper
      loss_offset=math.sqrt(2),  # as the paper (target radius 1)
      loss_temperature=0.25,  # as the paper
      augment=False,  # flips and rotations change digits' meaning; none here
      seed=0,  # fixed: the README's row for seed 0
      num_devices=None,  # every device
      checkpoint_every=10,  # a checkpoint every 10 epochs and at the end
      max_to_keep=2,  # checkpoints kept on disk
      eval_every=5,  # test accuracy every 5 epochs
      eval_batch_size=120,  # 3 calls for the 360 test images
      log_every=11,  # twice per epoch
      mode="train",  # train, then certify the last epoch
      rounding=DEFAULT_ROUNDING,  # the library's default certificate
      gram_precision="default",  # the backend's default matmul precision for the Gram matrices
  )
