"""Compiler counts of the train and certification steps for TPU topologies, on any machine.

``libtpu`` (the ``tpu`` extra: ``pip install 'jax[tpu]'`` at the pinned jax) compiles for a
TPU topology without a TPU: ``jax.experimental.topologies`` describes the slice, its devices
form the data mesh, and the steps are traced with abstract, sharded arguments and compiled.
Nothing runs. For AOL and for the same network with plain ``nnx.Conv`` / ``nnx.Linear``
(``benchmarks.nets.plain_net``) it reports, per device: FLOPs and bytes accessed
(``cost_analysis()``), peak memory (``memory_analysis()``: arguments + outputs + temporaries
- donated aliases) against the chip's HBM, the collectives of the compiled HLO with their
sizes, and the compile time. These are compiler counts, not timings.

The train step is ``aol_jax.training.make_train_step`` (augmentation on, SGD Nesterov with
the paper's schedule, state replicated, batch on ``'data'``). The certification step is the
frozen model's forward pass and :func:`aol_jax.margins` on a batch sharded on
``'data'`` (the core of ``certify_dataset``'s per-batch function; the rounding allowance
adds only elementwise work on ``(batch,)`` vectors).

  python -m benchmarks.tpu_compile                       # AOL-Small on every topology
  python -m benchmarks.tpu_compile --models aol_small aol_medium aol_large
  python -m benchmarks.tpu_compile --topologies v5e:2x4 --replicated-rescaling
"""

from __future__ import annotations

import os

# libtpu takes a lockfile against a second process on one TPU host; nothing runs on a TPU
# here, and other JAX processes on this machine load libtpu too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from aol_jax import models, training  # noqa: E402
from aol_jax.certification.margins import margins  # noqa: E402
from aol_jax.freeze import freeze  # noqa: E402
from aol_jax.training.mesh import DATA_AXIS  # noqa: E402
from benchmarks import nets, timing  # noqa: E402

TOPOLOGIES = ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5p:2x2x2")
MODELS = ("aol_small", "aol_medium", "aol_large")
# HBM per device (GiB), from the Cloud TPU system-architecture pages: v5e 16 GiB per chip,
# v5p 95 GiB per chip (one megacore device per chip), v4 32 GiB per chip.
HBM_GIB = {"TPU v5 lite": 16, "TPU v5": 95, "TPU v4": 32}
FLOPS_TARGET = MEMORY_TARGET = 1.30
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[\d,]*\](?:\{[^}]*\})?)\s+"
                         r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-done)?\(")
_SHAPE = re.compile(r"([a-z]+)(\d*)\[([\d,]*)\]")


def topology_mesh(topology: str) -> jax.sharding.Mesh:
  """A one-axis ``'data'`` mesh (explicit axis) over every device of a TPU topology."""
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Explicit,), devices=devices)


def _bytes(shape_text: str) -> int:
  total = 0
  for kind, bits, dims in _SHAPE.findall(shape_text):
    width = 8 if kind == "pred" else int(bits or 32)
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * width // 8
  return total


def collectives(hlo: str) -> dict[str, dict[str, float]]:
  """``{kind: {'count', 'bytes'}}`` of the collectives in a compiled HLO: their result sizes,
  each async pair counted once (at its ``-done``, whose output is the result)."""
  out: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for shape, kind in _COLLECTIVE.findall(hlo):
    out[kind]["count"] += 1
    out[kind]["bytes"] += _bytes(shape)
  return dict(out)


def _abstract(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _network(model_name: str, network: str, *, frozen: bool = False) -> nnx.Module:
  """The abstract (shape-only) AOL model or its plain twin, optionally frozen."""
  def build():
    model = models.MODELS[model_name](10, rngs=nnx.Rngs(0))
    if network == "plain":
      model = nets.plain_net(model)
    elif frozen:
      model = freeze(model)
    return model
  return nnx.eval_shape(build)


def compile_train_step(mesh: jax.sharding.Mesh, model_name: str, network: str, batch: int, *,
                       shard_rescaling: bool | None = None) -> Any:
  """The compiled ``make_train_step`` of ``network`` (``'aol'`` or ``'plain'``)."""
  optimizer = training.make_optimizer(training.paper_schedule(1e-3, 100, 10))
  graphdef, params, rest = nnx.split(_network(model_name, network), nnx.Param, ...)
  replicated, data = training.replicated_sharding(mesh), training.data_sharding(mesh)
  state = training.TrainState(params=params, rest=rest,
                              opt_state=jax.eval_shape(optimizer.init, params),
                              step=jax.ShapeDtypeStruct((), jnp.int32),
                              key=jax.ShapeDtypeStruct((2,), jnp.uint32))
  step = training.make_train_step(graphdef, optimizer, mesh, shard_rescaling=shard_rescaling)
  images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8, sharding=data)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)
  with jax.set_mesh(mesh):
    return step.jitted.trace(_abstract(state, replicated), images, labels).lower().compile()


def compile_certify_step(mesh: jax.sharding.Mesh, model_name: str, network: str,
                         batch: int) -> Any:
  """The compiled certification step: the frozen model's logits and their margins."""
  graphdef, state = nnx.split(_network(model_name, network, frozen=True))
  replicated, data = training.replicated_sharding(mesh), training.data_sharding(mesh)

  def certify_step(state, images, labels):
    return margins(nnx.merge(graphdef, state)(training.to_inputs(images)), labels)

  jitted = jax.jit(certify_step, in_shardings=(replicated, data, data), out_shardings=data)
  images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8, sharding=data)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)
  with jax.set_mesh(mesh):
    return jitted.trace(_abstract(state, replicated), images, labels).lower().compile()


def counts(compiled: Any) -> dict[str, Any]:
  """Per-device FLOPs, bytes accessed, peak memory and collectives of a compiled step."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"]),
          "peak_bytes": nets.peak_bytes(compiled), "collectives": collectives(compiled.as_text())}


def measure(topology: str, model_name: str, step: str, *, batch: int,
            shard_rescaling: bool | None = None) -> dict[str, Any]:
  """AOL and plain compiler counts of ``step`` (``'train'`` or ``'certify'``) and their ratios."""
  mesh = topology_mesh(topology)
  device = mesh.devices.flat[0]
  out: dict[str, Any] = {"topology": topology, "model": model_name, "step": step,
                         "batch": batch, "devices": mesh.devices.size,
                         "hosts": len({d.process_index for d in mesh.devices.flat}),
                         "device_kind": device.device_kind,
                         "hbm_bytes": HBM_GIB[device.device_kind] * 2**30}
  for network in ("aol", "plain"):
    start = time.perf_counter()
    if step == "train":
      compiled = compile_train_step(mesh, model_name, network, batch,
                                    shard_rescaling=shard_rescaling)
    else:
      compiled = compile_certify_step(mesh, model_name, network, batch)
    out[network] = {**counts(compiled), "compile_s": time.perf_counter() - start}
  for key in ("flops", "bytes_accessed", "peak_bytes"):
    out[f"{key}_ratio"] = out["aol"][key] / out["plain"][key]
  return out


def _collectives_cell(c: dict[str, dict[str, float]]) -> str:
  return ", ".join(f"{int(v['count'])} {k} {v['bytes'] / 2**20:.1f} MiB"
                   for k, v in sorted(c.items())) or "none"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES),
                 help="TPU topologies, e.g. v5e:2x4 (jax.experimental.topologies names)")
  p.add_argument("--models", nargs="+", choices=MODELS, default=["aol_small"])
  p.add_argument("--steps", nargs="+", choices=("train", "certify"), default=["train", "certify"])
  p.add_argument("--batch", type=int, default=256, help="global train batch")
  p.add_argument("--certify-batch", type=int, default=1024, help="global certification batch")
  p.add_argument("--replicated-rescaling", action="store_true",
                 help="compute the AOL rescaling on every device (make_train_step's "
                      "shard_rescaling=False), as before it was split")
  p.add_argument("--json", type=str, default=None, help="also write the results here")
  args = p.parse_args(argv)
  results, rows = [], []
  for topology in args.topologies:
    for model_name in args.models:
      for step in args.steps:
        r = measure(topology, model_name, step,
                    batch=args.batch if step == "train" else args.certify_batch,
                    shard_rescaling=False if args.replicated_rescaling else None)
        results.append(r)
        a, b = r["aol"], r["plain"]
        rows.append([
            topology, f"{r['devices']} ({r['hosts']})", model_name, f"{step} {r['batch']}",
            a["flops"] / 1e9, b["flops"] / 1e9, r["flops_ratio"],
            a["bytes_accessed"] / 1e9, b["bytes_accessed"] / 1e9, r["bytes_accessed_ratio"],
            f"{a['peak_bytes'] / 2**20:.0f} / {b['peak_bytes'] / 2**20:.0f}",
            r["peak_bytes_ratio"], f"{100 * a['peak_bytes'] / r['hbm_bytes']:.1f}%",
            _collectives_cell(a["collectives"]), _collectives_cell(b["collectives"]),
            f"{a['compile_s']:.0f} / {b['compile_s']:.0f}"])
        print(f"compiled {topology} {model_name} {step}", flush=True)
  table = timing.markdown_table(
      ["topology", "devices (hosts)", "model", "step, global batch", "AOL GFLOP/dev",
       "plain GFLOP/dev", "FLOPs AOL/plain", "AOL GB accessed/dev", "plain GB accessed/dev",
       "bytes AOL/plain", "peak MiB/dev AOL / plain", "peak AOL/plain", "AOL peak / HBM",
       "AOL collectives (per step)", "plain collectives", "compile s AOL / plain"], rows)
  notes = ["Compiler counts for one step, per device, from the TPU compiler (libtpu) on this "
           "machine; not timings. Collective sizes are the HLO output sizes. "
           + ("Rescaling replicated on every device (shard_rescaling=False)."
              if args.replicated_rescaling else
              "Rescaling split over 'data' (make_train_step's default on >1 device).")]
  return timing.report("AOL vs plain on TPU topologies (compiled, not run)", table, results,
                       module=__spec__.name, argv=argv, json_path=args.json, notes=notes)


if __name__ == "__main__":
  main()
