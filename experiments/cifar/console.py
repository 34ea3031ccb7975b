"""The run's console: one plain line per evaluation, a progress bar only on a terminal."""

from __future__ import annotations

import sys
import time

import jax
import tqdm


class Progress:
  """A tqdm bar when stderr is a terminal (none in a log file), and the ETA: the wall time
  per step since the first (compiled) step, evaluations included, times the steps left."""

  def __init__(self, total_steps: int, first_step: int):
    self.total = total_steps
    self.writer = jax.process_index() == 0
    self.use_bar = self.writer and sys.stderr.isatty()
    self.bar = None
    self.first_step = first_step
    self.start: tuple[int, float] | None = None  # (step, time) after the first compiled step

  def step(self, step: int, description: str) -> None:
    if self.start is None:
      self.start = (step, time.perf_counter())
      if self.use_bar:
        self.bar = tqdm.tqdm(total=self.total, initial=step, unit="step", dynamic_ncols=True,
                             mininterval=0.5, desc=description)
    elif self.bar is not None:
      self.bar.set_description(description, refresh=False)
      self.bar.update(1)

  def postfix(self, **values) -> None:
    if self.bar is not None:
      self.bar.set_postfix(**values)

  def eta(self, step: int) -> str:
    if self.start is None or step <= self.start[0]:
      return "ETA after the next epoch"
    rate = (time.perf_counter() - self.start[1]) / (step - self.start[0])
    seconds = rate * (self.total - step)
    return f"ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"

  def line(self, text: str) -> None:
    if self.writer:
      (self.bar.write if self.bar is not None else print)(text)
      sys.stdout.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def summary(record: dict, epochs: int, eta: str) -> str:
  """The console line of an evaluated epoch: the epoch's training time and the evaluation's
  time apart (CRA: certified robust accuracy)."""
  return (f"epoch {record['epoch']}/{epochs}  step {record['step']}  "
          f"loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.3f}  "
          f"test acc {record['test_accuracy']:.3f}  "
          + (f"CRA(36/255) {record['test_cra_36']:.3f}  " if "test_cra_36" in record else "")
          + f"train {record['train_seconds']:.1f} s  eval {record['eval_seconds']:.1f} s  {eta}")


def describe(run) -> None:
  """The run's first line: data, devices, batch and where the data lives."""
  print(f"{run.config.model} on {run.config.dataset}: {run.batches.order.num_examples} "
        f"training / {len(run.data.test_labels)} test images, {run.mesh.devices.size} "
        f"{run.mesh.devices.flat[0].platform} device(s), batch {run.config.batch_size}, "
        f"{run.steps_per_epoch} steps per epoch, "
        f"data {'on device' if run.batches.on_device else 'on host'}.", flush=True)
