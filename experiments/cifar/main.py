"""``python -m experiments.cifar --accelerator={cpu,gpu,tpu} --workdir=DIR --preset=NAME``.

Examples::

  python -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits
  python -m experiments.cifar --accelerator=cpu --preset digits --workdir runs/digits \\
      --mode=certify --rounding=float64
  python -m experiments.cifar --accelerator=gpu --preset=paper --workdir=runs/paper_cifar10
  python -m experiments.cifar --accelerator=tpu --config=experiments/cifar/configs/paper.py \\
      --config.batch_size=256 --config.eval_batch_size=512 --workdir=gs://BUCKET/paper

Exit status: 0 when done; 1 with a one-line error; 130 after Ctrl-C (SIGINT) and 143 after
SIGTERM, with a checkpoint when training was under way.
"""

from __future__ import annotations

from absl import app, flags

from experiments.cifar import configs, train
from experiments.common import command_line, entry, signals


def _define(values: flags.FlagValues) -> None:
  """The short flags, each standing for ``--config.<the same name>``."""
  define = dict(flag_values=values)
  flags.DEFINE_enum("mode", None, list(configs.MODES), "train (then certify), certify (the "
                    "newest checkpoint) or export it", **define)
  flags.DEFINE_enum("rounding", None, list(configs.ROUNDINGS), "the certificate's rounding "
                    "mode (aol_jax.ROUNDING_MODES)", **define)
  flags.DEFINE_string("model", None, "a key of aol_jax.MODELS", **define)
  flags.DEFINE_string("dataset", None, "cifar10, cifar100, digits or mnist5k", **define)
  flags.DEFINE_integer("epochs", None, "passes over the training set", **define)
  flags.DEFINE_integer("batch_size", None, "global batch, divisible by the devices", **define)
  flags.DEFINE_float("learning_rate", None, "peak learning rate", **define)
  flags.DEFINE_integer("seed", None, "model init, data order and augmentation", **define)
  flags.DEFINE_string("data_dir", None, "tfds data directory (local or gs://)", **define)
  flags.DEFINE_string("manual_dir", None, "directory holding the original archive", **define)
  flags.DEFINE_boolean("download", None, "let tfds download the archive", **define)


PROGRAM = command_line.Program(
    name="experiments.cifar", doc=__doc__, configs=configs, config_type=configs.Config,
    presets=configs.PRESETS, define=_define)


def main(parsed: command_line.Parsed) -> int:
  """Validate once, then run the config's mode in the workdir; the exit status."""

  def work() -> int:
    train.validate(parsed.config, parsed.workdir, typed=parsed.typed)
    out = train.train_and_evaluate(parsed.config, parsed.workdir)
    return signals.status(out["stopped"]) if "stopped" in out else 0

  return entry.run(parsed, work, errors=(configs.ConfigError,))


if __name__ == "__main__":
  app.run(main, flags_parser=PROGRAM.parse_or_exit)
