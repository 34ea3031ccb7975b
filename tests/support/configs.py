"""The experiments' presets for tests: a preset's config with fields replaced."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from experiments.cifar import configs


def get_config(preset: str, **overrides: Any) -> configs.Config:
  """``experiments/cifar/configs/<preset>.py``'s config with ``overrides`` (``None`` values
  are ignored) replaced."""
  if preset not in configs.PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(configs.PRESETS)}.")
  config = importlib.import_module(f"experiments.cifar.configs.{preset}").get_config()
  return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def preset_path(preset: str) -> str:
  """The file that ``--preset=<preset>`` stands for."""
  return importlib.import_module(f"experiments.cifar.configs.{preset}").__file__
