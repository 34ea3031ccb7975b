"""``python -m experiments.ablations <check>... --accelerator=cpu --workdir=DIR [--small]
[--datasets=...]``: the runner's convention (``--accelerator`` checked first, never a
fallback; ``--workdir`` checked writable before anything runs)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from experiments.ablations import aol_vs_plain, offset_temperature, orthogonality, trainer
from experiments.ablations.config import CONFIGS
from experiments.common import storage
from experiments.common.accelerator import ACCELERATORS, require_accelerator

CHECKS = {"offset": offset_temperature.run, "orthogonal": orthogonality.run,
          "plain": aol_vs_plain.run}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.ablations",
      description="Check the AOL paper's claims on digits and MNIST (5k); each check prints "
                  "Markdown tables and writes <check>.md/.json/.png into --workdir.")
  parser.add_argument("checks", nargs="+", choices=[*CHECKS, "all"], metavar="check",
                      help="offset: offset/temperature trade-off; orthogonal: per-layer norms "
                           "and distance from orthogonal; plain: AOL vs an unconstrained net; "
                           "all: the three. Several checks in one command train each "
                           "network once.")
  parser.add_argument("--small", action="store_true",
                      help="the reduced run of the test (digits, fewer epochs and seeds)")
  parser.add_argument("--datasets", default=None,
                      help="comma-separated subset of the config's datasets (default: all)")
  parser.add_argument("--accelerator", required=True, choices=ACCELERATORS,
                      help="where to run; the run stops if JAX cannot use it (no fallback)")
  parser.add_argument("--workdir", required=True,
                      help="where the files go (a local path or gs://...)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse(argv)
  require_accelerator(args.accelerator)
  why = storage.workdir_error(args.workdir)
  if why:
    sys.exit(f"error: --workdir={args.workdir}: {why}; pass a directory this process can "
             f"write.")
  config = CONFIGS["small" if args.small else "full"]
  if args.datasets:
    try:
      config = config.only(tuple(d.strip() for d in args.datasets.split(",") if d.strip()))
    except ValueError as e:
      sys.exit(f"error: --datasets: {e}")
  checks = [c for c in CHECKS if c in args.checks or "all" in args.checks]
  results = {}
  for name in checks:
    start = time.perf_counter()
    results[name] = CHECKS[name](config, args.workdir)
    trainer.log(f"[{name}] done in {time.perf_counter() - start:.1f} s; files in "
                f"{args.workdir}")
  return results


if __name__ == "__main__":
  main()
