"""The experiment's configuration: one frozen dataclass, and one file per preset.

A preset file defines ``get_config() -> Config`` and sets every field, one comment each.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

PRESETS = ("paper", "digits", "tiny")


class ConfigError(ValueError):
  """A configuration that cannot run (unknown preset, model or dataset, bad sizes)."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on; plain data, saved with every checkpoint."""
  dataset: str = "cifar10"  # 'cifar10', 'cifar100' or 'digits'
  data_dir: str | None = None  # tfds data directory; None: ~/tensorflow_datasets
  manual_dir: str | None = None  # directory holding the original archive; None: <data_dir>/downloads/manual
  download: bool = True  # let tfds download the archive when it is not in manual_dir
  model: str = "aol_small"  # a key of aol_jax.models.MODELS
  model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # size overrides for the constructor
  epochs: int = 1000  # passes over the training set
  batch_size: int = 250  # global batch, split over all devices
  learning_rate: float = 1e-3  # peak learning rate, divided by 10 at 90%, 99%, 99.9% of the run
  momentum: float = 0.9  # SGD momentum
  nesterov: bool = True  # Nesterov momentum
  weight_decay: float = 5e-4  # l2 penalty on the raw kernels only
  loss_offset: float = math.sqrt(2)  # u of the offset cross-entropy
  loss_temperature: float = 0.25  # t of the offset cross-entropy
  augment: bool = True  # the paper's augmentation, on device inside the step
  seed: int = 0  # model init, data order and augmentation
  num_devices: int | None = None  # devices of the data mesh; None: all
  checkpoint_every: int = 10  # epochs between checkpoints (the last epoch is always saved)
  max_to_keep: int = 3  # checkpoints kept on disk
  eval_every: int = 10  # epochs between test-set evaluations in metrics.jsonl
  eval_batch_size: int = 500  # rows per evaluation / certification call
  log_every: int = 50  # steps between loss / accuracy updates of the progress bar


# Fields that fix the shapes of the saved state: a checkpoint only resumes under the same.
STATE_FIELDS = ("dataset", "model", "model_kwargs")


def get_config(preset: str, **overrides: Any) -> Config:
  """The preset's config with ``overrides`` (``None`` values are ignored) applied."""
  if preset not in PRESETS:
    raise ConfigError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
  config = importlib.import_module(f"{__name__}.{preset}").get_config()
  overrides = {k: v for k, v in overrides.items() if v is not None}
  unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
  if unknown:
    raise ConfigError(f"Unknown config fields: {sorted(unknown)}.")
  return dataclasses.replace(config, **overrides)
