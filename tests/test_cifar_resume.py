"""A run killed with SIGKILL and restarted in the same workdir ends exactly like an
uninterrupted one (separate processes, as in real life), on a local disk and in a bucket.

The kill point is deterministic: the run is started through :data:`SIGNAL_AFTER`, which
gives ``train_and_evaluate`` a hook that SIGKILLs the process right after step 7 (mid
epoch 2, once epoch 1's checkpoint is written), whatever the speed of the machine.
A resume with another batch size stops at once, saying what changed, and changes nothing.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
from etils import epath

from support.cifar_archive import accept_archive, prepare_cifar10, write_cifar10_archive
from support.servers import BUCKET, gcs_clients_in_this_process, gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 4


# `python -c SIGNAL_AFTER STEP SIGNAL FLAGS...`: the entry point, sent SIGNAL after STEP.
SIGNAL_AFTER = """
import functools, os, sys
from experiments.common import signals
signals.install()
from absl import app
from experiments.cifar import main, train

def hook(run, step):
  if step == int(sys.argv[1]):
    run.checkpointer.wait()  # the checkpoints started before this step are on disk
    os.kill(os.getpid(), int(sys.argv[2]))

train.train_and_evaluate = functools.partial(train.train_and_evaluate, hooks=[hook])
app.run(main.main, argv=["experiments.cifar", *sys.argv[3:]],
        flags_parser=main.PROGRAM.parse_or_exit)
"""


def _command(data_dir, workdir, kill_after=None, sig=signal.SIGKILL):
  start = (["-c", SIGNAL_AFTER, str(kill_after), str(int(sig))] if kill_after
           else ["-m", "experiments.cifar"])
  return [sys.executable, *start, "--accelerator=cpu", "--preset=tiny",
          f"--epochs={EPOCHS}", f"--data_dir={data_dir}", f"--workdir={workdir}"]


def _results(workdir):
  root = epath.Path(workdir)
  history = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
  for record in history:
    del record["train_seconds"], record["eval_seconds"]  # wall times: allowed to differ
  return history, json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """CIFAR-10 in its own format, 8 images per file, prepared by tfds once for the module's
  runs (which only read it)."""
  return prepare_cifar10(tmp_path_factory.mktemp("cifar"))


def _run(data_dir, workdir, kill_after=None, *, env=None, sig=signal.SIGKILL):
  return subprocess.run(_command(data_dir, workdir, kill_after, sig), cwd=ROOT, env=env,
                        text=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  """The records and results of an uninterrupted run on a local disk: what a run computes
  does not depend on where it writes, so the local and the bucket resume both compare to it
  (the programs are compiled once: the session's persistent compilation cache,
  tests/conftest.py, reaches the runs through the environment)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  done = _run(data_dir, workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  return _results(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir, uninterrupted,
                                                          where):
  env = dict(os.environ)
  with contextlib.ExitStack() as stack:
    if where == "gcs":
      env.update(stack.enter_context(gcs_clients_in_this_process(
          stack.enter_context(gcs_emulator()))))
    killed = f"gs://{BUCKET}/killed" if where == "gcs" else str(tmp_path / "killed")
    proc = _run(data_dir, killed, kill_after=7, env=env)  # 5 steps per epoch: mid epoch 2
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = epath.Path(killed)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["5"]
    assert not (root / "results.md").exists()
    assert len((root / "metrics.jsonl").read_text().splitlines()) == 1

    resumed = _run(data_dir, killed, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 5 (epoch 1)" in resumed.stdout
    assert _results(killed) == uninterrupted


@pytest.mark.parametrize("batch_size", [4, 16])  # twice and half the steps per epoch
def test_resuming_with_another_batch_size_stops_at_once_and_keeps_every_record(
    tmp_path, monkeypatch, batch_size):
  archive, _ = write_cifar10_archive(str(tmp_path / "manual"), per_file=8)
  accept_archive(monkeypatch, archive)
  from support.runs import history, run_cifar
  flags = ["--accelerator=cpu", "--preset=tiny", "--epochs=2", "--config.num_devices=1",
           f"--data_dir={tmp_path / 'data'}", f"--manual_dir={tmp_path / 'manual'}",
           f"--workdir={tmp_path / 'work'}"]
  assert run_cifar(flags) == 0
  work = tmp_path / "work"
  before = {str(p.relative_to(work)): p.read_bytes() for p in work.rglob("*") if p.is_file()}
  with pytest.raises(SystemExit) as err:
    run_cifar([*flags[:2], "--epochs=3", *flags[3:], f"--batch_size={batch_size}"])
  assert str(err.value) == (
      f"error: --batch_size={batch_size}: the checkpoints in {work / 'checkpoints'} count steps "
      f"of batch_size 8 (an epoch has another number of steps now); resume with "
      f"--batch_size=8, or start a new --workdir.")
  after = {str(p.relative_to(work)): p.read_bytes() for p in work.rglob("*") if p.is_file()}
  assert after == before  # every record kept, nothing rewritten
  # The same settings resume and keep the records of the first run.
  assert run_cifar([*flags[:2], "--epochs=3", *flags[3:]]) == 0
  first = [json.loads(line) for line in before["metrics.jsonl"].decode().splitlines()]
  records = history(str(work))
  assert records[:2] == first and [r["epoch"] for r in records] == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_checkpoints_the_epoch_and_exits_143_with_quiet_logs(tmp_path, data_dir):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = _run(data_dir, tmp_path / "work", kill_after=3, env=env, sig=signal.SIGTERM)
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
  assert ("Stopped at epoch 1 with a checkpoint (step 5); rerun the same command to resume."
          in proc.stdout)
  assert sorted(p.name for p in (tmp_path / "work" / "checkpoints").iterdir()) == ["5"]
  # --accelerator=cpu kept jax off every other backend: no libtpu / CUDA start-up lines.
  assert proc.stderr == "", proc.stderr[-3000:]
