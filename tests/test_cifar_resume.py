"""A run killed with SIGKILL and restarted in the same workdir ends exactly like an
uninterrupted one (separate processes, as in real life)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cifar_testdata import accept_archive, write_cifar10_archive
from experiments.cifar import input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 8


def _command(data_dir, workdir):
  return [sys.executable, "-m", "experiments.cifar", "--accelerator=cpu", "--preset=tiny",
          f"--epochs={EPOCHS}", f"--data_dir={data_dir}", f"--workdir={workdir}"]


def _results(workdir):
  history = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  for record in history:
    del record["seconds"]  # wall time, the only field allowed to differ
  with open(os.path.join(workdir, "results.json")) as f:
    return history, json.load(f)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
  archive, _ = write_cifar10_archive(str(tmp_path / "manual"), per_file=8)
  accept_archive(monkeypatch, archive)  # only this process prepares; the runs just read
  data_dir = str(tmp_path / "data")
  input_pipeline.prepare_tfds("cifar10", data_dir=data_dir, manual_dir=str(tmp_path / "manual"),
                              download=False)
  # The three runs compile the same programs: share them through jax's persistent cache.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  run = lambda workdir: subprocess.run(_command(data_dir, workdir), cwd=ROOT, env=env, text=True,
                                       capture_output=True, timeout=300)

  reference = tmp_path / "reference"
  done = run(reference)
  assert done.returncode == 0, done.stderr[-3000:]

  killed = tmp_path / "killed"
  first_checkpoint = killed / "checkpoints" / "5"  # end of epoch 1: 5 steps per epoch
  with subprocess.Popen(_command(data_dir, killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL) as proc:
    while not first_checkpoint.exists() and proc.poll() is None:
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (killed / "results.md").exists(), "the run finished before it could be killed"
  epochs_before_kill = len((killed / "metrics.jsonl").read_text().splitlines())
  assert epochs_before_kill < EPOCHS

  resumed = run(killed)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from" in resumed.stdout
  assert _results(killed) == _results(reference)
