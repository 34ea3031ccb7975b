"""A run killed with SIGKILL and restarted in the same workdir ends exactly like an
uninterrupted one (separate processes, as in real life), on a local disk and in a bucket.

The kill point is deterministic: ``AOL_JAX_KILL_AT_STEP=7`` makes the run SIGKILL itself
right after step 7 (mid epoch 2, once epoch 1's checkpoint is written), whatever the speed
of the machine.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
from etils import epath

from cifar_testdata import accept_archive, write_cifar10_archive
from experiments.cifar import input_pipeline
from experiments.cifar.train import KILL_AT_STEP_ENV
from local_servers import BUCKET, gcs_clients_in_this_process, gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 4


def _command(data_dir, workdir):
  return [sys.executable, "-m", "experiments.cifar", "--accelerator=cpu", "--preset=tiny",
          f"--epochs={EPOCHS}", f"--data_dir={data_dir}", f"--workdir={workdir}"]


def _results(workdir):
  root = epath.Path(workdir)
  history = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
  for record in history:
    del record["seconds"]  # wall time, the only field allowed to differ
  return history, json.loads((root / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, where):
  archive, _ = write_cifar10_archive(str(tmp_path / "manual"), per_file=8)
  accept_archive(monkeypatch, archive)  # only this process prepares; the runs just read
  data_dir = str(tmp_path / "data")
  input_pipeline.prepare_tfds("cifar10", data_dir=data_dir, manual_dir=str(tmp_path / "manual"),
                              download=False)
  # The runs compile the same programs: share them through jax's persistent cache.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  with contextlib.ExitStack() as stack:
    if where == "gcs":
      env.update(stack.enter_context(gcs_clients_in_this_process(
          stack.enter_context(gcs_emulator()))))
    base = f"gs://{BUCKET}" if where == "gcs" else str(tmp_path)
    run = lambda workdir, **extra: subprocess.run(
        _command(data_dir, workdir), cwd=ROOT, env=dict(env, **extra), text=True,
        capture_output=True, timeout=300)

    reference = f"{base}/reference"
    done = run(reference)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = f"{base}/killed"
    proc = run(killed, **{KILL_AT_STEP_ENV: "7"})  # 5 steps per epoch: mid epoch 2
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = epath.Path(killed)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["5"]
    assert not (root / "results.md").exists()
    assert len((root / "metrics.jsonl").read_text().splitlines()) == 1

    resumed = run(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 5 (epoch 1)" in resumed.stdout
    assert _results(killed) == _results(reference)
