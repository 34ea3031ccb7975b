"""Two processes on localhost run the entry point as one jax.distributed job with the
workdir in a bucket (a GCS-protocol server on localhost), as the hosts of a TPU slice do:
each loads only its share of the training set, both agree on every metric, both write the
checkpoint, and only process 0 writes the other files."""

import json
import os
import subprocess
import sys

import pytest
from etils import epath

from support.runs import event_files, listing
from support.servers import BUCKET, free_port, gcs_clients_in_this_process, gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_processes_train_and_certify_as_one_job_into_a_bucket():
  port, workdir = free_port(), f"gs://{BUCKET}/two_processes"
  base = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  with gcs_emulator() as gcs_env, gcs_clients_in_this_process(gcs_env):
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.cifar", "--accelerator=cpu", "--preset=digits",
         "--epochs=1", f"--workdir={workdir}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(base, **gcs_env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
      assert p.returncode == 0, err[-3000:]
    # 1437 training digits in batches of 64: 22 steps per epoch.
    for out, _ in outputs:
      assert "1437 training / 360 test images, 2 cpu device(s), batch 64, 22 steps" in out
    tables = [out[out.index("| model |"):] for out, _ in outputs]
    assert tables[0] == tables[1]
    root = epath.Path(workdir)
    assert listing(workdir) == {
        "checkpoints", "metrics.jsonl", "results.md", "results.json", "training_curves.png",
        "certified_accuracy.png", "events.out.tfevents.*"}
    assert len(event_files(workdir)) == 1  # process 0's only
    results = json.loads((root / "results.json").read_text())
    assert results["num_examples"] == 360 and results["epoch"] == 1
    assert f"| {100 * results['clean_accuracy']:.1f} |" in tables[0]
    assert len((root / "metrics.jsonl").read_text().splitlines()) == 1
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["22"]
    step = root / "checkpoints" / "22"
    assert (step / "commit_success.txt").exists()
    # Both processes wrote their part of the arrays (orbax's OCDBT: one tree per process).
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in (step / "state").iterdir()}
