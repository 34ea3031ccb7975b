"""The full ablations: the README's tables.

``python -m experiments.ablations --accelerator=cpu --workdir=runs/ablations`` (all three
checks; ``--check=offset`` etc. for one). Wall times on 2 shared CPU cores are in the README.
"""

from experiments.ablations.configs import DIGITS, MNIST5K, AblationConfig


def get_config() -> AblationConfig:
  return AblationConfig(
      name="full",  # named in the tables
      check="all",  # the three checks, each network trained once
      datasets=("digits", "mnist5k"),  # both recipes, digits first
      recipes=(DIGITS, MNIST5K),  # the recipes of configs/__init__.py
      seeds=(0, 1, 2),  # three seeds for the offset/temperature spread
      seed=0,  # the orthogonality and AOL-vs-plain checks' seed
  )
