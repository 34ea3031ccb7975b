"""SIGINT and SIGTERM at every stage of ``python -m experiments.cifar``, in real processes with
real signals: one line, no traceback, exit 130 / 143, a checkpoint if training was under way,
nothing partial left behind.

Each process runs the entry point as ``__main__`` does (:data:`SCRIPT`) with one stage
patched to send the process a signal when that stage starts, so the point is the same on a
fast or a slow machine.
"""

import os
import signal
import subprocess
import sys

import pytest

from support.cifar_archive import prepare_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python -c SCRIPT STAGE SIGNAL FLAGS...`: the entry point of __main__.py, sent SIGNAL when
# STAGE starts.
SCRIPT = """
import functools, os, sys
from experiments.common import signals
signals.install()
stage, sig, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
kill = lambda: os.kill(os.getpid(), sig)
if stage == "imports":
  kill()
from absl import app
from experiments.cifar import main, results, train
from experiments.common import storage

def at_start(module, name):
  original = getattr(module, name)
  def patched(*args, **kwargs):
    kill()
    return original(*args, **kwargs)
  setattr(module, name, patched)

if stage == "setup":
  at_start(train, "setup")
elif stage == "certification":
  at_start(results, "report")
elif stage.startswith("training"):
  def hook(run, step):
    if step == 7:  # mid epoch 2: epoch 1's checkpoint (step 5) is on disk by then
      run.checkpointer.wait()
      kill()
      if stage == "training_twice":
        kill()
  train.train_and_evaluate = functools.partial(train.train_and_evaluate, hooks=[hook])
elif stage == "export":  # after the artifact, before its description
  write = storage.write_atomic
  def write_then_kill(path, data):
    write(path, data)
    if path.endswith(".jaxexport"):
      kill()
  storage.write_atomic = write_then_kill
app.run(main.main, argv=["experiments.cifar", *argv], flags_parser=main.PROGRAM.parse_or_exit)
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("signals")
  return prepare_cifar10(tmp)


def _run(stage, sig, workdir, data_dir, *extra):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a user runs it
  return subprocess.run(
      [sys.executable, "-c", SCRIPT, stage, str(int(sig)), "--accelerator=cpu",
       "--preset=tiny", "--epochs=3", f"--data_dir={data_dir}", f"--workdir={workdir}",
       *extra], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def _quiet(proc):
  """No traceback, no CUDA / libtpu start-up lines."""
  for noise in ("Traceback", "CUDA", "cuda", "TPU", "E0000", "W0000"):
    assert noise not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage,sig", [("imports", signal.SIGINT), ("setup", signal.SIGTERM)])
def test_a_signal_before_training_leaves_no_workdir(tmp_path, data_dir, stage, sig):
  proc = _run(stage, sig, tmp_path / "work", data_dir)
  assert proc.returncode == 128 + sig, proc.stderr[-3000:]
  assert proc.stderr.strip() == f"Stopped by {signal.Signals(sig).name}."
  _quiet(proc)
  assert not (tmp_path / "work").exists()  # setup had created it (and checkpoints/)


@pytest.mark.slow
def test_a_signal_in_training_stops_after_the_epoch_with_a_checkpoint(tmp_path, data_dir):
  proc = _run("training", signal.SIGTERM, tmp_path / "work", data_dir)
  assert proc.returncode == 143, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[-3] == ("SIGTERM: stopping after this epoch with a checkpoint (send it again "
                       "to stop at once).")
  assert lines[-2].startswith("epoch 2/3  step 10  ")  # the epoch under way, finished
  assert lines[-1] == ("Stopped at epoch 2 with a checkpoint (step 10); rerun the same "
                       "command to resume.")
  assert proc.stderr == ""
  work = tmp_path / "work"
  assert sorted(os.listdir(work / "checkpoints")) == ["10", "5"]
  assert not (work / "results.md").exists()
  # The rerun resumes there and finishes.
  done = _run("none", signal.SIGTERM, work, data_dir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Resumed from" in done.stdout and "at step 10 (epoch 2)" in done.stdout


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, data_dir):
  proc = _run("training_twice", signal.SIGINT, tmp_path / "work", data_dir)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.strip() == ("Stopped by SIGINT. The last checkpoint is kept; rerun the "
                                 "same command to resume.")
  _quiet(proc)
  work = tmp_path / "work"
  assert sorted(os.listdir(work / "checkpoints")) == ["5"]
  assert not [f for f in _files(work) if f.endswith(".tmp")]


@pytest.mark.slow
def test_a_signal_in_the_final_certification_keeps_the_checkpoint_and_writes_no_results(
    tmp_path, data_dir):
  proc = _run("certification", signal.SIGINT, tmp_path / "work", data_dir)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.strip() == ("Stopped by SIGINT. The last checkpoint is kept; rerun the "
                                 "same command to resume.")
  work = tmp_path / "work"
  assert "15" in os.listdir(work / "checkpoints")
  assert not {"results.md", "results.json"} & set(os.listdir(work))


@pytest.mark.slow
def test_a_signal_during_export_leaves_no_export(tmp_path, data_dir):
  work = tmp_path / "work"
  assert _run("none", signal.SIGINT, work, data_dir, "--epochs=1").returncode == 0
  before = _files(work)
  proc = _run("export", signal.SIGTERM, work, data_dir, "--epochs=1", "--mode=export")
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert proc.stderr.strip().startswith(f"Stopped by SIGTERM. Nothing exported to "
                                        f"{work / 'export'}.")
  _quiet(proc)
  assert [f for f in _files(work) if not f.startswith("export/")] == before
  assert _files(work / "export") == []
