"""Experiments built on :mod:`aol_jax`; the library never imports from here.

* :mod:`experiments.cifar`: the runner, ``python -m experiments.cifar``;
* :mod:`experiments.ablations`: ``python -m experiments.ablations``;
* :mod:`experiments.common`: command line, signals, datasets, storage, plots shared by both;
* :mod:`experiments.digits_spread`: the README's table over seeds and CPU instruction sets;
* :mod:`experiments.local_gcs`: a local GCS server for trying ``gs://`` workdirs.
"""

from __future__ import annotations


def load(workdir: str):
  """``(model, config)``: the model of the newest verified checkpoint in ``workdir`` (local
  or ``gs://``) and the config it was trained with, for notebooks::

    import experiments, aol_jax
    model, config = experiments.load("runs/digits")
    logits = model(images)   # images (n, H, W, C) in [0, 1]

  See :func:`experiments.cifar.train.load`.
  """
  from experiments.cifar import train  # imports jax: only when called
  return train.load(workdir)
