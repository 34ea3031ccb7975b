"""The entry point ``python -m experiments.cifar`` end to end on a generated CIFAR-10 archive,
through the real tfds builder, and its error messages."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

import matplotlib.image
import numpy as np
import pytest

from aol_jax import training
from cifar_testdata import accept_archive, write_cifar10_archive
from experiments.cifar import configs, train
from experiments.cifar.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(tmp_path, *extra):
  return ["--accelerator=cpu", "--preset=tiny", f"--data_dir={tmp_path / 'data'}",
          f"--manual_dir={tmp_path / 'manual'}", f"--workdir={tmp_path / 'work'}", *extra]


def _checkpoint_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


@pytest.fixture
def archive(tmp_path, monkeypatch):
  path, _ = write_cifar10_archive(str(tmp_path / "manual"), per_file=8)
  accept_archive(monkeypatch, path)
  return path


def test_end_to_end_writes_metrics_results_plots_and_checkpoints(tmp_path, archive):
  out = main(_flags(tmp_path))
  work = tmp_path / "work"
  # 40 training images, batch 8: 5 steps per epoch, 3 epochs.
  history = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in history] == [1, 2, 3] and [r["step"] for r in history] == [5, 10, 15]
  for r in history:
    assert np.isfinite([r["train_loss"], r["train_accuracy"], r["test_accuracy"]]).all()
    assert 0 <= r["test_cra_36"] <= r["test_accuracy"] <= 1
  assert history == out["history"]
  assert _checkpoint_steps(work) == [10, 15]  # max_to_keep=2

  table = (work / "results.md").read_text()
  assert "| model | n | clean | 36/255 | 72/255 | 108/255 | 1 |" in table
  row = next(line for line in table.splitlines() if line.startswith("| aol_small"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[1] == "8"  # the whole test set
  results = json.loads((work / "results.json").read_text())
  want = [results["clean_accuracy"]] + list(results["cra"].values())
  assert [float(c) for c in cells[2:]] == pytest.approx([100 * v for v in want], abs=0.051)
  assert all(a >= b for a, b in zip(want, want[1:]))  # CRA cannot grow with the radius

  for name in ("training_curves.png", "certified_accuracy.png"):
    image = matplotlib.image.imread(str(work / name))
    assert image.ndim == 3 and min(image.shape[:2]) > 100
  assert not [n for n in os.listdir(work) if n.endswith(".tmp")]


def test_stop_request_checkpoints_and_a_non_finite_loss_keeps_that_checkpoint(
    tmp_path, archive, monkeypatch):
  config = configs.get_config("tiny", data_dir=str(tmp_path / "data"),
                              manual_dir=str(tmp_path / "manual"), epochs=4,
                              checkpoint_every=100)
  work = str(tmp_path / "work")
  # A SIGTERM / Ctrl-C (as the handler records it) stops after the epoch, with a checkpoint.
  monkeypatch.setattr(train._StopRequest, "agreed", lambda self: True)
  assert train.train_and_evaluate(config, work)["stopped"]
  assert _checkpoint_steps(work) == [5]
  assert not os.path.exists(os.path.join(work, "results.md"))
  lines = open(os.path.join(work, "metrics.jsonl")).read()
  monkeypatch.undo()
  # Resume with an absurd learning rate: step 6's update overflows the parameters, so the
  # loss of step 7 is NaN.
  with pytest.raises(training.NonFiniteLossError) as err:
    train.train_and_evaluate(dataclasses.replace(config, learning_rate=1e30), work)
  assert "Non-finite training loss at step 7" in str(err.value)
  assert "last good checkpoint, step 5" in str(err.value)
  assert _checkpoint_steps(work) == [5]
  assert open(os.path.join(work, "metrics.jsonl")).read() == lines
  # The same workdir refuses a checkpoint of differently shaped parameters.
  wider = {"width": 8, "channels": 16, "conv_depth": 1, "dense_depth": 2}
  with pytest.raises(configs.ConfigError, match="holds a different state"):
    train.train_and_evaluate(dataclasses.replace(config, model_kwargs=wider), work)
  assert _checkpoint_steps(work) == [5]


def test_resuming_refuses_another_dataset_even_when_the_shapes_agree(capsys):
  saved = dataclasses.asdict(configs.get_config("tiny"))
  # CIFAR-100 changes only FirstChannels(num_classes): the parameters would load silently.
  with pytest.raises(configs.ConfigError, match="different dataset"):
    train._check_resumable(saved, configs.get_config("tiny", dataset="cifar100"))
  train._check_resumable(saved, configs.get_config("tiny", epochs=5, data_dir="/elsewhere"))
  assert "changed epochs;" in capsys.readouterr().out


def test_signal_handler_records_the_request_and_restores_the_previous_handler():
  previous = signal.getsignal(signal.SIGTERM)
  stop = train._StopRequest()
  if threading.current_thread() is threading.main_thread():
    assert signal.getsignal(signal.SIGTERM) == stop._handle
  assert not stop.agreed()
  stop._handle(signal.SIGTERM, None)
  assert stop.requested and stop.agreed()
  assert signal.getsignal(signal.SIGTERM) == previous


@pytest.mark.parametrize("flags,expected", [
    (["--batch_size=12"], "not divisible by the 8 devices"),
    (["--model=aol_tiny"], "Unknown model 'aol_tiny'"),
    (["--dataset=mnist"], "Unknown dataset 'mnist'"),
    (["--dataset=cifar100", "--download=false"], "cifar-100-binary.tar.gz"),
])
def test_bad_inputs_stop_with_a_clear_message(tmp_path, flags, expected):
  with pytest.raises(SystemExit) as err:
    main(_flags(tmp_path, *flags))
  assert expected in str(err.value)


def test_missing_cifar_message_names_the_archive_and_where_to_put_it(tmp_path):
  with pytest.raises(SystemExit) as err:
    main(_flags(tmp_path, "--download=false"))
  message = str(err.value)
  assert "cifar-10-binary.tar.gz" in message
  assert str(tmp_path / "manual" / "cifar-10-binary.tar.gz") in message
  assert "--manual_dir" in message


@pytest.mark.parametrize("accelerator", ["gpu", "tpu"])
def test_missing_accelerator_stops_at_once_without_falling_back(tmp_path, accelerator):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.cifar", f"--accelerator={accelerator}",
       "--preset=digits", f"--workdir={tmp_path / 'work'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert f"--accelerator={accelerator} was requested but JAX cannot use a {accelerator}" in proc.stderr
  assert "Not falling back" in proc.stderr
  assert not (tmp_path / "work").exists()
