"""Compiler counts of the train and certification steps for TPU and GPU targets, on any machine.

JAX compiles for accelerators it does not have. For a TPU, ``libtpu`` (the ``tpu`` extra:
``jax[tpu]`` at the pinned jax) describes a slice by its topology name (``v5e:2x4``). For an
NVIDIA GPU, the CUDA plugin (the ``gpu-compile`` extra: the plugin at the pinned jax, without
the CUDA libraries, which compiling does not use) describes ``N`` GPUs from a device
description, ``benchmarks/targets/h100.txtpb`` (target ``h100:8``). Either way the devices
form the data mesh, the steps are traced with abstract, sharded arguments and compiled;
nothing runs. The CUDA plugin cannot start without a GPU, so this module sets
``JAX_PLATFORMS=cpu`` before JAX starts (the topology still compiles).

For AOL and for the same network with plain ``nnx.Conv`` / ``nnx.Linear``
(``benchmarks.nets.plain_net``) it reports, per device: FLOPs (``cost_analysis()``; the GPU
compiler gives none ahead of time), peak memory (``memory_analysis()``: arguments + outputs
+ temporaries - donated aliases) at a global batch and at 128 and 256 examples per device,
the ops of the optimized HLO at precision HIGHEST (:func:`highest_precision_ops`), the
matmul / convolution kernels the compiler chose (:func:`kernels`: cuBLAS, cuDNN and Triton
GEMM fusions on a GPU), the collectives with their sizes, and the compile time. These are
compiler counts, not timings.

The train step is ``aol_jax.training.make_train_step`` (augmentation on, SGD Nesterov with
the paper's schedule, state replicated, batch on ``'data'``). The certification step is the
frozen model's forward pass and :func:`aol_jax.margins` on a batch sharded on
``'data'`` (the core of ``certify_dataset``'s per-batch function; the rounding allowance
adds only elementwise work on ``(batch,)`` vectors).

  python -m benchmarks.compile_targets                 # AOL-Small on every target
  python -m benchmarks.compile_targets --targets v5e:2x4 --models aol_small aol_medium
  python -m benchmarks.compile_targets --targets h100:1 h100:8 --certify
"""

from __future__ import annotations

import os

# libtpu takes a lockfile against a second process on one TPU host; nothing runs on a TPU
# here, and other JAX processes on this machine load libtpu too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The CUDA plugin fails to start without a GPU and then offers no topology; with the CPU as
# the only platform it still compiles for one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import collections  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import aol_jax

from aol_jax import training  # noqa: E402
from aol_jax import margins  # noqa: E402
from aol_jax import freeze  # noqa: E402
from aol_jax.training import DATA_AXIS  # noqa: E402
from benchmarks import nets, timing  # noqa: E402

TARGETS = ("v5e:2x4", "v5e:4x4", "v5p:2x2x2", "v4:2x2x1", "h100:1", "h100:8")
MODELS = ("aol_small", "aol_medium", "aol_large")
PER_DEVICE_BATCHES = (128, 256)
# GPU targets: name -> the device description (a GpuTargetConfigProto text proto).
GPU_CONFIGS = {"h100": pathlib.Path(__file__).parent / "targets" / "h100.txtpb"}
# HBM per device (GiB), from the Cloud TPU system-architecture pages: v5e 16 GiB per chip,
# v5p 95 GiB per chip (one megacore device per chip). A v4 chip has 32 GiB for two
# TensorCores; its topology lists each core as a device, so each has half.
HBM_GIB = {"TPU v5 lite": 16, "TPU v5": 95, "TPU v4": 16}
# Per device, AOL over plain at global batch 256: FLOPs per model, and peak memory.
FLOPS_TARGETS = {"aol_small": 1.20, "aol_medium": 1.95}
MEMORY_TARGET = 1.30
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[\d,]*\](?:\{[^}]*\})?)\s+"
                         r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-done)?\(")
_SHAPE = re.compile(r"([a-z]+)(\d*)\[([\d,]*)\]")
# One HLO instruction per line; a dot or convolution states its operands' precision as
# operand_precision={lhs,rhs} (a cuDNN convolution keeps it on its custom call).
_HIGHEST = re.compile(r"operand_precision=\{[^}]*\bhighest\b", re.IGNORECASE)
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r'"kind":"(__[a-z_]*gemm[a-z_]*)"')


def highest_precision_ops(hlo: str) -> int:
  """How many instructions of an HLO text (``compiled.as_text()``) run at precision HIGHEST:
  dots, convolutions and the library calls they became (cuDNN), each counted once."""
  return sum(1 for line in hlo.splitlines() if _HIGHEST.search(line))


def kernels(hlo: str) -> dict[str, int]:
  """The matmul and convolution kernels of a compiled HLO: ``{kind: count}`` for library calls
  (``__cublas$gemm``, ``__cudnn$convForward``, ...) and GEMM fusions (``__triton_gemm``, ...)."""
  found = [t for t in _CUSTOM_CALL.findall(hlo) if "cublas" in t or "cudnn" in t]
  found += _FUSION_KIND.findall(hlo)
  return dict(sorted(collections.Counter(found).items()))


def _gpu_devices(name: str, count: int) -> list[Any]:
  from jax.experimental import topologies
  if name not in GPU_CONFIGS:
    raise ValueError(f"unknown GPU {name!r} in the target; known: {sorted(GPU_CONFIGS)}")
  try:
    return topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                        target_config=GPU_CONFIGS[name].read_text()).devices
  except NotImplementedError as e:
    raise RuntimeError(
        f"target {name}:{count} needs the CUDA plugin (pip install -c constraints.txt -e "
        "'.[gpu-compile]') and JAX_PLATFORMS=cpu set before JAX starts") from e


def target_devices(target: str) -> list[Any]:
  """The devices of a target: a TPU topology name (``v5e:2x4``) or ``<gpu>:<count>``."""
  kind, _, shape = target.partition(":")
  if kind in GPU_CONFIGS:
    if not shape.isdigit() or int(shape) < 1:
      raise ValueError(f"target {target!r}: a GPU target is <gpu>:<count>, e.g. h100:8")
    return _gpu_devices(kind, int(shape))
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology_name=target, platform="tpu").devices


def target_mesh(target: str) -> jax.sharding.Mesh:
  """A one-axis ``'data'`` mesh (explicit axis) over every device of a target."""
  devices = target_devices(target)
  axis_types = (jax.sharding.AxisType.Explicit,)
  if any(getattr(d, "core_on_chip", 0) for d in devices):
    # A v4 topology lists both TensorCores of a chip; jax.make_mesh accepts only one device
    # per chip (megacore), so the mesh takes the devices in their listed order.
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=axis_types)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=axis_types, devices=devices)


def hbm_bytes(device: Any) -> int:
  """A device's memory: a TPU's from :data:`HBM_GIB`, a GPU's from its description."""
  if device.platform == "tpu":
    return HBM_GIB[device.device_kind] * 2**30
  for path in GPU_CONFIGS.values():
    text = path.read_text()
    if f'device_description_str: "{device.device_kind}"' in text:
      return int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))
  raise ValueError(f"no memory size known for {device.device_kind!r}")


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
  """The AOL model or its plain twin, optionally frozen (call it under ``nnx.eval_shape``)."""
  model = aol_jax.MODELS[model_name](10, rngs=nnx.Rngs(0))
  if network == "plain":
    model = nets.plain_net(model)
  elif frozen:
    model = freeze(model)
  return model


def compile_train_step(mesh: jax.sharding.Mesh, model_name: str, network: str, batch: int, *,
                       split_rescaling: bool | None = None) -> Any:
  """The compiled ``make_train_step`` of ``network`` (``'aol'`` or ``'plain'``), its state
  from ``create_train_state`` (abstract: shapes only)."""
  optimizer = training.make_optimizer(training.paper_schedule(1e-3, 100, 10))
  graphdef, state = jax.eval_shape(lambda: training.create_train_state(
      _network(model_name, network), optimizer, key=0, mesh=mesh,
      split_rescaling=split_rescaling))
  replicated, data = training.replicated_sharding(mesh), training.data_sharding(mesh)
  step = training.make_train_step(graphdef, optimizer, mesh)
  images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8, sharding=data)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)
  with jax.set_mesh(mesh):
    return step.jitted.trace(_abstract(state, replicated), images, labels).lower().compile()


def compile_certify_step(mesh: jax.sharding.Mesh, model_name: str, network: str,
                         batch: int) -> Any:
  """The compiled certification step: the frozen model's logits and their margins."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: _network(model_name, network, frozen=True)))
  replicated, data = training.replicated_sharding(mesh), training.data_sharding(mesh)

  def certify_step(state, images, labels):
    return margins(nnx.merge(graphdef, state)(training.to_inputs(images)), labels)

  jitted = jax.jit(certify_step, in_shardings=(replicated, data, data), out_shardings=data)
  images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8, sharding=data)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)
  with jax.set_mesh(mesh):
    return jitted.trace(_abstract(state, replicated), images, labels).lower().compile()


def counts(compiled: Any) -> dict[str, Any]:
  """Per-device FLOPs (``None`` where the compiler gives no cost analysis, as for a GPU ahead
  of time), bytes accessed, peak memory, HIGHEST-precision ops, kernels and collectives."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  return {"flops": float(cost["flops"]) if cost else None,
          "bytes_accessed": float(cost["bytes accessed"]) if cost else None,
          "peak_bytes": nets.peak_bytes(compiled), "highest_ops": highest_precision_ops(hlo),
          "kernels": kernels(hlo), "collectives": collectives(hlo)}


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a / b


def measure_train(target: str, model_name: str, *, batch: int,
                  per_device_batches: Sequence[int] = PER_DEVICE_BATCHES,
                  split_rescaling: bool | None = None) -> dict[str, Any]:
  """AOL and plain counts of the train step at global ``batch``, and their peak memory at
  each of ``per_device_batches`` examples per device."""
  mesh = target_mesh(target)
  device, n = mesh.devices.flat[0], mesh.devices.size
  out: dict[str, Any] = {"target": target, "model": model_name, "step": "train",
                         "batch": batch, "devices": n,
                         "hosts": len({d.process_index for d in mesh.devices.flat}),
                         "device_kind": device.device_kind, "hbm_bytes": hbm_bytes(device)}
  for network in ("aol", "plain"):
    start = time.perf_counter()
    compiled = compile_train_step(mesh, model_name, network, batch,
                                  split_rescaling=split_rescaling)
    out[network] = {**counts(compiled), "compile_s": time.perf_counter() - start,
                    "peak_bytes_per_device_batch": {}}
    for per_device in per_device_batches:
      compiled = compile_train_step(mesh, model_name, network, per_device * n,
                                    split_rescaling=split_rescaling)
      out[network]["peak_bytes_per_device_batch"][per_device] = nets.peak_bytes(compiled)
  for key in ("flops", "bytes_accessed", "peak_bytes"):
    out[f"{key}_ratio"] = _ratio(out["aol"][key], out["plain"][key])
  out["peak_ratio_per_device_batch"] = {
      k: v / out["plain"]["peak_bytes_per_device_batch"][k]
      for k, v in out["aol"]["peak_bytes_per_device_batch"].items()}
  return out


def measure_certify(target: str, model_name: str, *, batch: int) -> dict[str, Any]:
  """Counts of the AOL certification step (its frozen kernels cost what plain kernels cost)."""
  mesh = target_mesh(target)
  start = time.perf_counter()
  compiled = compile_certify_step(mesh, model_name, "aol", batch)
  return {"target": target, "model": model_name, "step": "certify", "batch": batch,
          "devices": mesh.devices.size, "hbm_bytes": hbm_bytes(mesh.devices.flat[0]),
          "aol": {**counts(compiled), "compile_s": time.perf_counter() - start}}


def _collectives_cell(c: dict[str, dict[str, float]]) -> str:
  return ", ".join(f"{int(v['count'])} {k} {v['bytes'] / 2**20:.1f} MiB"
                   for k, v in sorted(c.items())) or "none"


def _kernels_cell(k: dict[str, int]) -> str:
  return ", ".join(f"{v} {name.strip('_')}" for name, v in k.items()) or "-"


def _gflop(x: float | None) -> str:
  return "n/a" if x is None else f"{x / 1e9:.3g}"


def _met(ratio: float | None, target: float | None) -> str:
  if ratio is None or target is None:
    return "n/a"
  return f"{'yes' if ratio <= target else 'no'} (<= {target})"


def _mib(x: float) -> str:
  return f"{x / 2**20:.0f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--targets", nargs="+", default=list(TARGETS),
                 help="TPU topologies (jax.experimental.topologies names, e.g. v5e:2x4) or "
                      "GPU targets <gpu>:<count> with <gpu> in " + ", ".join(GPU_CONFIGS))
  p.add_argument("--models", nargs="+", choices=MODELS, default=["aol_small"])
  p.add_argument("--batch", type=int, default=256, help="global train batch")
  p.add_argument("--per-device-batches", nargs="*", type=int, default=list(PER_DEVICE_BATCHES),
                 help="also the train step's peak memory at these examples per device")
  p.add_argument("--certify", action="store_true",
                 help="also compile the AOL certification step (table 2)")
  p.add_argument("--certify-batch", type=int, default=1024, help="global certification batch")
  p.add_argument("--replicated-rescaling", action="store_true",
                 help="compute the AOL rescaling on every device (create_train_state's "
                      "split_rescaling=False), as before it was split")
  p.add_argument("--json", type=str, default=None, help="also write the results here")
  args = p.parse_args(argv)
  for b in [args.batch, args.certify_batch, *args.per_device_batches]:
    if b < 1:
      p.error(f"batches must be positive, got {b}")
  results, rows, certify_rows = [], [], []
  per_device = args.per_device_batches
  for target in args.targets:
    for model_name in args.models:
      r = measure_train(target, model_name, batch=args.batch, per_device_batches=per_device,
                        split_rescaling=False if args.replicated_rescaling else None)
      results.append(r)
      a, b = r["aol"], r["plain"]
      max_peak = max([a["peak_bytes"], *a["peak_bytes_per_device_batch"].values()])
      rows.append([
          target, f"{r['devices']} ({r['hosts']})", model_name,
          f"{_gflop(a['flops'])} / {_gflop(b['flops'])}",
          "n/a" if r["flops_ratio"] is None else r["flops_ratio"],
          _met(r["flops_ratio"], FLOPS_TARGETS.get(model_name)),
          f"{_mib(a['peak_bytes'])} / {_mib(b['peak_bytes'])}", r["peak_bytes_ratio"],
          _met(r["peak_bytes_ratio"], MEMORY_TARGET),
          *[f"{_mib(a['peak_bytes_per_device_batch'][k])} / "
            f"{_mib(b['peak_bytes_per_device_batch'][k])} = "
            f"{r['peak_ratio_per_device_batch'][k]:.2f}" for k in per_device],
          f"{100 * max_peak / r['hbm_bytes']:.1f}%",
          f"{a['highest_ops']} / {b['highest_ops']}",
          _kernels_cell(a["kernels"]), _kernels_cell(b["kernels"]),
          _collectives_cell(a["collectives"]), _collectives_cell(b["collectives"]),
          f"{a['compile_s']:.0f} / {b['compile_s']:.0f}"])
      print(f"compiled {target} {model_name} train", flush=True)
      if args.certify:
        c = measure_certify(target, model_name, batch=args.certify_batch)
        results.append(c)
        certify_rows.append([target, model_name, args.certify_batch, _gflop(c["aol"]["flops"]),
                             _mib(c["aol"]["peak_bytes"]),
                             f"{100 * c['aol']['peak_bytes'] / c['hbm_bytes']:.1f}%",
                             c["aol"]["highest_ops"], _collectives_cell(c["aol"]["collectives"]),
                             f"{c['aol']['compile_s']:.0f}"])
  table = timing.markdown_table(
      ["target", "devices (hosts)", "model", f"GFLOP/dev AOL / plain (batch {args.batch})",
       "FLOPs AOL/plain", "FLOPs target", f"peak MiB/dev AOL / plain (batch {args.batch})",
       "peak AOL/plain", f"peak <= {MEMORY_TARGET}",
       *[f"peak MiB/dev at {k}/dev, AOL / plain = ratio" for k in per_device],
       "AOL max peak / HBM", "HIGHEST ops AOL / plain", "AOL GEMM/conv kernels",
       "plain GEMM/conv kernels", "AOL collectives", "plain collectives",
       "compile s AOL / plain"], rows)
  if certify_rows:
    table += "\n\nCertification step (AOL, frozen):\n\n" + timing.markdown_table(
        ["target", "model", "global batch", "GFLOP/dev", "peak MiB/dev", "peak / HBM",
         "HIGHEST ops", "collectives", "compile s"], certify_rows)
  notes = ["Train step compiled, not run, for each target on this machine (libtpu for TPUs, "
           "the CUDA plugin for GPUs); per device. The GPU compiler gives no FLOPs ahead of "
           "time (n/a). Collective sizes are the HLO output sizes. "
           + ("Rescaling replicated on every device (split_rescaling=False)."
              if args.replicated_rescaling else
              "Rescaling split over 'data' (create_train_state's default on >1 device).")]
  return timing.report("AOL vs plain compiled for accelerator targets (not run)", table,
                       results, module=__spec__.name, argv=argv, json_path=args.json,
                       notes=notes)


if __name__ == "__main__":
  main()
