"""Two processes on localhost run the entry point as one jax.distributed job: each loads
half of the training set, both agree on every metric, process 0 writes the files."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_certify_as_one_job(tmp_path):
  port, workdir = _free_port(), tmp_path / "work"
  base = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.cifar", "--accelerator=cpu", "--preset=digits",
       "--epochs=1", f"--workdir={workdir}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  # 1437 training digits: each process holds 718, so the job trains on 1436.
  for out, _ in outputs:
    assert "1436 training / 360 test images, 2 cpu device(s)" in out
  tables = [out[out.index("| model |"):] for out, _ in outputs]
  assert tables[0] == tables[1]
  results = json.loads((workdir / "results.json").read_text())
  assert results["num_examples"] == 360 and results["epoch"] == 1
  assert f"| {100 * results['clean_accuracy']:.1f} |" in tables[0]
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1
  assert os.listdir(workdir / "checkpoints") == ["22"]
