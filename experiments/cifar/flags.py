"""The command line of ``python -m experiments.cifar``: flags, the config they build, help.

The config is a preset file (``--preset=NAME`` or ``--config=PATH``) with any field
overridden as ``--config.<field>=<value>`` (ml_collections ``config_flags``, type-checked);
``--mode``, ``--rounding``, ``--model``, ``--dataset``, ``--epochs``, ``--batch_size``,
``--learning_rate``, ``--seed``, ``--data_dir``, ``--manual_dir`` and ``--download`` are
short forms of the same overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from experiments.cifar import configs

_BACKENDS = {"cpu": "cpu", "gpu": "gpu", "tpu": "tpu"}
# The short flags of earlier versions: each sets the config field of the same name.
_KWARGS = "model_kwargs"
SHORT_FLAGS = ("mode", "rounding", "model", "dataset", "epochs", "batch_size", "learning_rate", "seed", "data_dir",
               "manual_dir", "download")


class UsageError(ValueError):
  """A command line that cannot run; the message names the flag and says what to do."""


def _define(values: flags.FlagValues, argv: list[str]) -> None:
  flags.DEFINE_enum("accelerator", None, sorted(_BACKENDS), "where to run; the run stops if "
                    "JAX cannot use it (no fallback)", flag_values=values)
  flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, results.md, plots (a local "
                      "path or gs://...); reuse to resume", flag_values=values)
  flags.DEFINE_enum("preset", None, list(configs.PRESETS), "a preset of configs/ (default "
                    "paper); the same as --config=experiments/cifar/configs/<preset>.py",
                    flag_values=values)
  config_flags.DEFINE_config_file("config", None, "a config file defining get_config(); "
                                  "override any field with --config.<field>=<value>",
                                  flag_values=values, sys_argv=argv)
  flags.DEFINE_enum("mode", None, list(configs.MODES), "short for --config.mode: train (then "
                    "certify), certify (the newest checkpoint) or export", flag_values=values)
  flags.DEFINE_enum("rounding", None, list(configs.ROUNDINGS), "short for --config.rounding",
                    flag_values=values)
  flags.DEFINE_string("model", None, "short for --config.model", flag_values=values)
  flags.DEFINE_string("dataset", None, "short for --config.dataset", flag_values=values)
  flags.DEFINE_integer("epochs", None, "short for --config.epochs", flag_values=values)
  flags.DEFINE_integer("batch_size", None, "short for --config.batch_size (global batch, "
                       "divisible by the devices)", flag_values=values)
  flags.DEFINE_float("learning_rate", None, "short for --config.learning_rate",
                     flag_values=values)
  flags.DEFINE_integer("seed", None, "short for --config.seed", flag_values=values)
  flags.DEFINE_string("data_dir", None, "short for --config.data_dir", flag_values=values)
  flags.DEFINE_string("manual_dir", None, "short for --config.manual_dir", flag_values=values)
  flags.DEFINE_boolean("download", None, "short for --config.download", flag_values=values)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def parse_flags(argv: Sequence[str]) -> tuple[flags.FlagValues, configs.Config, dict[str, str]]:
  """Parse ``argv`` (without the program name).

  Returns:
    The flag values, the config with every override applied, and ``{field: flag}``, the flag
    that set each overridden field (to name it in errors).

  Raises:
    UsageError: an unknown flag or config field, a value of the wrong type, a missing
      required flag, or a config file that does not load.
  """
  argv = list(argv)
  # --config.model_kwargs.KEY=VALUE may add a key the preset does not list (config_flags only
  # overrides existing ones): taken out here, applied below; the model's constructor checks it.
  model_kwargs = {}
  for arg in [a for a in argv if a.startswith(f"--config.{_KWARGS}.")]:
    key, _, text = arg[len(f"--config.{_KWARGS}."):].partition("=")
    if not key.isidentifier() or not text:
      raise UsageError(f"{arg}: expected --config.{_KWARGS}.NAME=VALUE.")
    try:
      model_kwargs[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      model_kwargs[key] = text
    argv.remove(arg)
  config_given = any(a == "--config" or a.startswith("--config=") for a in argv)
  for path in [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]:
    if not os.path.isfile(path.split(":", 1)[0]):
      raise UsageError(f"--config={path}: no such file; pass a config file that defines "
                       f"get_config(), or --preset=NAME ({', '.join(configs.PRESETS)}).")
  preset = [a.split("=", 1)[1] for a in argv if a.startswith("--preset=")]
  if config_given and preset:
    raise UsageError("--preset and --config both name a config file; give one of them.")
  if not config_given:
    name = preset[-1] if preset else "paper"
    if name not in configs.PRESETS:
      raise UsageError(f"--preset={name}: unknown preset; choose one of "
                       f"{', '.join(configs.PRESETS)}.")
    argv = [f"--config={configs.preset_path(name)}", *argv]
  argv = ["experiments.cifar", *argv]
  values = flags.FlagValues()
  _define(values, argv)
  try:
    values(argv)
  except (flags.Error, KeyError, ValueError, TypeError, AttributeError) as e:
    message = _first_line(e)
    if isinstance(e, KeyError):  # config_flags' word for an unknown field or dict key
      message = f"unknown config field ({e.args[0]}); the fields are " + ", ".join(
          f.name for f in dataclasses.fields(configs.Config))
    raise UsageError(message) from None
  for name in ("accelerator", "workdir"):
    if values[name].value is None:
      raise UsageError(f"--{name} is required.")
  try:
    config = values.config
    if not isinstance(config, configs.Config):
      raise TypeError(f"get_config() returned {type(config).__name__}, not a Config")
  except Exception as e:  # config_flags defers a config file's load errors to first use
    raise UsageError(f"--config: cannot load the config file: {_first_line(e)}") from None
  set_by = {a.split("=", 1)[0][len("--config."):]: a.split("=", 1)[0]
            for a in argv if a.startswith("--config.")}
  if model_kwargs:
    config.model_kwargs = {**config.model_kwargs, **model_kwargs}
    set_by[_KWARGS] = f"--config.{_KWARGS}"
  for name in SHORT_FLAGS:
    value = values[name].value
    if value is None:
      continue
    if name in set_by:
      raise UsageError(f"--{name} and {set_by[name]} both set {name}; give one of them.")
    setattr(config, name, value)
    set_by[name] = f"--{name}"
  return values, config, set_by


def print_help() -> None:
  """The flags and every config field with the paper preset's value."""
  values = flags.FlagValues()
  _define(values, ["experiments.cifar"])
  print(values.get_help())
  paper = configs.get_config("paper")
  print("\nConfig fields (--config.<field>=<value>; the paper preset's value in brackets):")
  for field in dataclasses.fields(configs.Config):
    kind = getattr(field.type, "__name__", None) if isinstance(field.type, type) else None
    print(f"  --config.{field.name}: {kind or field.type} [{getattr(paper, field.name)!r}]")
