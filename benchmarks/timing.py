"""Shared timing, reporting and command-line helpers for the benchmarks.

Every figure a benchmark reports is a ratio of two things timed in the same process,
interleaved: each repeat runs every candidate once, in an order that rotates between
repeats, after a warm-up, and the median over repeats is kept. Noise from other processes
then hits both sides of a ratio alike.

Besides wall time, each call's process CPU time (all threads: XLA's and torch's pools run
inside this process) is recorded. On a shared machine where other processes take the
cores, wall time counts the waiting and CPU time does not, so the CPU-time ratio is the
steadier cross-check of a wall-time ratio (it counts spin-waiting threads as work).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SIZES = ("tiny", "quick", "paper")


def set_threads(threads: int | None) -> int:
  """Pins this process to the first ``threads`` CPUs; returns the count it may use.

  Call it before JAX (or torch) starts: XLA's CPU thread pool is sized from the CPUs in
  the process's affinity mask, so pinning is how the two libraries get the same count.
  """
  cpus = sorted(os.sched_getaffinity(0))
  if threads is not None:
    if not 1 <= threads <= len(cpus):
      raise ValueError(f"--threads must be in 1..{len(cpus)}, got {threads}.")
    cpus = cpus[:threads]
    os.sched_setaffinity(0, cpus)
  return len(cpus)


def _block(out: Any) -> None:
  import jax  # Imported late so that set_threads can run before JAX starts.
  leaves = [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]
  jax.block_until_ready(leaves)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1,
                     repeats: int = 5) -> dict[str, dict[str, float]]:
  """Times each zero-argument callable, interleaved; returns ``{name: stats}`` in seconds.

  A callable's JAX outputs are blocked on before its clock stops (PyTorch on CPU is
  synchronous). ``stats`` holds the wall-time ``median``, ``min``, ``max`` and raw ``times``,
  and the process-CPU-time ``cpu_median`` and raw ``cpu_times``.
  """
  names = list(fns)
  for _ in range(warmup):
    for name in names:
      _block(fns[name]())
  times: dict[str, list[float]] = {name: [] for name in names}
  cpu: dict[str, list[float]] = {name: [] for name in names}
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      start, start_cpu = time.perf_counter(), time.process_time()
      _block(fns[name]())
      times[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: {"median": statistics.median(t), "min": min(t), "max": max(t), "times": t,
                 "cpu_median": statistics.median(cpu[name]), "cpu_times": cpu[name]}
          for name, t in times.items()}


def ratio(stats: Mapping[str, Mapping[str, float]], num: str, den: str,
          key: str = "median") -> float:
  """``stats[num][key] / stats[den][key]``: by default, median wall time over median wall time."""
  return stats[num][key] / stats[den][key]


def met(value: float, target: float, digits: int = 2) -> str:
  """A table's verdict on ``value <= target``: ``'yes'``, or ``'no (+excess)'``."""
  return "yes" if value <= target else f"no (+{value - target:.{digits}f})"


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or "unknown"
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def environment(module: str, argv: Sequence[str] | None) -> dict[str, Any]:
  """What the numbers were measured on, and the command (``python -m module *argv``)."""
  import jax
  import jaxlib
  devices = jax.devices()
  argv = sys.argv[1:] if argv is None else list(argv)
  return {
      "command": shlex.join(["python", "-m", module, *argv]),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "backend": jax.default_backend(),
      "device": devices[0].device_kind,
      "device_count": len(devices),
      "cpu": cpu_model(),
      "nproc": os.cpu_count(),
      "threads": len(os.sched_getaffinity(0)),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "python": platform.python_version(),
  }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(v: Any) -> str:
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


# JAX's platform name for each --accelerator value.
PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def parser(description: str) -> argparse.ArgumentParser:
  """The options every benchmark takes."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--size", choices=SIZES, default="quick",
                 help="tiny: smoke test; quick: a laptop CPU; paper: the paper's sizes.")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats (median kept)")
  p.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
  p.add_argument("--accelerator", choices=sorted(PLATFORMS), default="cpu",
                 help="the one backend JAX starts (no other plugin is probed, so none prints "
                      "its start-up errors)")
  p.add_argument("--threads", type=int, default=None,
                 help="pin to this many CPUs (XLA and torch then use as many threads)")
  p.add_argument("--json", type=str, default=None, help="also write the results here")
  return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
  """``p``'s arguments, with the process pinned to ``--threads`` CPUs (:func:`set_threads`)
  and JAX limited to the ``--accelerator``'s backend."""
  args = p.parse_args(argv)
  set_threads(args.threads)
  import jax  # after the pinning: XLA sizes its CPU pool from the affinity mask

  jax.config.update("jax_platforms", PLATFORMS[args.accelerator])
  return args


def warmup_and_repeats(args: argparse.Namespace,
                       defaults: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
  """``(warmup, repeats)``: ``--warmup`` / ``--repeats`` where given, else ``defaults[size]``.

  ``defaults`` maps every ``--size`` to the benchmark's own ``(warmup, repeats)``.
  """
  missing = set(SIZES) - set(defaults)
  if missing:
    raise ValueError(f"warmup/repeats defaults lack the sizes {sorted(missing)}.")
  warmup, repeats = defaults[args.size]
  warmup = warmup if args.warmup is None else args.warmup
  repeats = repeats if args.repeats is None else args.repeats
  if warmup < 0 or repeats < 1:
    raise SystemExit(f"--warmup must be >= 0 and --repeats >= 1, got {warmup} and {repeats}.")
  return warmup, repeats


def report(title: str, table: str, results: Any, *, module: str,
           argv: Sequence[str] | None, json_path: str | None,
           notes: Sequence[str] = ()) -> dict[str, Any]:
  """Prints the table with its environment; writes everything as JSON if asked."""
  env = environment(module, argv)
  print(f"## {title}\n")
  print(f"`{env['command']}`: {env['backend']} ({env['device']}, {env['cpu']}, "
        f"{env['threads']} of {env['nproc']} CPUs), jax {env['jax']}"
        + (f", XLA_FLAGS={env['xla_flags']}" if env["xla_flags"] else "") + "\n")
  print(table)
  for note in notes:
    print(f"\n{note}")
  payload = {"title": title, "environment": dict(env), "results": results, "notes": list(notes)}
  if json_path:
    with open(json_path, "w") as f:
      json.dump(payload, f, indent=1)
  return payload
