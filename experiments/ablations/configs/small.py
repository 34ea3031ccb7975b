"""The reduced ablations of the test, derived from :mod:`.full`: digits only, fewer epochs,
two seeds, a shorter attack on part of the test set (``--preset=small``; the README states
its time)."""

import dataclasses

from experiments.ablations.configs import DIGITS, full


def get_config():
  return dataclasses.replace(
      full.get_config(),
      name="small",  # named in the tables
      datasets=("digits",),  # digits only
      recipes=(dataclasses.replace(DIGITS, epochs=20, pgd_steps=20, pgd_examples=180,
                                   power_iterations=50),),  # half the epochs, a short attack
      seeds=(0, 1),  # two seeds: a spread, at two thirds of the cost
  )
