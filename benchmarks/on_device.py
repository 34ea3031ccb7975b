"""The accelerator check: one table of ratios measured on one device, in one process.

Rows (``--size paper``: the paper's 32x32x3 images, batch 256):

* the train step of AOL-Small and of AOL-Medium (``aol_jax.aol_convnet``, widths 16 and 32)
  against the same network with plain ``nnx.Conv`` / ``nnx.Linear`` (``benchmarks.nets``),
  with every AOL layer's ``gram_precision`` 'default' and then 'highest';
* ``aol_jax.certify_dataset`` (the library's default rounding,
  ``aol_jax.certification.DEFAULT_ROUNDING``) against a bare jitted forward pass of the same
  frozen AOL-Small, images per second, after one warm-up call of each;
* the radii of the artifact of ``aol_jax.export_certified`` called
  (``jax.export.deserialize(...).call(...)``) on this device against the artifact exported
  from the same weights in a CPU-only process: the largest relative difference of the radii
  and the agreement of the predictions. Whether this device's artifact runs on the CPU as it
  is is said under the table.

Every timing is a ratio of two things interleaved in this process (``benchmarks.timing``).
Run through ``benchmarks/on_device.sh`` (the device image's own jax, this checkout on
``PYTHONPATH``); ``--platform=cpu --size=tiny`` is the same script on a CPU in seconds.

  benchmarks/on_device.sh                 # on a GPU: about 5 minutes on one H100
  benchmarks/on_device.sh --platform=cpu --size=tiny
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

from benchmarks import timing

PRECISIONS = ("default", "highest")
# Per size: the two networks (benchmarks.nets.NetSize fields), certified and exported images.
SIZES = {
    "tiny": dict(batch=8, small=dict(channels=16, width=2, conv_depth=2, dense_depth=2),
                 medium=dict(channels=16, width=4, conv_depth=2, dense_depth=2),
                 certify_images=16, radii_images=16),
    "paper": dict(batch=256, small=dict(channels=192, width=16, conv_depth=12, dense_depth=14),
                  medium=dict(channels=192, width=32, conv_depth=12, dense_depth=14),
                  certify_images=2560, radii_images=512),
}
REPEATS = {"tiny": 1, "paper": 10}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--platform", choices=("gpu", "cpu"), default="gpu",
                 help="gpu: the CUDA device (and the host CPU for the artifact's check)")
  p.add_argument("--size", choices=tuple(SIZES), default="paper")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats (median kept)")
  p.add_argument("--json", default=None, help="also write the results here")
  p.add_argument("--cpu-side", default=None, help=argparse.SUPPRESS)  # internal: see _cpu_side
  return p.parse_args(argv)


def _net(size: str, which: str, seed: int = 0):
  from benchmarks import nets
  cfg = SIZES[size]
  shape = nets.NetSize(batch=cfg["batch"], **cfg[which])
  return shape, nets.aol_net(shape, seed=seed)


def _set_gram_precision(model, precision: str) -> None:
  """Every AOL layer's static ``gram_precision`` (read when the step is traced)."""
  from flax import nnx
  import aol_jax
  for _, layer in nnx.iter_modules(model):
    if isinstance(layer, (aol_jax.AOLConv, aol_jax.AOLDense)):
      layer.gram_precision = precision


def train_rows(size: str, repeats: int) -> list[dict[str, Any]]:
  from benchmarks import nets
  rows = []
  for which in ("small", "medium"):
    shape, model = _net(size, which)
    x, y = nets.batch(shape)
    plain = nets.train_step(nets.plain_net(model), x, y)
    for precision in PRECISIONS:
      _, model = _net(size, which)  # a fresh copy: a train step donates the model's arrays
      _set_gram_precision(model, precision)
      aol = nets.train_step(model, x, y)
      stats = timing.time_interleaved({"aol": lambda: aol(x, y), "plain": lambda: plain(x, y)},
                                      warmup=2, repeats=repeats)
      rows.append(dict(what=f"AOL-{which.capitalize()} train step, batch {shape.batch}, "
                            f"gram_precision={precision!r}: ms AOL / plain",
                       value=1e3 * stats["aol"]["median"], base=1e3 * stats["plain"]["median"],
                       ratio=timing.ratio(stats, "aol", "plain"),
                       flops_ratio=nets.flops(aol.compiled) / nets.flops(plain.compiled),
                       memory_ratio=nets.peak_bytes(aol.compiled) / nets.peak_bytes(plain.compiled)))
  return rows


def certify_row(size: str, repeats: int) -> dict[str, Any]:
  import jax
  import numpy as np
  import aol_jax
  from aol_jax.certification import DEFAULT_ROUNDING
  from benchmarks import nets
  shape, model = _net(size, "small")
  frozen = aol_jax.freeze(model)
  n, b = SIZES[size]["certify_images"], shape.batch
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(n, 32, 32, 3)).astype(np.float32)
  forward = nets.forward(frozen)

  def bare():
    return jax.block_until_ready([forward(images[i:i + b]) for i in range(0, n, b)])

  labels = np.concatenate(jax.device_get(bare())).argmax(-1)
  result = {}

  def certify():
    result["r"] = aol_jax.certify_dataset(frozen, images, labels, batch_size=b)
    return result["r"]

  start = time.perf_counter()
  certify()  # compiles and bounds the layers (memoised): then the steady state is timed
  first = time.perf_counter() - start
  stats = timing.time_interleaved({"certify": certify, "forward": bare}, warmup=1,
                                  repeats=max(1, repeats // 3))
  r = result["r"]
  return dict(what=f"certify_dataset ({DEFAULT_ROUNDING}) / bare forward, AOL-Small, "
                   f"{n} images, batch {b}: images/s",
              value=n / stats["certify"]["median"], base=n / stats["forward"]["median"],
              ratio=timing.ratio(stats, "forward", "certify"), first_call_s=first,
              agrees_with_forward=r.num_correct / r.num_examples, rounding=r.rounding)


def _model_and_images(size: str, n: int):
  """AOL-Small (perturbed: away from its identity initialisation) and images in [0, 1]."""
  import jax
  import numpy as np
  from flax import nnx
  _, model = _net(size, "small")
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  key = jax.random.key(1)
  leaves = [w + 0.05 * jax.random.normal(jax.random.fold_in(key, i), w.shape, w.dtype)
            if w.ndim >= 2 else w for i, w in enumerate(leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  images = np.random.default_rng(2).uniform(size=(n, 32, 32, 3)).astype(np.float32)
  return model, images


def _export_and_call(model, images, path: str):
  """``export_certified`` to ``path``, then the artifact deserialised and called here."""
  import jax
  import numpy as np
  import aol_jax
  aol_jax.export_certified(model, path, input_shape=images.shape[1:])
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  pred, radius = exported.call(images)
  return exported, np.asarray(pred), np.asarray(radius)


def _save_params(model, path: str) -> None:
  import jax
  import numpy as np
  from flax import nnx
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  np.savez(path, *[np.asarray(w) for w in leaves])


def _load_params(model, path: str) -> None:
  import jax
  import numpy as np
  from flax import nnx
  params = nnx.state(model, nnx.Param)
  treedef = jax.tree.structure(params)
  with np.load(path) as data:
    leaves = [data[f"arr_{i}"] for i in range(len(data.files))]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))


def _cpu_side(size: str, workdir: str) -> None:
  """In a CPU-only process: the same weights and images, exported and called on the CPU."""
  import numpy as np
  _, model = _net(size, "small")
  _load_params(model, os.path.join(workdir, "params.npz"))
  images = np.load(os.path.join(workdir, "images.npy"))
  _, pred, radius = _export_and_call(model, images, os.path.join(workdir, "cpu.export"))
  np.savez(os.path.join(workdir, "cpu.npz"), pred=pred, radius=radius)


def radii_row(size: str) -> dict[str, Any]:
  import jax
  import numpy as np
  model, images = _model_and_images(size, SIZES[size]["radii_images"])
  backend = jax.default_backend()
  with tempfile.TemporaryDirectory() as workdir:
    exported, pred, radius = _export_and_call(model, images, os.path.join(workdir, "dev.export"))
    try:  # the same artifact on the host CPU, in this process
      with jax.default_device(jax.devices("cpu")[0]):
        exported.call(jax.device_put(images, jax.devices("cpu")[0]))
      on_cpu = "yes"
    except Exception as err:  # noqa: BLE001  (reported, not raised)
      on_cpu = f"no ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    _save_params(model, os.path.join(workdir, "params.npz"))
    np.save(os.path.join(workdir, "images.npy"), images)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-m", "benchmarks.on_device", "--size", size,
                    "--cpu-side", workdir], check=True, env=env)
    with np.load(os.path.join(workdir, "cpu.npz")) as cpu:
      cpu_pred, cpu_radius = cpu["pred"], cpu["radius"]
  both = (radius > 0) & (cpu_radius > 0)
  rel = np.abs(radius.astype(np.float64) - cpu_radius) / np.maximum(radius, cpu_radius)
  return dict(what=f"exported artifact, {len(images)} images: max relative difference of "
                   f"radii, {backend} / cpu", value=float(rel[both].max()) if both.any() else 0.0,
              base=None, ratio=None, backend=backend, images=len(images),
              predictions_agree=float(np.mean(pred == cpu_pred)),
              certified_here=int(np.sum(radius > 0)), certified_cpu=int(np.sum(cpu_radius > 0)),
              mean_radius=float(radius.mean()), artifact_runs_on_cpu=on_cpu)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  args = parse(argv)
  if args.cpu_side:
    _cpu_side(args.size, args.cpu_side)
    return None
  # Said before JAX starts: the device (and the CPU, for the artifact's check on it).
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if args.platform == "gpu" else "cpu"
  repeats = REPEATS[args.size] if args.repeats is None else args.repeats
  start = time.perf_counter()
  rows, errors = [], []
  for name, section in (("train steps", lambda: train_rows(args.size, repeats)),
                        ("certification", lambda: [certify_row(args.size, repeats)]),
                        ("exported radii", lambda: [radii_row(args.size)])):
    begin = time.perf_counter()
    try:
      rows += section()
    except Exception as err:  # noqa: BLE001  (one failed section keeps the others' rows)
      errors.append(f"{name}: {type(err).__name__}: {err}")
      traceback.print_exc()
    print(f"[on_device] {name}: {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)
  fmt = lambda v, spec: "" if v is None else format(v, spec)
  table = timing.markdown_table(
      ["measurement", "value", "baseline", "ratio", "FLOPs ratio", "peak memory ratio"],
      [[r["what"], fmt(r["value"], ".4g"), fmt(r["base"], ".4g"), fmt(r["ratio"], ".3f"),
        fmt(r.get("flops_ratio"), ".3f"), fmt(r.get("memory_ratio"), ".3f")] for r in rows])
  notes = [f"{r['what'].split(':')[0]}: predictions agree on {100 * r['predictions_agree']:.1f} %, "
           f"certified (radius > 0) {r['certified_here']} here and {r['certified_cpu']} on the "
           f"cpu, mean radius {r['mean_radius']:.3g}; this device's artifact runs on the cpu: "
           f"{r['artifact_runs_on_cpu']}." for r in rows if "artifact_runs_on_cpu" in r]
  notes += [f"certify_dataset's first call (compile, kernel bounds): {r['first_call_s']:.1f} s; "
            f"its predictions agree with the bare forward pass on "
            f"{100 * r['agrees_with_forward']:.1f} %." for r in rows if "first_call_s" in r]
  notes += [f"Total {time.perf_counter() - start:.0f} s; {repeats} timed repeats per train-step "
            f"row (median), {max(1, repeats // 3)} per certification row."]
  notes += [f"FAILED section: {e}" for e in errors]
  payload = timing.report(f"Accelerator check ({args.platform}, {args.size})", table, rows,
                          module="benchmarks.on_device", argv=argv, json_path=args.json,
                          notes=notes)
  if errors:
    raise SystemExit(1)
  return payload


if __name__ == "__main__":
  main()
