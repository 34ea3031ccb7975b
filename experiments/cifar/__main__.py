"""``python -m experiments.cifar --accelerator={cpu,gpu,tpu} [--preset=...] [flags]``.

Examples::

  python -m experiments.cifar --accelerator=cpu --preset=digits --workdir=runs/digits
  python -m experiments.cifar --accelerator=gpu --preset=paper --workdir=runs/paper_cifar10
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from aol_jax import training
from experiments.cifar import configs, input_pipeline

_BACKENDS = {"cpu": "cpu", "gpu": "gpu", "tpu": "tpu"}


def _boolean(text: str) -> bool:
  if text.lower() not in ("true", "false", "1", "0"):
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
  return text.lower() in ("true", "1")


def parse_flags(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line; every training flag left out keeps the preset's value."""
  parser = argparse.ArgumentParser(prog="python -m experiments.cifar", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--accelerator", required=True, choices=sorted(_BACKENDS),
                      help="where to run; the run stops if JAX cannot use it (no fallback)")
  parser.add_argument("--preset", default="paper", choices=configs.PRESETS)
  parser.add_argument("--workdir", required=True,
                      help="checkpoints, metrics.jsonl, results.md, plots; reuse to resume")
  parser.add_argument("--model", help="aol_small, aol_medium, aol_large, aol_fc or aol_std")
  parser.add_argument("--dataset", help="cifar10, cifar100 or digits")
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--batch_size", type=int, help="global batch, divisible by the devices")
  parser.add_argument("--learning_rate", type=float)
  parser.add_argument("--seed", type=int)
  parser.add_argument("--data_dir", help="tfds data directory (default ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", help="directory holding cifar-10-binary.tar.gz or "
                      "cifar-100-binary.tar.gz (default <data_dir>/downloads/manual)")
  parser.add_argument("--download", type=_boolean,
                      help="true/false: let tfds download a missing archive")
  return parser.parse_args(argv)


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
  flags = parse_flags(argv)
  training.maybe_initialize()
  require_accelerator(flags.accelerator)
  overrides = {k: getattr(flags, k) for k in ("model", "dataset", "epochs", "batch_size",
                                              "learning_rate", "seed", "data_dir",
                                              "manual_dir", "download")}
  from experiments.cifar.train import train_and_evaluate  # after the backend is settled
  try:
    return train_and_evaluate(configs.get_config(flags.preset, **overrides), flags.workdir)
  except (configs.ConfigError, input_pipeline.DataMissingError,
          training.NonFiniteLossError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
