"""``python -m experiments.cifar --accelerator={cpu,gpu,tpu} --workdir=DIR [config flags]``.

Examples::

  python -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits
  python -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits \\
      --mode=certify --rounding=float64
  python -m experiments.cifar --accelerator=gpu --preset=paper --workdir=runs/paper_cifar10
  python -m experiments.cifar --accelerator=tpu --config=experiments/cifar/configs/paper.py \\
      --config.batch_size=256 --config.eval_batch_size=512 --workdir=gs://BUCKET/paper

Exit status: 0 when done, 1 with a one-line error, 128 + the signal's number (143 for
SIGTERM, 130 for Ctrl-C) when a signal stopped the run after a checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aol_jax import training
from experiments.cifar import configs, flags, train
from experiments.common import input_pipeline
from experiments.common.accelerator import require_accelerator

def main(argv: Sequence[str] | None = None, *, after_step: train.AfterStep | None = None
         ) -> dict:
  """Parse ``argv`` (default ``sys.argv[1:]``), run, and exit non-zero on any error."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if {"--help", "-h", "--helpfull"} & set(argv):
    print(__doc__)
    flags.print_help()
    sys.exit(0)
  try:
    values, config, set_by = flags.parse_flags(argv)
  except flags.UsageError as e:
    sys.exit(f"error: {e}")
  training.maybe_initialize()
  require_accelerator(values.accelerator)
  try:
    train.validate(config, values.workdir, flag_names=set_by)
    out = train.train_and_evaluate(config, values.workdir, after_step=after_step)
  except (configs.ConfigError, input_pipeline.DataMissingError,
          training.NonFiniteLossError) as e:
    sys.exit(f"error: {e}")
  if out.get("stopped"):
    sys.exit(128 + out["stopped"])
  return out
