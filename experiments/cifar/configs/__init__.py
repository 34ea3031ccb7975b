"""The experiment's configuration: one dataclass, one file per preset, and its checks.

A preset file defines ``get_config() -> Config``. ``paper`` and ``digits`` set every field,
one comment each; ``tiny`` and ``mnist5k`` derive from them (big_vision's ``runlocal``
convention) and set only what differs. On the command line a preset file is the value of
``--config`` (``--preset=NAME`` for short; ml_collections' ``config_flags``) and every field
can be overridden with ``--config.<field>=<value>``, type-checked;
``experiments.cifar.train.validate`` then checks ranges and paths before anything runs.
"""

# No "from __future__ import annotations": config_flags reads the field types as types.
import dataclasses
import math
import typing
from typing import Any

from etils import epath

import aol_jax
from aol_jax.certification import DEFAULT_ROUNDING

PRESETS = ("paper", "digits", "tiny", "mnist5k")


class ConfigError(ValueError):
  """A configuration that cannot run (unknown preset, model or dataset, bad sizes)."""


@dataclasses.dataclass
class Config:
  """Everything a run depends on; plain data, saved with every checkpoint.

  Not frozen so that ``config_flags`` can apply ``--config.<field>`` overrides while it
  parses; after that an instance is a value, never changed (derive with
  ``dataclasses.replace``).
  """
  dataset: str = "cifar10"  # 'cifar10', 'cifar100', 'digits' or 'mnist5k'
  data_dir: str | None = None  # tfds data directory (local or gs://); None: ~/tensorflow_datasets
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
  eval_batch_size: int = 500  # rows per evaluation / certification call (any size, padded)
  log_every: int = 50  # steps between loss / accuracy updates of the progress bar
  mode: str = "train"  # 'train' (then certify), 'certify' (the newest checkpoint) or 'export'
  rounding: str = DEFAULT_ROUNDING  # the certificate's rounding mode: a key of aol_jax.ROUNDING_MODES
  gram_precision: str = "default"  # matmul precision of the AOL Gram matrices: one of GRAM_PRECISIONS


MODES = ("train", "certify", "export")
# The certificates a run can report: the library's table of rounding modes.
ROUNDINGS = tuple(aol_jax.ROUNDING_MODES)
# The values of AOLDense / AOLConv's gram_precision: the library's table.
GRAM_PRECISIONS = tuple(aol_jax.GRAM_PRECISIONS)
# Fields that only select what a run does or how it reports: never a reason to refuse a resume.
RUN_FIELDS = ("data_dir", "manual_dir", "download", "log_every", "mode", "rounding")
# Fields that fix the steps of an epoch: a checkpoint's step counts only under the same.
EPOCH_FIELDS = ("batch_size",)

# Fields that fix the shapes of the saved state: a checkpoint only resumes under the same.
STATE_FIELDS = ("dataset", "model", "model_kwargs")

# Lower bounds of the integer and float fields (``None`` allowed where the type says so).
_AT_LEAST = {"epochs": 1, "batch_size": 1, "checkpoint_every": 1, "max_to_keep": 1,
             "eval_every": 1, "eval_batch_size": 1, "log_every": 1, "num_devices": 1,
             "seed": 0, "weight_decay": 0.0, "loss_offset": 0.0}
_POSITIVE = ("learning_rate", "loss_temperature")


def _type_ok(value: Any, hint: Any) -> bool:
  origin = typing.get_origin(hint)
  if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
    return any(_type_ok(value, h) for h in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if origin is dict:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, hint)


def field_errors(config: Config) -> dict[str, str]:
  """``{field: what is wrong}`` for types and ranges (no devices, files or data needed)."""
  errors = {}
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    value = getattr(config, field.name)
    if not _type_ok(value, hints[field.name]):
      errors[field.name] = f"has type {type(value).__name__}, expected {hints[field.name]}"
  unknown = sorted(set(vars(config)) - set(hints))
  for name in unknown:
    errors[name] = "is not a field of the config"
  for name, low in _AT_LEAST.items():
    value = getattr(config, name)
    if name not in errors and value is not None and not value >= low:
      errors[name] = f"must be >= {low}, got {value!r}"
  for name in _POSITIVE:
    value = getattr(config, name)
    if name not in errors and not (math.isfinite(value) and value > 0):
      errors[name] = f"must be a finite number > 0, got {value!r}"
  for name, choices in (("mode", MODES), ("rounding", ROUNDINGS),
                        ("gram_precision", GRAM_PRECISIONS)):
    if name not in errors and getattr(config, name) not in choices:
      errors[name] = f"must be one of {', '.join(choices)}, got {getattr(config, name)!r}"
  if ("rounding" not in errors and "mode" not in errors and config.mode == "export"
      and not aol_jax.ROUNDING_MODES[config.rounding].exportable):
    exportable = [k for k, m in aol_jax.ROUNDING_MODES.items() if m.exportable]
    errors["rounding"] = (f"{config.rounding!r} cannot be exported (the artifact runs a "
                          f"float32 evaluation, which it does not certify); with --mode=export "
                          f"use one of {', '.join(exportable)}")
  if "momentum" not in errors and not 0 <= config.momentum < 1:
    errors["momentum"] = f"must be in [0, 1), got {config.momentum!r}"
  return errors


def path_error(path: str | None) -> str | None:
  """Why ``path`` cannot be a directory to read or write (it names a file), or None."""
  if path is None:
    return None
  p = epath.Path(path)
  if p.exists() and not p.is_dir():
    return f"names an existing file, {path}, not a directory"
  return None
