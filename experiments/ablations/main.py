"""``python -m experiments.ablations --accelerator=cpu --workdir=DIR --preset=NAME``.

The runner's command line (:mod:`experiments.common.command_line`): a preset (``full`` or
``small``) or ``--config=PATH``, any field overridden with ``--config.<field>=<value>``;
``--check`` and ``--datasets`` stand for ``--config.check`` and ``--config.datasets``.
Every network trains as a run of the runner in ``DIR/runs/<name>``: a rerun of the same
command resumes, Ctrl-C or SIGTERM stops after the epoch with a checkpoint.

Examples::

  python -m experiments.ablations --accelerator=cpu --preset=full --workdir=runs/ablations
  python -m experiments.ablations --accelerator=cpu --preset full --check offset \\
      --workdir runs/ablations
  python -m experiments.ablations --accelerator=cpu --preset=small --workdir=/tmp/ablations

Exit status: 0 when done; 1 with a one-line error; 130 after Ctrl-C (SIGINT) and 143 after
SIGTERM.
"""

from __future__ import annotations

import time

from absl import app, flags

from experiments.ablations import aol_vs_plain, configs, offset_temperature, orthogonality
from experiments.ablations import trainer
from experiments.cifar.configs import ConfigError
from experiments.common import command_line, entry, signals, storage

# What runs each of configs.CHECKS.
RUNS = {"offset": offset_temperature.run, "orthogonal": orthogonality.run,
        "plain": aol_vs_plain.run}


def _define(values: flags.FlagValues) -> None:
  flags.DEFINE_enum("check", None, [*configs.CHECKS, "all"], "offset (offset/temperature "
                    "trade-off), orthogonal (per-layer norms and distance from orthogonal), "
                    "plain (AOL vs an unconstrained net) or all", flag_values=values)
  flags.DEFINE_list("datasets", None, "a comma list of the config's recipes (digits, "
                    "mnist5k)", flag_values=values)


PROGRAM = command_line.Program(
    name="experiments.ablations", doc=__doc__, configs=configs,
    config_type=configs.AblationConfig, presets=configs.PRESETS, define=_define)


def validate(parsed: command_line.Parsed) -> configs.AblationConfig:
  """The config restricted to its datasets; one line naming the flag if it cannot run."""
  for field, why in configs.field_errors(parsed.config).items():
    value = getattr(parsed.config, field)
    text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)
    raise ConfigError(f"{parsed.typed.get(field, f'--config.{field}={text}')}: {why}.")
  why = storage.workdir_error(parsed.workdir)
  if why:
    raise ConfigError(f"--workdir={parsed.workdir}: {why}; pass a directory this process can "
                      f"write.")
  return parsed.config.selected()


def run_checks(config: configs.AblationConfig, workdir: str) -> dict:
  """Run the selected checks; their results by name."""
  results = {}
  for name in [c for c in configs.CHECKS if config.check in (c, "all")]:
    start = time.perf_counter()
    results[name] = RUNS[name](config, workdir)
    trainer.log(f"[{name}] done in {time.perf_counter() - start:.1f} s; files in {workdir}")
  return results


def main(parsed: command_line.Parsed) -> int:
  """Validate, run the checks; the exit status."""

  def work() -> int:
    config = validate(parsed)
    try:
      run_checks(config, parsed.workdir)
    except trainer.Stopped as e:
      trainer.log(f"Stopped; rerun the same command to resume from the checkpoints in "
                  f"{parsed.workdir}/runs.")
      return signals.status(e.signum)
    return 0

  return entry.run(parsed, work, errors=(ConfigError,))


if __name__ == "__main__":
  app.run(main, flags_parser=PROGRAM.parse_or_exit)
