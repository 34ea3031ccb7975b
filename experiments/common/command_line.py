"""The one command-line dialect of every experiment: ``--accelerator``, ``--workdir``, a config
file (``--preset=NAME`` or ``--config=PATH``) whose fields are overridden with
``--config.<field>=<value>`` (ml_collections ``config_flags``, type-checked), and a few short
flags, each standing for ``--config.<field>``. Every error is one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from experiments.common.accelerator import ACCELERATORS


class UsageError(ValueError):
  """A command line that cannot run; the message names the flag and says what to do."""


@dataclasses.dataclass(frozen=True)
class Program:
  """What differs between the experiments' command lines."""
  name: str  # the module run with ``python -m``, e.g. 'experiments.cifar'
  configs: str  # the package of the config dataclass and its preset files
  config_type: type  # the dataclass that get_config() returns
  presets: tuple[str, ...]  # preset files of the package, the first the default
  short_flags: tuple[str, ...]  # flags that each set the config field of the same name
  define: Callable[[flags.FlagValues], None]  # defines the short flags

  def preset_path(self, preset: str) -> str:
    """The file that ``--preset=<preset>`` stands for in ``--config``."""
    package = importlib.import_module(self.configs)
    return os.path.join(os.path.dirname(os.path.abspath(package.__file__)), f"{preset}.py")

  def define_all(self, values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_enum("accelerator", None, list(ACCELERATORS), "where to run; the run stops "
                      "if JAX cannot use it (no fallback)", flag_values=values)
    flags.DEFINE_string("workdir", None, "where the run's files go (a local path or "
                        "gs://...); checked writable before anything runs", flag_values=values)
    flags.DEFINE_enum("preset", None, list(self.presets), f"a preset (default "
                      f"{self.presets[0]}); the same as --config="
                      f"{self.configs.replace('.', '/')}/<preset>.py", flag_values=values)
    config_flags.DEFINE_config_file("config", None, "a config file defining get_config(); "
                                    "override any field with --config.<field>=<value>",
                                    flag_values=values, sys_argv=argv)
    self.define(values)


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (its type's name if it has none)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def field_names(config_type: type) -> str:
  return ", ".join(f.name for f in dataclasses.fields(config_type))


def parse(program: Program, argv: Sequence[str]) -> tuple[flags.FlagValues, Any,
                                                            dict[str, str]]:
  """Parse ``argv`` (without the program name).

  Returns:
    The flag values, the config with every override applied, and ``{field: flag}``, the flag
    that set each overridden field (to name it in errors).

  Raises:
    UsageError: an unknown flag or config field, a value of the wrong type, a missing
      required flag, a positional argument, or a config file that does not load.
  """
  argv = list(argv)
  presets = ", ".join(program.presets)
  config_given = any(a == "--config" or a.startswith("--config=") for a in argv)
  for path in [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]:
    if not os.path.isfile(path.split(":", 1)[0]):
      raise UsageError(f"--config={path}: no such file; pass a config file that defines "
                       f"get_config(), or --preset=NAME ({presets}).")
  preset = [a.split("=", 1)[1] for a in argv if a.startswith("--preset=")]
  if config_given and preset:
    raise UsageError("--preset and --config both name a config file; give one of them.")
  if not config_given:
    name = preset[-1] if preset else program.presets[0]
    if name not in program.presets:
      raise UsageError(f"--preset={name}: unknown preset; choose one of {presets}.")
    argv = [f"--config={program.preset_path(name)}", *argv]
  argv = [program.name, *argv]
  values = flags.FlagValues()
  program.define_all(values, argv)
  try:
    rest = values(argv)[1:]
  except (flags.Error, KeyError, ValueError, TypeError, AttributeError) as e:
    message = first_line(e)
    if isinstance(e, KeyError):  # config_flags' word for an unknown field or dict key
      message = (f"unknown config field ({e.args[0]}); the fields are "
                 f"{field_names(program.config_type)}")
    raise UsageError(message) from None
  if rest:
    raise UsageError(f"unexpected argument {rest[0]!r}: every setting is a --flag (see "
                     f"python -m {program.name} --help).")
  for name in ("accelerator", "workdir"):
    if values[name].value is None:
      raise UsageError(f"--{name} is required.")
  try:
    config = values.config
    if not isinstance(config, program.config_type):
      raise TypeError(f"get_config() returned {type(config).__name__}, not a "
                      f"{program.config_type.__name__}")
  except Exception as e:  # config_flags defers a config file's load errors to first use
    raise UsageError(f"--config: cannot load the config file: {first_line(e)}") from None
  set_by = {a.split("=", 1)[0][len("--config."):]: a.split("=", 1)[0]
            for a in argv if a.startswith("--config.")}
  for name in program.short_flags:
    value = values[name].value
    if value is None:
      continue
    if name in set_by:
      raise UsageError(f"--{name} and {set_by[name]} both set {name}; give one of them.")
    setattr(config, name, tuple(value) if isinstance(value, list) else value)
    set_by[name] = f"--{name}"
  return values, config, set_by


def help_text(program: Program) -> str:
  """The flags, and every config field with the default preset's value."""
  values = flags.FlagValues()
  program.define_all(values, [program.name])
  default = program.presets[0]
  config = importlib.import_module(f"{program.configs}.{default}").get_config()
  lines = [values.get_help(), "", f"Config fields (--config.<field>=<value>; the {default} "
           f"preset's value in brackets):"]
  for field in dataclasses.fields(program.config_type):
    kind = getattr(field.type, "__name__", None) if isinstance(field.type, type) else None
    lines.append(f"  --config.{field.name}: {kind or field.type} "
                 f"[{getattr(config, field.name)!r}]")
  return "\n".join(lines)


def error_line(field: str, value: Any, why: str, set_by: dict[str, str]) -> str:
  """``<flag>=<value>: <why>.``, naming the flag that set ``field`` (default
  ``--config.<field>``); a tuple's value is written as the comma list that sets it."""
  flag = set_by.get(field, f"--config.{field}")
  text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)
  return f"{flag}={text}: {why}."
