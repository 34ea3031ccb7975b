"""Start ``jax.distributed`` when, and only when, the environment describes a multi-process job.

Triggers, checked in this order (the first that applies wins):

1. ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
   ``JAX_PROCESS_ID``: an explicit job, e.g. several processes on one machine or a
   hand-launched GPU cluster. ``JAX_LOCAL_DEVICE_IDS`` is honoured by jax itself.
2. Slurm (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS`` > 1, ``SLURM_PROCID``,
   ``SLURM_LOCALID``: a step launched with ``srun``) and Open MPI (``OMPI_MCA_orte_hnp_uri``
   with ``OMPI_COMM_WORLD_SIZE`` > 1, i.e. ``mpirun``): jax detects the parameters itself.
3. A multi-host Cloud TPU slice on GKE (``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES``
   listing more than one host): jax detects the parameters itself.
4. ``AOL_JAX_DISTRIBUTED=1``: call ``jax.distributed.initialize()`` with jax's full
   auto-detection. Use it on a Cloud TPU VM pod slice, where the topology comes from the GCE
   metadata server and no environment variable reveals it.

Anything else, a single process, is left alone. The call must come before any other JAX
computation (jax refuses otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax


def _int(env: Mapping[str, str], name: str, default: int = 0) -> int:
  if name not in env:
    return default
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f"Environment variable {name}={env[name]!r} is not an integer.") from None


def distributed_env(env: Mapping[str, str] | None = None) -> dict | None:
  """The arguments for ``jax.distributed.initialize`` this environment asks for, or None.

  ``{}`` means "let jax auto-detect everything"; ``None`` means "single process".
  """
  env = os.environ if env is None else env
  if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
    if "JAX_PROCESS_ID" not in env:
      raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but JAX_PROCESS_ID "
                       "is not: set it to this process's index in [0, JAX_NUM_PROCESSES).")
    n = _int(env, "JAX_NUM_PROCESSES")
    if n <= 1:
      return None
    return dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                process_id=_int(env, "JAX_PROCESS_ID"))
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and _int(env, "SLURM_NTASKS") > 1:
    return {}
  if "OMPI_MCA_orte_hnp_uri" in env and _int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
    return {}
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return {}
  if env.get("AOL_JAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
    return {}
  return None


def maybe_initialize() -> bool:
  """Call ``jax.distributed.initialize`` if the environment asks for it (see module doc).

  Returns:
    True if this call initialised the distributed system (or it already was), False for a
    single-process run, which is left untouched.
  """
  if jax.distributed.is_initialized():
    return True
  kwargs = distributed_env()
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True
