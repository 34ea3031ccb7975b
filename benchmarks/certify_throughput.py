"""Images per second of ``certify_dataset`` against a bare jitted forward pass.

Both run the same frozen model over the same images in batches of the same size; the
forward baseline is one jitted ``model(x)`` per batch with nothing else. A
``certify_dataset`` call is timed whole, as a user sees it: freezing, the rounding terms,
compilation on the first call, the per-batch margins, allowances and
certificates. Target: certify / forward throughput >= 0.95.

  python -m benchmarks.certify_throughput --size paper
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import timing

TARGET = 0.95
# Images certified per timed call, per size (batch size from benchmarks.nets.SIZES).
NUM_IMAGES = {"tiny": 16, "quick": 1024, "paper": 2560}


def run(size_name: str, *, warmup: int, repeats: int) -> dict[str, Any]:
  import jax
  import numpy as np
  from flax import nnx
  from aol_jax import freeze
  from aol_jax import certify_dataset
  from benchmarks import nets

  size = nets.SIZES[size_name]
  n, b = NUM_IMAGES[size_name], size.batch
  frozen = freeze(nets.aol_net(size))
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(n, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, n)
  forward = nets.forward(frozen)

  def bare():
    out = [forward(images[i:i + b]) for i in range(0, n, b)]
    return jax.block_until_ready(out)

  # The forward pass certify_dataset runs: logits and every activation's norm.
  graphdef, state = nnx.split(frozen)
  with_norms = jax.jit(lambda state, x: nnx.merge(graphdef, state).logits_and_activation_norm(x))

  def tracked():
    out = [with_norms(state, images[i:i + b]) for i in range(0, n, b)]
    return jax.block_until_ready(out)

  def cert():
    return certify_dataset(frozen, images, labels, batch_size=b)

  one_batch = timing.time_interleaved(
      {"certify, one batch": lambda: certify_dataset(frozen, images[:b], labels[:b],
                                                      batch_size=b),
       "forward, one batch": lambda: forward(images[:b])}, warmup=1, repeats=repeats)
  stats = timing.time_interleaved({"certify_dataset": cert, "forward": bare,
                                   "forward with activation norms": tracked},
                                  warmup=warmup, repeats=repeats)
  ips = {k: n / v["median"] for k, v in stats.items()}
  # Both passes see the same model and images: labelled with the bare forward pass's
  # predictions, certify_dataset finds every image correctly classified.
  predictions = np.concatenate(jax.device_get(bare())).argmax(-1)
  check = certify_dataset(frozen, images, predictions, batch_size=b)
  return {"size": size_name, "net": vars(size), "num_images": n, "batch_size": b,
          "certified_examples": check.num_examples,
          "agrees_with_forward": check.num_correct / check.num_examples,
          "stats": stats, "one_batch": one_batch, "images_per_s": ips,
          "throughput_ratio": ips["certify_dataset"] / ips["forward"],
          "throughput_ratio_best": stats["forward"]["min"] / stats["certify_dataset"]["min"],
          "throughput_ratio_cpu": timing.ratio(stats, "forward", "certify_dataset", "cpu_median")}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = timing.parser(__doc__.splitlines()[0]).parse_args(argv)
  timing.set_threads(args.threads)
  warmup, repeats = timing.warmup_and_repeats(
      args, {"tiny": (1, 1), "quick": (1, 5), "paper": (1, 3)})
  r = run(args.size, warmup=warmup, repeats=repeats)
  s, ob = r["stats"], r["one_batch"]
  rows = [["certify_dataset", r["images_per_s"]["certify_dataset"],
           s["certify_dataset"]["median"], ob["certify, one batch"]["median"] * 1e3],
          ["bare jitted forward", r["images_per_s"]["forward"], s["forward"]["median"],
           ob["forward, one batch"]["median"] * 1e3],
          ["jitted logits_and_activation_norm", r["images_per_s"]["forward with activation norms"],
           s["forward with activation norms"]["median"], ""]]
  table = timing.markdown_table(
      ["pass", "images/s", f"time for {r['num_images']} images (s)",
       f"one batch of {r['batch_size']} (ms)"], rows)
  met = r["throughput_ratio"] >= TARGET
  notes = [f"certify / forward throughput: {r['throughput_ratio']:.3f} (median wall), "
           f"{r['throughput_ratio_best']:.3f} (best of {repeats}), "
           f"{r['throughput_ratio_cpu']:.3f} (median CPU time); target >= {TARGET}: "
           f"{'met' if met else 'not met'}. Frozen {r['net']['channels']}-channel AOL net, "
           f"batch {r['batch_size']}; warm-up {warmup}, {repeats} interleaved repeats. The "
           "one-batch column is a certify_dataset call on a single batch, i.e. its fixed "
           "per-call cost (freeze, rounding terms, the zero-image pass) plus one batch."]
  return timing.report(f"Certification throughput ({args.size})", table, r,
                       module=__spec__.name, argv=argv, json_path=args.json, notes=notes)


if __name__ == "__main__":
  main()
