"""``python -m experiments.cifar --accelerator={cpu,gpu,tpu} --workdir=DIR [config flags]``.

The config is a preset file (``--preset=NAME`` or ``--config=PATH``) with any field
overridden as ``--config.<field>=<value>`` (ml_collections ``config_flags``, type-checked);
``--model``, ``--dataset``, ``--epochs``, ``--batch_size``, ``--learning_rate``, ``--seed``,
``--data_dir``, ``--manual_dir`` and ``--download`` are short forms of the same overrides.

Examples::

  python -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits
  python -m experiments.cifar --accelerator=gpu --preset=paper --workdir=runs/paper_cifar10
  python -m experiments.cifar --accelerator=tpu --config=experiments/cifar/configs/paper.py \\
      --config.batch_size=256 --config.eval_batch_size=512 --workdir=gs://BUCKET/paper
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from aol_jax import training
from experiments.cifar import configs, input_pipeline

_BACKENDS = {"cpu": "cpu", "gpu": "gpu", "tpu": "tpu"}
# The short flags of earlier versions: each sets the config field of the same name.
_KWARGS = "model_kwargs"
SHORT_FLAGS = ("model", "dataset", "epochs", "batch_size", "learning_rate", "seed", "data_dir",
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


def require_accelerator(name: str) -> None:
  """Exit at once, with the reason, unless JAX's default backend is ``name``.

  ``cpu`` restricts JAX to the CPU (a GPU machine may train on its CPU on request); ``gpu``
  and ``tpu`` must be what JAX picks by itself. Nothing ever falls back to another device.
  """
  if name == "cpu":
    jax.config.update("jax_platforms", "cpu")
  try:
    found = jax.default_backend()
  except RuntimeError as e:
    found, reason = None, str(e)
  else:
    reason = f"JAX's devices are {jax.devices()}"
  if found != _BACKENDS[name]:
    hint = {"gpu": "install jax with CUDA support (pip install -U 'jax[cuda12]') on a machine "
                   "with an NVIDIA GPU",
            "tpu": "run on a Cloud TPU VM with pip install -U 'jax[tpu]'",
            "cpu": "unset JAX_PLATFORMS"}[name]
    sys.exit(f"error: --accelerator={name} was requested but JAX cannot use a {name}: "
             f"{reason}. To fix: {hint}, or choose another --accelerator. Not falling back.")


def main(argv: Sequence[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--help" in argv or "-h" in argv or "--helpfull" in argv:
    values = flags.FlagValues()
    _define(values, ["experiments.cifar"])
    print(__doc__)
    print(values.get_help())
    paper = configs.get_config("paper")
    print("\nConfig fields (--config.<field>=<value>; the paper preset's value in brackets):")
    for field in dataclasses.fields(configs.Config):
      kind = getattr(field.type, "__name__", None) if isinstance(field.type, type) else None
      print(f"  --config.{field.name}: {kind or field.type} [{getattr(paper, field.name)!r}]")
    sys.exit(0)
  try:
    values, config, set_by = parse_flags(argv)
  except UsageError as e:
    sys.exit(f"error: {e}")
  training.maybe_initialize()
  require_accelerator(values.accelerator)
  from experiments.cifar import train  # after the backend is settled
  try:
    train.validate(config, values.workdir, flag_names=set_by)
    return train.train_and_evaluate(config, values.workdir)
  except (configs.ConfigError, input_pipeline.DataMissingError,
          training.NonFiniteLossError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
