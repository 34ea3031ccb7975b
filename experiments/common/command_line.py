"""The command line of every experiment, on absl flags and ml_collections ``config_flags``.

``--accelerator`` and ``--workdir``, a config file (``--preset=NAME`` stands for
``--config=<the configs package>/NAME.py``) whose fields are overridden with
``--config.<field>=<value>``, and short flags that each stand for one ``--config.<field>``.
Every flag takes ``--flag=value`` and ``--flag value`` (absl's own parsing). Every error is
one line that names the flag as it was typed.

:meth:`Program.parse` builds a fresh ``absl.flags.FlagValues`` for each call, so that the
parse is a plain function of ``argv`` (``config_flags`` defines one flag per override it sees
and cannot parse the same override twice into the global ``FLAGS``).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

ACCELERATORS = ("cpu", "gpu", "tpu")


class UsageError(ValueError):
  """A command line that cannot run; the message names the flag and says what to do."""


@dataclasses.dataclass(frozen=True)
class Parsed:
  """What a command line asks for."""
  accelerator: str
  workdir: str
  config: Any  # the config dataclass, every override applied
  typed: dict[str, str]  # {field: the override as typed, e.g. '--epochs=0'}


@dataclasses.dataclass(frozen=True)
class Program:
  """What differs between the experiments' command lines."""
  name: str  # the module run with ``python -m``, e.g. 'experiments.cifar'
  doc: str  # the entry point's docstring, printed by --help
  configs: types.ModuleType  # the package of the config dataclass and its preset files
  config_type: type  # what the presets' get_config() returns
  presets: tuple[str, ...]  # preset files in ``configs``
  define: Callable[[flags.FlagValues], None]  # defines the short flags, one per config field

  def preset_path(self, preset: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(self.configs.__file__)), f"{preset}.py")

  def _define_all(self, values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_enum("accelerator", None, list(ACCELERATORS), "where to run; the run stops "
                      "if JAX cannot use it (no fallback)", flag_values=values)
    flags.DEFINE_string("workdir", None, "where the run's files go (a local path or "
                        "gs://...)", flag_values=values)
    flags.DEFINE_enum("preset", None, list(self.presets), "a preset: the same as --config="
                      f"{os.path.relpath(self.preset_path('NAME'))}", flag_values=values)
    config_flags.DEFINE_config_file(
        "config", None, "a config file defining get_config(); override a field with "
        "--config.<field>=<value>", flag_values=values, sys_argv=argv)
    self.define(values)

  def parse(self, argv: Sequence[str]) -> Parsed:
    """Parse ``argv`` (without the program's name).

    Raises:
      UsageError: an unknown flag or config field, a value of the wrong type, a missing or
        doubled flag, a positional argument, or a config file that does not load.
    """
    argv = list(argv)
    preset_only = flags.FlagValues()
    flags.DEFINE_enum("preset", None, list(self.presets), "", flag_values=preset_only)
    try:
      argv = preset_only([self.name, *argv], known_only=True)[1:]
    except flags.Error as e:
      raise UsageError(_absl_message(e, preset_only)) from None
    config_given = False
    for i, arg in enumerate(argv):
      if re.match(r"^--?config(=|$)", arg):
        config_given = True
        path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
        if not os.path.isfile(path.split(":", 1)[0]):
          raise UsageError(f"--config={path}: no such file; pass a config file that defines "
                           f"get_config(), or --preset=NAME ({', '.join(self.presets)}).")
    if preset_only.preset and config_given:
      raise UsageError("--preset and --config both name a config file; give one of them.")
    if preset_only.preset:
      argv = [f"--config={self.preset_path(preset_only.preset)}", *argv]
    elif not config_given:
      raise UsageError(f"give --preset=NAME ({', '.join(self.presets)}) or --config=PATH.")
    argv, entries = self._dict_entries(argv)
    argv = [self.name, *argv]
    values = flags.FlagValues()
    self._define_all(values, argv)
    try:
      rest = values(argv)[1:]
    except (flags.Error, KeyError, ValueError, TypeError, AttributeError, OSError) as e:
      raise UsageError(_absl_message(e, values)) from None
    if rest:
      raise UsageError(f"unexpected argument {rest[0]!r}: every setting is a --flag (see "
                       f"python -m {self.name} --help).")
    for name in ("accelerator", "workdir"):
      if values[name].value is None:
        raise UsageError(f"--{name} is required.")
    try:
      config = values.config
    except Exception as e:  # noqa: BLE001  (config_flags defers a file's load errors to here)
      raise UsageError(f"--config: cannot load the config file: {_first_line(e)}") from None
    if not isinstance(config, self.config_type):
      raise UsageError(f"--config: get_config() returned {type(config).__name__}, not a "
                       f"{self.config_type.__name__}.")
    typed = _typed(argv[1:], values)
    short = {}
    for field in dataclasses.fields(self.config_type):
      if field.name in values and values[field.name].present:
        if f"config.{field.name}" in _flag_names(argv):
          raise UsageError(f"--{field.name} and --config.{field.name} both set {field.name}; "
                           f"give one of them.")
        value = values[field.name].value
        short[field.name] = tuple(value) if isinstance(value, list) else value
    for field, (flag, entry) in entries.items():
      typed[field] = flag
      short[field] = {**getattr(config, field), **entry}
    config = dataclasses.replace(config, **short) if short else config
    return Parsed(values.accelerator, values.workdir, config, typed)

  def _dict_entries(self, argv: list[str]) -> tuple[list[str], dict[str, tuple[str, dict]]]:
    """Check that every ``--config.<field>`` names a field, and take out the entries of dict
    fields, ``--config.<field>.<key>=<value>``, which config_flags cannot add to a dataclass
    field (a key the preset does not list). Returns the rest of ``argv`` and ``{field:
    (the last such flag as typed, {key: value})}``."""
    fields = {f.name: f for f in dataclasses.fields(self.config_type)}
    rest, entries, i = [], {}, 0
    while i < len(argv):
      arg = argv[i]
      match = re.match(r"^--config\.([^=.]+)(?:\.([^=]+))?(?:=(.*))?$", arg, flags=re.S)
      if not match:
        rest.append(arg)
        i += 1
        continue
      field, key, value = match.groups()
      if field not in fields:
        raise UsageError(f"{arg}: not a field of the config; the fields are "
                         f"{', '.join(fields)}.")
      if key is None or "dict" not in str(fields[field].type):
        rest.append(arg)
        i += 1
        continue
      if value is None and i + 1 < len(argv):
        value, i = argv[i + 1], i + 1
      if not key.isidentifier() or value is None:
        raise UsageError(f"{arg}: expected --config.{field}.NAME=VALUE.")
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass  # a string
      flag, entry = entries.get(field, ("", {}))
      entries[field] = (f"--config.{field}.{key}={value}", {**entry, key: value})
      i += 1
    return rest, entries

  def parse_or_exit(self, argv: Sequence[str]) -> Parsed:
    """:meth:`parse` of ``sys.argv``-like ``argv`` (program name first) for ``absl.app.run``:
    ``--help`` prints the help and exits 0, an error exits 1 with one line."""
    if {"--help", "-h", "--helpfull", "--helpshort"} & set(argv[1:]):
      print(self.help_text())
      sys.exit(0)
    try:
      parsed = self.parse(argv[1:])
    except UsageError as e:
      sys.exit(f"error: {e}")
    flags.FLAGS.mark_as_parsed()  # absl.app reads its own flags (their defaults) after this
    return parsed

  def help_text(self) -> str:
    """The docstring, the flags, and every config field with its default."""
    values = flags.FlagValues()
    self._define_all(values, [self.name])
    lines = [self.doc.strip(), "", values.get_help(), "", "Config fields "
             "(--config.<field>=<value>; the dataclass default in brackets):"]
    for field in dataclasses.fields(self.config_type):
      default = (field.default if field.default is not dataclasses.MISSING
                 else field.default_factory())
      kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__",
                                                                      str(field.type))
      lines.append(f"  --config.{field.name}: {kind} [{default!r}]")
    return "\n".join(lines)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().strip('"')
  return text.splitlines()[0] if text else type(e).__name__


def _flag_names(argv: Sequence[str]) -> list[str]:
  return [a.lstrip("-").split("=", 1)[0] for a in argv if a.startswith("-")]


def _typed(argv: Sequence[str], values: flags.FlagValues) -> dict[str, str]:
  """``{field: '--flag=value'}`` for every config field set on the command line."""
  typed = {}
  for i, arg in enumerate(argv):
    if not arg.startswith("--"):
      continue
    name, eq, value = arg[2:].partition("=")
    if not eq and name in values and not values[name].boolean and i + 1 < len(argv):
      value = argv[i + 1]
    field = name.split(".")[1] if name.startswith("config.") else name
    if name.startswith("config.") or (name in values and name not in
                                      ("accelerator", "workdir", "preset", "config")):
      typed[field] = f"--{name}={value}" if (eq or value) else f"--{name}"
  return typed


_EXPECTED = {flags.IntegerParser: "an integer", flags.FloatParser: "a number",
             flags.BooleanParser: "true or false"}


def _absl_message(e: Exception, values: flags.FlagValues) -> str:
  """absl's and config_flags' errors as ``--flag=value: what is wrong``."""
  if isinstance(e, flags.UnrecognizedFlagError):
    suggestions = getattr(e, "suggestions", None)
    hint = f" (did you mean --{', --'.join(suggestions)}?)" if suggestions else ""
    return f"--{e.flagname}: unknown flag{hint}; see --help for the flags."
  text = _first_line(e)
  match = re.match(r"flag --([\w.]+)=(.*?): (.*)$", text, flags=re.S)
  if isinstance(e, flags.IllegalFlagValueError) and match:
    name, value, why = match.groups()
    parser = values[name].parser if name in values else None
    if isinstance(parser, flags.EnumParser):
      why = f"must be one of {', '.join(parser.enum_values)}"
    elif type(parser) in _EXPECTED or "Non-boolean" in why:
      why = f"expected {_EXPECTED.get(type(parser), 'true or false')}"
    return f"--{name}={value}: {why}."
  if isinstance(e, flags.IllegalFlagValueError) or isinstance(e, flags.Error):
    return text.rstrip(".") + "."
  return f"cannot apply the config overrides: {text}."
