"""``python -m experiments.ablations --accelerator=cpu --workdir=DIR [config flags]``.

The runner's dialect (:mod:`experiments.common.command_line`): a preset (``--preset=full``,
the default, or ``small``) or ``--config=PATH``, any field overridden with
``--config.<field>=<value>``; ``--check`` and ``--datasets`` are short for
``--config.check`` and ``--config.datasets``. ``--accelerator`` is checked first (never a
fallback), then the config and ``--workdir``, before anything trains.

Examples::

  python -m experiments.ablations --accelerator=cpu --workdir=runs/ablations
  python -m experiments.ablations --accelerator=cpu --workdir=runs/ablations --check=offset
  python -m experiments.ablations --accelerator=cpu --workdir=/tmp/ablations --preset=small

Exit status: 0 when done, 1 with a one-line error.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from absl import flags

from experiments.ablations import aol_vs_plain, configs, offset_temperature, orthogonality
from experiments.ablations import trainer
from experiments.common import command_line, storage
from experiments.common.accelerator import require_accelerator

# What runs each of configs.CHECKS.
RUNS = {"offset": offset_temperature.run, "orthogonal": orthogonality.run,
        "plain": aol_vs_plain.run}


def _define(values: flags.FlagValues) -> None:
  flags.DEFINE_enum("check", None, [*configs.CHECKS, "all"], "short for --config.check: "
                    "offset (offset/temperature trade-off), orthogonal (per-layer norms and "
                    "distance from orthogonal), plain (AOL vs an unconstrained net) or all",
                    flag_values=values)
  flags.DEFINE_list("datasets", None, "short for --config.datasets: a comma list of the "
                    "config's recipes (digits, mnist5k)", flag_values=values)


PROGRAM = command_line.Program(
    name="experiments.ablations", configs="experiments.ablations.configs",
    config_type=configs.AblationConfig, presets=configs.PRESETS,
    short_flags=("check", "datasets"), define=_define)


def validate(config: configs.AblationConfig, workdir: str, set_by: dict[str, str]) -> None:
  """Exit with one line naming the flag if the config or the workdir cannot run."""
  for field, why in configs.field_errors(config).items():
    sys.exit("error: " + command_line.error_line(field, getattr(config, field), why, set_by))
  why = storage.workdir_error(workdir)
  if why:
    sys.exit(f"error: --workdir={workdir}: {why}; pass a directory this process can write.")


def main(argv: Sequence[str] | None = None) -> dict:
  """Parse ``argv`` (default ``sys.argv[1:]``), run the checks; their results by name."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if {"--help", "-h", "--helpfull"} & set(argv):
    print(__doc__)
    print(command_line.help_text(PROGRAM))
    sys.exit(0)
  try:
    values, config, set_by = command_line.parse(PROGRAM, argv)
  except command_line.UsageError as e:
    sys.exit(f"error: {e}")
  require_accelerator(values.accelerator)
  workdir = values.workdir
  validate(config, workdir, set_by)
  config = config.selected()
  results = {}
  for name in [c for c in configs.CHECKS if config.check in (c, "all")]:
    start = time.perf_counter()
    results[name] = RUNS[name](config, workdir)
    trainer.log(f"[{name}] done in {time.perf_counter() - start:.1f} s; files in {workdir}")
  return results
