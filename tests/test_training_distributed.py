"""aol_jax.training.distributed: when jax.distributed starts, and a real two-process job.

Run as a script (``python tests/test_training_distributed.py WORKER_ID PORT OUT``) this file is one
process of the two-process job that :func:`test_two_processes_form_one_job` launches.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from support.servers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, DEVICES_PER_PROCESS, BATCH = 2, 2, 8


def _data():
  """The global batch every process agrees on; process i feeds rows [4i, 4i + 4)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (BATCH, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (BATCH,)).astype(np.int32)
  return images, labels


def _one_step(mesh, images, labels):
  """One sharded train step of a tiny AOL net from seed 0: (loss, flat parameters, state)."""
  import jax
  from flax import nnx
  from aol_jax import aol_convnet
  from aol_jax import training
  model = aol_convnet(10, width=4, channels=8, conv_depth=1, dense_depth=2, pool=4,
                      image_size=8, rngs=nnx.Rngs(0))
  optimizer = training.make_optimizer(0.1)
  graphdef, state = training.create_train_state(model, optimizer, key=jax.random.key(1), mesh=mesh)
  step = training.make_train_step(graphdef, optimizer, mesh)
  state, metrics = step(state, *training.global_batch(mesh, images, labels))
  flat = np.concatenate([np.ravel(p.addressable_data(0)) for p in jax.tree.leaves(state.params)])
  return float(metrics["loss"]), flat, state


def _worker(process_id: int, port: int, out: str) -> None:
  os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES=str(NUM_PROCESSES), JAX_PROCESS_ID=str(process_id))
  import jax
  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  jax.config.update("jax_default_matmul_precision", "highest")
  from aol_jax import training
  initialized = training.maybe_initialize()
  mesh = training.make_data_mesh()
  images, labels = _data()
  share = slice(process_id * BATCH // NUM_PROCESSES, (process_id + 1) * BATCH // NUM_PROCESSES)
  (x,) = training.global_batch(mesh, images[share].astype(np.float32))
  total = jax.jit(lambda a: a.sum(axis=0), out_shardings=training.replicated_sharding(mesh))(x)
  loss, params, state = _one_step(mesh, images[share], labels[share])
  # Both processes save to, and restore from, one shared directory.
  with training.Checkpointer(os.path.join(os.path.dirname(out), "ckpt")) as ckpt:
    ckpt.save(1, state, metadata={"note": "two processes"})
    ckpt.wait()
    restored, restored_step, meta = ckpt.restore_latest(state)
  with open(out, "w") as f:
    json.dump(dict(initialized=initialized, process_index=jax.process_index(),
                   process_count=jax.process_count(), device_count=jax.device_count(),
                   local_device_count=jax.local_device_count(),
                   global_shape=list(x.shape),
                   total=np.asarray(total.addressable_data(0)).tolist(),
                   loss=loss, params=params.tolist(), restored_step=restored_step, meta=meta,
                   restored_same=(training.tree_checksum(restored)
                                  == training.tree_checksum(state))), f)


def test_no_environment_is_a_noop(monkeypatch):
  import jax
  from aol_jax._src.training import distributed
  for name in list(os.environ):
    if name.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                        "OMPI_", "TPU_", "AOL_JAX_DISTRIBUTED")):
      monkeypatch.delenv(name)
  called = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append((a, k)))
  assert distributed.maybe_initialize() is False
  assert called == []
  assert jax.process_count() == 1


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
     None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, {}),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),  # an allocation, not an srun step
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"AOL_JAX_DISTRIBUTED": "1"}, {}),
])
def test_distributed_env(env, expected):
  from aol_jax._src.training.distributed import distributed_env
  assert distributed_env(env) == expected


def test_distributed_env_incomplete_is_an_error():
  from aol_jax._src.training.distributed import distributed_env
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    distributed_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    distributed_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                     "JAX_PROCESS_ID": "0"})


@pytest.mark.slow
def test_two_processes_form_one_job(tmp_path):
  """Two local processes with 2 CPU devices each become one 4-device job: a sum over the
  batch and a full train step agree with the same computation on 4 devices in one process,
  and a checkpoint written by the job restores in it."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
  env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  outs = [tmp_path / f"process_{i}.json" for i in range(NUM_PROCESSES)]
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(outs[i])],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(NUM_PROCESSES)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=150)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:] if i < len(logs) else ''}"
  results = [json.loads(o.read_text()) for o in outs]

  from aol_jax.training import make_data_mesh
  images, labels = _data()
  expected_loss, expected_params, _ = _one_step(make_data_mesh(4), images, labels)
  for i, r in enumerate(results):
    assert r["initialized"] is True
    assert r["process_index"] == i
    assert r["process_count"] == NUM_PROCESSES
    assert r["device_count"] == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert r["local_device_count"] == DEVICES_PER_PROCESS
    assert r["global_shape"] == [BATCH, 8, 8, 3]
    np.testing.assert_array_equal(np.asarray(r["total"], np.float32),
                                  images.astype(np.float32).sum(axis=0))
    np.testing.assert_allclose(r["loss"], expected_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r["params"], np.float32), expected_params,
                               rtol=1e-6, atol=1e-7)
    assert r["restored_step"] == 1 and r["meta"] == {"note": "two processes"}
    assert r["restored_same"]


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
