"""Running the experiments' entry points in the test process, and reading what a run wrote:
its metrics, results, and TensorBoard events (with TensorBoard's own reader)."""

from __future__ import annotations

import json
import tempfile

from etils import epath


def run_cifar(argv: list[str]) -> int:
  """``python -m experiments.cifar ARGV`` in this process: the flags parsed as absl.app would
  (an error or ``--help`` raises ``SystemExit``), then ``main``; its exit status."""
  from experiments.cifar import main
  return main.main(main.PROGRAM.parse_or_exit(["experiments.cifar", *argv]))


def run_ablations(argv: list[str]) -> int:
  """``python -m experiments.ablations ARGV`` in this process, as :func:`run_cifar`."""
  from experiments.ablations import main
  return main.main(main.PROGRAM.parse_or_exit(["experiments.ablations", *argv]))


def history(workdir: str) -> list[dict]:
  """The records of ``<workdir>/metrics.jsonl`` (local or gs://)."""
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines()]


def results(workdir: str) -> dict:
  return json.loads((epath.Path(workdir) / "results.json").read_text())


def tensorboard_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of the event files in ``workdir``, read by TensorBoard's
  own reader. A ``gs://`` workdir is copied to a local folder first: with TensorFlow
  installed, TensorBoard reads ``gs://`` with TensorFlow's client, which cannot be pointed at
  the local test server."""
  from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
  from tensorboard.util import tensor_util

  with tempfile.TemporaryDirectory() as tmp:
    for path in epath.Path(workdir).iterdir():
      if path.name.startswith("events.out.tfevents."):
        (epath.Path(tmp) / path.name).write_bytes(path.read_bytes())
    reader = EventAccumulator(tmp)
    reader.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                  for e in reader.Tensors(tag)] for tag in reader.Tags()["tensors"]}


def event_files(workdir: str) -> list[str]:
  return sorted(p.name for p in epath.Path(workdir).iterdir()
                if p.name.startswith("events.out.tfevents."))


def listing(workdir: str) -> set[str]:
  """The names in ``workdir``, event files as ``events.out.tfevents.*``."""
  return {("events.out.tfevents.*" if p.name.startswith("events.out.tfevents.") else p.name)
          for p in epath.Path(workdir).iterdir()}


__all__ = ["event_files", "history", "listing", "results", "run_ablations", "run_cifar",
           "tensorboard_scalars"]
