"""The reduced ablations of the test, derived from :mod:`.full`: digits only, fewer epochs,
two seeds, a shorter attack on part of the test set, each network on one device
(``--preset=small``; the README states its time)."""

import dataclasses

from experiments.ablations.configs import DIGITS, full


def get_config():
  return dataclasses.replace(
      full.get_config(),
      name="small",  # named in the tables
      datasets=("digits",),  # digits only
      # Half the epochs, a short attack. One device: under the test suite's 8 simulated CPU
      # devices, the run takes 112 s on one of them and 156 s sharded over the 8.
      recipes=(dataclasses.replace(DIGITS, epochs=20, pgd_steps=20, pgd_examples=180,
                                   power_iterations=50, num_devices=1),),
      seeds=(0, 1),  # two seeds: a spread, at two thirds of the cost
  )
