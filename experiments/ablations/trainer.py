"""Training and evaluation shared by the checks, through the runner's own steps.

Every network, AOL or plain, is one run of :mod:`experiments.cifar.train` (:func:`fit`): the
runner's data order, optimiser (the paper's SGD: Nesterov momentum 0.9, weight decay 5e-4 on
the kernels, lr / 10 at 90 / 99 / 99.9% of the steps), offset cross-entropy and
checkpoints, no augmentation. Each run has its own workdir under ``<workdir>/runs/``, so a
rerun of the same command resumes where it stopped and a finished run is only restored; a
signal stops a run after its epoch, with a checkpoint (:class:`Stopped`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aol_jax import CertificationResult, certify_dataset, freeze, margins, pgd_l2, training
from aol_jax.certification import DEFAULT_ROUNDING
from aol_jax import AOLNetwork
from experiments.ablations.configs import LossSetting, Recipe
from experiments.cifar import train
from experiments.cifar.configs import Config
from experiments.common import input_pipeline, storage
from experiments.common.input_pipeline import Dataset
from experiments.common.plain import plain_like

CHECKPOINT_EVERY = 5  # epochs between the checkpoints of a run


class Stopped(Exception):
  """A signal stopped a run after an epoch, with a checkpoint; rerun to resume."""

  def __init__(self, signum: int):
    super().__init__(f"stopped by signal {signum}")
    self.signum = signum


def log(message: str) -> None:
  """A progress line on stderr (stdout carries the tables)."""
  print(message, file=sys.stderr, flush=True)


def eta(start: float, done: int, total: int) -> str:
  """``ETA 3m05s`` for the ``total - done`` runs left, at the mean time of the done ones."""
  if not done:
    return "ETA after the first run"
  seconds = (time.perf_counter() - start) / done * (total - done)
  return f"ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"


@functools.cache
def load(dataset: str) -> Dataset:
  """The dataset (:func:`experiments.common.input_pipeline.load`, once per process)."""
  return input_pipeline.load(dataset)


def config_for(recipe: Recipe, loss: LossSetting, *, seed: int, plain: bool = False) -> Config:
  """The runner's config of one training: the recipe, ``loss``, ``seed``; the plain net's
  peak learning rate for a plain one."""
  return Config(
      dataset=recipe.dataset, data_dir=None, manual_dir=None, download=False,
      model="aol_small", model_kwargs=recipe.sizes, epochs=recipe.epochs,
      batch_size=recipe.batch_size,
      learning_rate=recipe.plain_learning_rate if plain else recipe.learning_rate,
      momentum=0.9, nesterov=True, weight_decay=5e-4, loss_offset=loss.offset,
      loss_temperature=loss.temperature, augment=False, seed=seed,
      num_devices=recipe.num_devices,
      checkpoint_every=CHECKPOINT_EVERY, max_to_keep=1, eval_every=recipe.epochs,
      eval_batch_size=recipe.eval_batch_size, log_every=10, mode="train",
      rounding=DEFAULT_ROUNDING, gram_precision="default")


def build_plain(config: Config, num_classes: int, image_shape: tuple[int, ...]) -> nnx.Module:
  """The runner's model with plain ``nnx.Conv`` / ``nnx.Linear`` in place of the AOL layers."""
  return plain_like(train.build_model(config, num_classes, image_shape), seed=config.seed)


def initial_model(recipe: Recipe, loss: LossSetting, *, seed: int) -> nnx.Module:
  """The AOL network :func:`fit` starts from (the runner's :func:`train.build_model`)."""
  data = load(recipe.dataset)
  return train.build_model(config_for(recipe, loss, seed=seed), data.num_classes,
                           data.test_images.shape[1:])


def _test_accuracy(run: train.Run) -> dict[str, float]:
  """The evaluation of an ablation run: test accuracy only (a plain net has no certificate;
  the checks certify the final AOL nets themselves)."""
  start = time.perf_counter()
  accuracy = clean_accuracy(run.model(), run.data.test_inputs(), run.data.test_labels)
  return {"test_accuracy": accuracy, "eval_seconds": round(time.perf_counter() - start, 3)}


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained network and what its training took."""
  model: nnx.Module
  seconds: float  # training time summed over its epochs (compilation included)
  final_loss: float  # mean training loss of the last epoch


def run_name(recipe: Recipe, loss: LossSetting, *, seed: int, plain: bool) -> str:
  """The run's folder under ``<workdir>/runs/``."""
  setting = "".join(c if c.isalnum() else "_" for c in loss.name).strip("_")
  return f"{recipe.dataset}-{setting}-seed{seed}-{'plain' if plain else 'aol'}"


@functools.cache
def fit(recipe: Recipe, loss: LossSetting, *, seed: int, workdir: str,
        plain: bool = False) -> Trained:
  """Train (or resume, or only restore a finished run) one network in
  ``<workdir>/runs/<run_name>``; memoised, so ``--check=all`` trains each network once.

  Raises:
    Stopped: a signal stopped the run after an epoch (its checkpoint is written).
  """
  config = config_for(recipe, loss, seed=seed, plain=plain)
  directory = storage.join(workdir, "runs", run_name(recipe, loss, seed=seed, plain=plain))
  run = train.setup(config, directory, build=build_plain if plain else train.build_model)
  try:
    train.restore(run)
    stopped = train.train(run, evaluate=_test_accuracy)
  finally:
    run.checkpointer.close()
  if stopped is not None:
    raise Stopped(stopped)
  # The checks evaluate the network in plain jax.jit calls: its arrays on one device, not
  # replicated over the training mesh.
  state = jax.device_put(jax.device_get(run.state), jax.devices()[0])
  return Trained(training.merge_model(run.graphdef, state),
                 sum(r["train_seconds"] for r in run.history), run.history[-1]["train_loss"])


def certify(model: AOLNetwork, recipe: Recipe) -> CertificationResult:
  """Clean accuracy and certified robust accuracy on the whole test set at recipe.radii."""
  data = load(recipe.dataset)
  return certify_dataset(model, data.test_inputs(), data.test_labels,
                         eps_list=recipe.radii, batch_size=recipe.eval_batch_size)


def attack_subset(recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
  """The test images (in ``[0, 1]``) and labels that check 3 attacks: the first
  ``recipe.pgd_examples`` of the test set, or all of it."""
  data = load(recipe.dataset)
  n = len(data.test_labels) if recipe.pgd_examples is None else recipe.pgd_examples
  return data.test_inputs()[:n], data.test_labels[:n]


def clean_accuracy(model: nnx.Module, images: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of ``images`` whose true class has the strictly largest logit."""
  logits = _logits(*nnx.split(model), jnp.asarray(images))
  return float(jnp.mean(margins(logits, labels) > 0))


def empirical_robust_accuracy(model: nnx.Module, images: np.ndarray, labels: np.ndarray,
                              radii: Sequence[float], *, steps: int) -> tuple[float, ...]:
  """Per radius, the fraction of examples that ``pgd_l2`` (``steps`` steps of 0.1 eps,
  from the clean image, kept in ``[0, 1]``) does not push to a margin <= 0. An upper
  bound on the true robust accuracy; for an AOL net, never below its certified accuracy."""
  out = []
  for eps in radii:
    _, margin = pgd_l2(model, images, labels, eps, steps=steps, step_size=0.1, clip=(0.0, 1.0))
    out.append(float(np.mean(np.asarray(margin) > 0)))
  return tuple(out)


def fast_copy(model: nnx.Module) -> nnx.Module:
  """The model to evaluate and attack: AOL nets frozen (rescaled once), plain ones as is."""
  return freeze(model) if isinstance(model, AOLNetwork) else model


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def timed(fn: Callable, *args, **kwargs):
  """``(fn(*args, **kwargs), seconds)``."""
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - start
