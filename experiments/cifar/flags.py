"""The command line of ``python -m experiments.cifar``: the experiments' one dialect
(:mod:`experiments.common.command_line`) with this runner's short flags.

The config is a preset file (``--preset=NAME`` or ``--config=PATH``) with any field
overridden as ``--config.<field>=<value>`` (ml_collections ``config_flags``, type-checked);
``--mode``, ``--rounding``, ``--model``, ``--dataset``, ``--epochs``, ``--batch_size``,
``--learning_rate``, ``--seed``, ``--data_dir``, ``--manual_dir`` and ``--download`` are
short forms of the same overrides.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

from absl import flags

from experiments.cifar import configs
from experiments.common import command_line
from experiments.common.command_line import UsageError

__all__ = ["PROGRAM", "UsageError", "parse_flags", "print_help"]

_KWARGS = "model_kwargs"


def _define(values: flags.FlagValues) -> None:
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


PROGRAM = command_line.Program(
    name="experiments.cifar", configs="experiments.cifar.configs", config_type=configs.Config,
    presets=configs.PRESETS,
    short_flags=("mode", "rounding", "model", "dataset", "epochs", "batch_size",
                 "learning_rate", "seed", "data_dir", "manual_dir", "download"),
    define=_define)


def parse_flags(argv: Sequence[str]) -> tuple[flags.FlagValues, configs.Config, dict[str, str]]:
  """:func:`experiments.common.command_line.parse`, and ``--config.model_kwargs.KEY=VALUE``
  for keys the preset does not list (config_flags only overrides existing ones; the model's
  constructor checks them)."""
  argv = list(argv)
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
  values, config, set_by = command_line.parse(PROGRAM, argv)
  if model_kwargs:
    config.model_kwargs = {**config.model_kwargs, **model_kwargs}
    set_by[_KWARGS] = f"--config.{_KWARGS}"
  return values, config, set_by


def print_help() -> None:
  """The flags and every config field with the paper preset's value."""
  print(command_line.help_text(PROGRAM))
