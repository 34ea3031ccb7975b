"""Certification against a bare forward pass: images per second on this CPU, and compiled
FLOPs and memory for TPU and GPU targets.

Both run the same frozen model on the same images in batches of the same size. The forward
baseline is one jitted ``model(x)`` per batch. The certified side is the per-batch step of
the default mode (``aol_jax.certification.DEFAULT_ROUNDING``): the certified evaluation with
its per-example rounding bounds and the bisection of every radius
(``aol_jax.certified_radii``'s step), timed per batch (steady state) and as a whole
``certified_radii`` call over every image (a user's view: the one-off freezing, kernel
bounds and compilation included). Target: per-batch time ratio <= 1.5.

With ``--targets`` (e.g. ``v5e:2x4 h100:8``) the same two steps are compiled for those
devices at global batch ``--batch`` and their per-device FLOPs and peak memory compared
(the mode refuses to run on a TPU, whose float32 'highest' it does not bound: its counts are
what it would cost there).

  python -m benchmarks.certify_throughput --size paper
  JAX_PLATFORMS=cpu python -m benchmarks.certify_throughput --size paper --targets v5e:2x4 h100:8
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import timing

TARGET = 1.5
# Images per whole-call timing and the batch size, per size.
NUM_IMAGES = {"tiny": 16, "quick": 256, "paper": 1024}
BATCH = {"tiny": 8, "quick": 64, "paper": 128}


def _model(size_name: str):
  from flax import nnx
  import aol_jax
  sizes = {} if size_name == "paper" else dict(channels=32, conv_depth=2, dense_depth=3)
  return aol_jax.aol_small(10, rngs=nnx.Rngs(0), **sizes)


def run(size_name: str, *, warmup: int, repeats: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  import aol_jax
  from aol_jax.certification import prepare

  model = _model(size_name)
  n, b = NUM_IMAGES[size_name], BATCH[size_name]
  images = np.random.default_rng(0).uniform(size=(n, 32, 32, 3)).astype(np.float32)
  prepared = prepare(model, images.shape[1:])
  state = jax.device_put(prepared.state)
  forward = jax.jit(lambda s, v: nnx.merge(prepared.graphdef, s)(v))
  shift = jnp.zeros(b, jnp.float32)
  step = jax.jit(lambda s, v: prepared.radii(s, v, shift)[:3])
  batch = jnp.asarray(images[:b])
  with prepared.mode.arithmetic():
    # The two sides compute the same network: the certified step's predictions are the
    # forward pass's.
    agrees = float(np.mean(np.asarray(step(state, batch)[0])
                           == np.argmax(np.asarray(forward(state, batch)), axis=-1)))
    per_batch = timing.time_interleaved(
        {"certified step": lambda: step(state, batch), "forward": lambda: forward(state, batch)},
        warmup=max(warmup, 1), repeats=repeats)
    whole = timing.time_interleaved(
        {"certified_radii": lambda: aol_jax.certified_radii(model, images, batch_size=b),
         "forward, every batch": lambda: [forward(state, images[i:i + b])
                                          for i in range(0, n, b)]},
        warmup=warmup, repeats=repeats)
  return {"size": size_name, "num_images": n, "batch_size": b, "agrees_with_forward": agrees,
          "rounding": prepared.mode.name, "per_batch": per_batch, "whole": whole,
          "ratio": timing.ratio(per_batch, "certified step", "forward"),
          "ratio_whole": timing.ratio(whole, "certified_radii", "forward, every batch")}


def compile_counts(size_name: str, targets: Sequence[str], batch: int) -> list[dict[str, Any]]:
  """Per-device FLOPs and peak memory of the certified step and of the forward pass."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from aol_jax.certification import prepare
  from benchmarks import compile_targets

  prepared = prepare(_model(size_name), (32, 32, 3))
  rows = []
  for target in targets:
    mesh = compile_targets.target_mesh(target)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype,
                                                        sharding=replicated), prepared.state)
    x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32, sharding=data)
    shift = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=data)
    steps = {"certified": lambda s, v, h: prepared.radii(s, v, h)[:3],
             "forward": lambda s, v, h: nnx.merge(prepared.graphdef, s)(v)}
    row = {"target": target, "batch": batch}
    with jax.set_mesh(mesh), prepared.mode.arithmetic():
      for name, fn in steps.items():
        compiled = jax.jit(fn).trace(state, x, shift).lower().compile()
        row[name] = compile_targets.counts(compiled)
    for key in ("flops", "peak_bytes"):
      a, p = row["certified"][key], row["forward"][key]
      row[f"{key}_ratio"] = None if a is None or p is None else a / p
    rows.append(row)
  return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = timing.parser(__doc__.splitlines()[0])
  p.add_argument("--targets", nargs="*", default=[], help="TPU topologies or <gpu>:<count>")
  p.add_argument("--batch", type=int, default=256, help="global batch of the compiled steps")
  args = timing.parse(p, argv)
  warmup, repeats = timing.warmup_and_repeats(
      args, {"tiny": (1, 1), "quick": (1, 5), "paper": (1, 5)})
  r = run(args.size, warmup=warmup, repeats=repeats)
  pb = r["per_batch"]
  rows = [["certified step (default mode)", r["batch_size"] / pb["certified step"]["median"],
           1e3 * pb["certified step"]["median"]],
          ["forward", r["batch_size"] / pb["forward"]["median"], 1e3 * pb["forward"]["median"]]]
  table = timing.markdown_table(["pass", "images/s", f"ms per batch of {r['batch_size']}"],
                                rows)
  notes = [f"certified step / forward, per batch: {r['ratio']:.2f} (target <= {TARGET}: "
           f"{'met' if r['ratio'] <= TARGET else 'not met'}); a whole certified_radii call "
           f"over {r['num_images']} images / the forward passes: {r['ratio_whole']:.2f} "
           "(freezing, kernel bounds and compilation included). Rounding mode "
           f"{r['rounding']!r}."]
  if args.targets:
    r["compiled"] = compile_counts(args.size, args.targets, args.batch)
    gflop = lambda v: "n/a" if v is None else f"{v / 1e9:.2f}"
    ratio = lambda v: "n/a" if v is None else f"{v:.2f}"
    table += "\n\n" + timing.markdown_table(
        ["target", "global batch", "GFLOP certified / forward", "FLOPs ratio",
         "peak MiB certified / forward", "peak ratio"],
        [[c["target"], c["batch"],
          f"{gflop(c['certified']['flops'])} / {gflop(c['forward']['flops'])}",
          ratio(c["flops_ratio"]),
          f"{c['certified']['peak_bytes'] / 2**20:.0f} / {c['forward']['peak_bytes'] / 2**20:.0f}",
          ratio(c["peak_bytes_ratio"])] for c in r["compiled"]])
  return timing.report(f"Certification throughput ({args.size})", table, r,
                       module=__spec__.name, argv=argv, json_path=args.json, notes=notes)


if __name__ == "__main__":
  main()
