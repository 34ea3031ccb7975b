"""Epoch wall time of the experiment's training loop against the sum of its step times.

The epoch runs the loop of ``experiments.cifar.train.train_and_evaluate``: batches from
``experiments.common.input_pipeline.TrainBatches`` (gathered on device from the stored
training share, or on the host) fed to ``aol_jax.training.make_train_step`` (paper
optimiser, on-device augmentation), the last metrics fetched every ``log_every`` steps and
all of them at the end. The baseline runs the same number of steps of the same compiled
step on one batch that is already on the device, each step timed to completion. Target:
epoch / sum of steps <= 1.05. The data are synthetic uint8 images of CIFAR's shape (the
loop never looks at their values), so the benchmark needs no dataset on disk.

  python -m benchmarks.input_pipeline --size paper
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import timing

TARGET = 1.05
# Steps per timed "epoch" (a full CIFAR-10 epoch is 200 steps of 250; the per-step cost of
# the loop is what the ratio measures, so a few steps suffice) and the log interval.
STEPS = {"tiny": 3, "quick": 8, "paper": 4}
LOG_EVERY = 50


def run(size_name: str, *, warmup: int, repeats: int, on_device: bool | None
        ) -> dict[str, Any]:
  import jax
  import numpy as np
  from aol_jax import training
  from benchmarks import nets
  from experiments.common import input_pipeline

  size = nets.SIZES[size_name]
  steps = STEPS[size_name]
  mesh = training.make_data_mesh(1)
  rng = np.random.default_rng(0)
  n = steps * size.batch
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  order = input_pipeline.DataOrder(n, size.batch, seed=0)
  batches = input_pipeline.TrainBatches(mesh, images, labels, max_value=255.0, order=order,
                                        on_device=on_device)
  optimizer = training.make_optimizer(training.paper_schedule(1e-3, steps, 1000))
  graphdef, state = training.create_train_state(nets.aol_net(size), optimizer, key=0, mesh=mesh)
  train_step = training.make_train_step(graphdef, optimizer, mesh, augment=True)
  holder = {"state": state, "epoch": 0}
  fixed = batches.batch(batches.epoch_order(0)[0])

  def epoch():
    metrics = []
    for i, indices in enumerate(batches.epoch_order(holder["epoch"])):
      holder["state"], m = train_step(holder["state"], *batches.batch(indices))
      metrics.append(m)
      if (i + 1) % LOG_EVERY == 0:
        jax.device_get(m)
    holder["epoch"] += 1
    return jax.device_get(metrics)

  def steps_alone():
    for _ in range(steps):
      holder["state"], m = train_step(holder["state"], *fixed)
      jax.block_until_ready(m)
    return holder["state"]

  stats = timing.time_interleaved({"epoch": epoch, "steps": steps_alone}, warmup=warmup,
                                  repeats=repeats)
  return {"size": size_name, "net": vars(size), "steps": steps, "on_device": batches.on_device,
          "steps_run": int(jax.device_get(holder["state"].step)),
          "stats": stats, "ratio": timing.ratio(stats, "epoch", "steps"),
          "ratio_min": timing.ratio(stats, "epoch", "steps", "min"),
          "cpu_ratio": timing.ratio(stats, "epoch", "steps", "cpu_median")}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = timing.parser(__doc__.splitlines()[0])
  p.add_argument("--on-host", action="store_true",
                 help="gather batches on the host (TrainBatches(on_device=False))")
  args = timing.parse(p, argv)
  warmup, repeats = timing.warmup_and_repeats(
      args, {"tiny": (1, 1), "quick": (1, 3), "paper": (1, 3)})
  r = run(args.size, warmup=warmup, repeats=repeats, on_device=False if args.on_host else None)
  s = r["stats"]
  rows = [[f"{r['steps']} steps, batch {r['net']['batch']}, data on "
           f"{'device' if r['on_device'] else 'host'}", s["epoch"]["median"],
           s["steps"]["median"], r["ratio"], r["ratio_min"], r["cpu_ratio"],
           timing.met(r["ratio"], TARGET, digits=3)]]
  table = timing.markdown_table(
      ["epoch", "epoch wall (s)", "sum of step times (s)", "epoch / steps (median)",
       "epoch / steps (min)", "CPU time ratio", f"<= {TARGET}"], rows)
  notes = [f"Warm-up {warmup}, {repeats} interleaved repeats; {r['net']['channels']}-channel "
           "AOL net on synthetic CIFAR-shaped uint8 images, paper optimiser and augmentation."]
  return timing.report(f"Input pipeline ({args.size})", table, r, module=__spec__.name,
                       argv=argv, json_path=args.json, notes=notes)


if __name__ == "__main__":
  main()
