"""The README's results table: the digits preset over seeds and XLA's CPU instruction sets.

  python -m experiments.digits_spread --workdir=runs/digits_spread

runs ``python -m experiments.cifar --accelerator=cpu --preset=digits --seed=S`` in
``WORKDIR/<isa>/seed<S>`` with ``XLA_FLAGS=--xla_cpu_max_isa=<ISA>`` for each instruction-set
cap (``native``: no cap) and seed, one after another, then prints the Markdown table and
writes it to ``WORKDIR/spread.md`` (the data to ``spread.json``). XLA's CPU code differs per
instruction set, and float rounding changes the training trajectory, so a fresh clone lands
inside the spread rather than on one value. Every run is the runner's: rerunning the same
command skips the finished ones and resumes a stopped one; Ctrl-C stops it (exit 130).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from experiments.common import signals

signals.install()

from absl import app, flags  # noqa: E402

from experiments.cifar.configs import digits  # noqa: E402
from experiments.common import storage  # noqa: E402
from experiments.common.labels import STANDARD_RADII, radius_label  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "where the runs and the table go",
                               required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds of the runs")
_ISAS = flags.DEFINE_list("isas", ["SSE4_2", "AVX2", "AVX512", "native"],
                          "XLA_FLAGS=--xla_cpu_max_isa caps; native: none")
_EPOCHS = flags.DEFINE_integer("epochs", None, "override the preset's epochs (for a quick "
                               "look; the README's table uses the preset's)")

COLUMNS = ["clean", *map(radius_label, STANDARD_RADII)]


def cpu_name() -> str:
  """The CPU's model name and whether it has AVX-512 (/proc/cpuinfo; '?' elsewhere)."""
  try:
    text = open("/proc/cpuinfo").read()
  except OSError:
    return "?"
  name = next((l.split(":", 1)[1].strip() for l in text.splitlines()
               if l.startswith("model name")), "?")
  return f"{name}, {'with' if ' avx512f' in text else 'without'} AVX-512"


def run_one(workdir: str, isa: str, seed: str) -> dict:
  """One digits run; ``results.json`` as a dict (read as it is when the run finished)."""
  results = os.path.join(workdir, "results.json")
  epochs = _EPOCHS.value or digits.get_config().epochs
  if os.path.exists(results):
    done = json.loads(open(results).read())
    if done["mode"] == "train" and done["epoch"] == epochs:
      return done
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  if isa != "native":
    env["XLA_FLAGS"] = f"--xla_cpu_max_isa={isa}"
  command = [sys.executable, "-m", "experiments.cifar", "--accelerator=cpu", "--preset=digits",
             f"--seed={seed}", f"--workdir={workdir}"]
  if _EPOCHS.value:
    command.append(f"--epochs={_EPOCHS.value}")
  proc = subprocess.run(command, env=env, stdout=subprocess.DEVNULL)
  if proc.returncode:
    raise SystemExit(proc.returncode if proc.returncode > 0 else 128 - proc.returncode)
  return json.loads(open(results).read())


def table(runs: dict[tuple[str, str], dict]) -> str:
  """Seed 0 natively, and the range over every run, in %."""

  def row(result: dict) -> list[float]:
    return [100 * result["clean_accuracy"], *(100 * result["cra"][c] for c in COLUMNS[1:])]

  rows = {key: row(r) for key, r in runs.items()}
  isas = sorted({isa for isa, _ in runs}, key=_ISAS.value.index)
  seeds = sorted({seed for _, seed in runs}, key=int)
  lines = ["| | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
  if ("native", "0") in rows:
    lines.append("| seed 0, native | " + " | ".join(f"{v:.1f}" for v in rows["native", "0"])
                 + " |")
  spread = [f"{min(v):.1f}-{max(v):.1f}" for v in zip(*rows.values())]
  lines.append(f"| range over seeds {', '.join(seeds)} x {', '.join(isas)} ({len(rows)} runs) "
               f"| " + " | ".join(spread) + " |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  workdir = _WORKDIR.value
  storage.makedirs(workdir)
  runs = {}
  for isa in _ISAS.value:
    for seed in _SEEDS.value:
      runs[isa, seed] = run_one(os.path.join(workdir, isa, f"seed{seed}"), isa, seed)
      print(f"{isa} seed {seed}: clean {100 * runs[isa, seed]['clean_accuracy']:.1f}%",
            file=sys.stderr, flush=True)
  text = (f"{table(runs)}\n\nCertified robust accuracy (%) on the 360 test digits, "
          f"{runs[next(iter(runs))]['rounding']} rounding; measured on {cpu_name()}.\n")
  storage.write_atomic(os.path.join(workdir, "spread.md"), text)
  storage.write_atomic(os.path.join(workdir, "spread.json"), json.dumps(
      {f"{isa}/seed{seed}": r for (isa, seed), r in runs.items()}, indent=2) + "\n")
  print(text, end="")


if __name__ == "__main__":
  app.run(main)
