"""Training and evaluation shared by the checks, on :mod:`aol_jax.training` and one device.

Every network, AOL or plain, is trained by :func:`train` with the same recipe: the paper's
SGD (Nesterov momentum 0.9, weight decay 5e-4 on the kernels, lr / 10 at 90 / 99 / 99.9%
of the steps), the offset cross-entropy, no augmentation, batches in a per-seed random order.
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

from aol_jax import training
from aol_jax import pgd_l2
from aol_jax import CertificationResult, certify_dataset
from aol_jax import freeze
from aol_jax import offset_cross_entropy
from aol_jax import MODELS, AOLNetwork
from experiments.ablations.configs import LossSetting, Recipe
from experiments.common import input_pipeline
from experiments.common.plain import plain_like
from experiments.common.input_pipeline import Dataset


def log(message: str) -> None:
  """A progress line on stderr (stdout carries the tables)."""
  print(message, file=sys.stderr, flush=True)


@functools.cache
def load(dataset: str) -> Dataset:
  """The dataset (:func:`experiments.common.input_pipeline.load`, once per process)."""
  return input_pipeline.load(dataset)


def train_inputs(data: Dataset) -> np.ndarray:
  """The training images as float32 in ``[0, 1]`` (digits are stored 0..16, MNIST 0..255)."""
  return data.train_images.astype(np.float32) / np.float32(data.max_value)


def build_model(recipe: Recipe, *, seed: int, plain: bool = False) -> nnx.Module:
  """``aol_small`` with the recipe's sizes for the dataset's images; plain if asked."""
  data = load(recipe.dataset)
  height, _, channels = data.train_images.shape[1:]
  model = MODELS["aol_small"](data.num_classes, image_size=height, in_channels=channels,
                              rngs=nnx.Rngs(seed), **recipe.sizes)
  return plain_like(model, seed=seed) if plain else model


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained network and how long training took."""
  model: nnx.Module
  seconds: float  # wall time of training, compilation included
  final_loss: float  # training loss of the last step


def train(recipe: Recipe, loss: LossSetting, *, seed: int, plain: bool = False) -> Trained:
  """Train ``build_model(recipe, seed=seed, plain=plain)`` with ``loss`` for recipe.epochs
  (peak lr ``recipe.plain_learning_rate`` for a plain net, else ``recipe.learning_rate``)."""
  start = time.perf_counter()
  data = load(recipe.dataset)
  images, labels = train_inputs(data), data.train_labels
  steps_per_epoch = len(images) // recipe.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {recipe.batch_size} exceeds the {len(images)} training "
                     f"images of {recipe.dataset}.")
  mesh = training.make_data_mesh(1)
  optimizer = training.make_optimizer(
      training.paper_schedule(recipe.plain_learning_rate if plain else recipe.learning_rate,
                              steps_per_epoch, recipe.epochs))
  model = build_model(recipe, seed=seed, plain=plain)
  graphdef, state = training.create_train_state(model, optimizer, key=seed, mesh=mesh)
  loss_fn = functools.partial(offset_cross_entropy, offset=loss.offset,
                              temperature=loss.temperature)
  step = training.make_train_step(graphdef, optimizer, mesh, loss_fn=loss_fn, augment=False)
  rng = np.random.default_rng(seed)
  metrics = None
  for epoch in range(recipe.epochs):
    order = rng.permutation(len(images))[:steps_per_epoch * recipe.batch_size]
    for batch in order.reshape(steps_per_epoch, recipe.batch_size):
      state, metrics = step(state, *training.global_batch(mesh, images[batch], labels[batch]))
    training.check_finite(metrics, step=(epoch + 1) * steps_per_epoch)
  final_loss = float(metrics["loss"])
  return Trained(training.merge_model(graphdef, state), time.perf_counter() - start,
                 final_loss)


train_once = functools.cache(train)
""":func:`train`, memoised per process: ``all`` trains each (recipe, loss, seed, kind) once."""


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
  return float(np.mean(_margins(np.asarray(logits), labels) > 0))


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


def _margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  true = np.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  other = np.where(np.eye(logits.shape[1], dtype=bool)[labels], -np.inf, logits).max(axis=1)
  return true - other


def timed(fn: Callable, *args, **kwargs):
  """``(fn(*args, **kwargs), seconds)``."""
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - start
