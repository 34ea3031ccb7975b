"""Train-step time and peak memory of AOL-Small against the same network with plain layers.

The AOL rescaling does not depend on the batch, so the plain network (``nnx.Conv`` /
``nnx.Linear`` in the same structure, same shapes, no rescaling) is the physical limit.
Targets at batch 256: time ratio <= 1.10, peak-memory ratio <= 1.30.

  python -m benchmarks.aol_vs_plain --size paper
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import timing

TARGET, MEMORY_TARGET = 1.10, 1.30


def run(size_name: str, *, warmup: int, repeats: int) -> dict[str, Any]:
  from benchmarks import nets
  size = nets.SIZES[size_name]
  x, y = nets.batch(size)
  aol = nets.aol_net(size)
  models = {"aol": aol, "plain": nets.plain_net(aol)}
  steps = {name: nets.train_step(m, x, y) for name, m in models.items()}
  stats = timing.time_interleaved({n: (lambda s=s: s(x, y)) for n, s in steps.items()},
                                  warmup=warmup, repeats=repeats)
  memory = {n: nets.peak_bytes(s.compiled) for n, s in steps.items()}
  flops = {n: nets.flops(s.compiled) for n, s in steps.items()}
  return {"size": size_name, "net": vars(size), "stats": stats, "peak_bytes": memory,
          "flops": flops, "flops_ratio": {n: flops[n] / flops["plain"] for n in models},
          "cpu_time_ratio": {n: timing.ratio(stats, n, "plain", "cpu_median") for n in models},
          "time_ratio": {n: timing.ratio(stats, n, "plain") for n in models},
          "time_ratio_min": {n: stats[n]["min"] / stats["plain"]["min"] for n in models},
          "memory_ratio": {n: memory[n] / memory["plain"] for n in models}}


def memory_variants(size_name: str) -> dict[str, dict[str, float]]:
  """Peak memory and FLOPs (compile only, no timing) of variants of the AOL step.

  They locate the extra memory: which part of the backward pass through the AOL factors
  XLA keeps live. ``stop_gradient`` variants change the gradient (the factors are then
  treated as constants), so they are diagnostics, not candidates.
  """
  import jax
  from aol_jax._src import rescaling
  from benchmarks import gram_variants as gv
  from benchmarks import nets

  def frozen_factors(factors):
    def rescale(kernel, eps=1e-6):
      d = jax.lax.stop_gradient(factors(kernel, eps=eps))
      return kernel * d[:, None]
    return rescale

  sg_dense, sg_conv = frozen_factors(rescaling.dense_factors), frozen_factors(
      rescaling.conv_factors)
  # eps stays a Python float (the core's factors take it as a static argument).
  checkpointed = lambda f: (
      lambda kernel, eps=1e-6: jax.checkpoint(lambda k: f(k, eps=eps))(kernel))
  size = nets.SIZES[size_name]
  x, y = nets.batch(size)
  aol = nets.aol_net(size)
  proto = lambda conv, dense: gv.prototype_net(aol, conv_rescale=conv, dense_rescale=dense)
  core_conv, core_dense = rescaling.rescale_conv, rescaling.rescale_dense
  variants = {
      "AOL (core)": aol,
      "core rescaling under jax.checkpoint": proto(checkpointed(core_conv),
                                                   checkpointed(core_dense)),
      "stop_gradient(d) in dense layers": proto(core_conv, sg_dense),
      "stop_gradient(d) in conv layers": proto(sg_conv, core_dense),
      "stop_gradient(d) everywhere": proto(sg_conv, sg_dense),
      "plain": nets.plain_net(aol),
  }
  out = {}
  for name, model in variants.items():
    compiled = nets.train_step(model, x, y).compiled
    out[name] = {"peak_bytes": nets.peak_bytes(compiled), "flops": nets.flops(compiled)}
  for v in out.values():
    v["memory_ratio"] = v["peak_bytes"] / out["plain"]["peak_bytes"]
    v["flops_ratio"] = v["flops"] / out["plain"]["flops"]
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = timing.parser(__doc__.splitlines()[0])
  p.add_argument("--memory-variants", action="store_true",
                 help="instead of timing, compile variants and tabulate peak memory and FLOPs")
  args = timing.parse(p, argv)
  if args.memory_variants:
    out = memory_variants(args.size)
    table = timing.markdown_table(
        ["variant", "peak memory (MiB)", "memory / plain", "GFLOP / step", "FLOPs / plain"],
        [[k, v["peak_bytes"] / 2**20, v["memory_ratio"], v["flops"] / 1e9, v["flops_ratio"]]
         for k, v in out.items()])
    return timing.report(f"AOL vs plain: memory of variants ({args.size})", table, out,
                         module=__spec__.name, argv=argv, json_path=args.json,
                         notes=[" ".join(memory_variants.__doc__.split("\n\n")[1].split())])
  warmup, repeats = timing.warmup_and_repeats(
      args, {"tiny": (1, 1), "quick": (2, 7), "paper": (1, 5)})
  r = run(args.size, warmup=warmup, repeats=repeats)
  s, n = r["stats"], r["net"]
  labels = {"aol": "AOL (core, default Gram)",
            "plain": "plain nnx.Conv / nnx.Linear"}
  rows = [[labels[m], s[m]["median"] * 1e3, r["peak_bytes"][m] / 2**20, r["flops"][m] / 1e9,
           r["time_ratio"][m], r["time_ratio_min"][m], r["cpu_time_ratio"][m],
           r["flops_ratio"][m], r["memory_ratio"][m],
           timing.met(r["time_ratio"][m], TARGET),
           timing.met(r["memory_ratio"][m], MEMORY_TARGET)] for m in labels]
  table = timing.markdown_table(
      ["network", "step (ms, median)", "peak memory (MiB)", "GFLOP / step",
       "time / plain (median)", "time / plain (min)", "CPU time / plain", "FLOPs / plain",
       "memory / plain",
       f"time <= {TARGET}", f"memory <= {MEMORY_TARGET}"], rows)
  notes = [f"batch {n['batch']}, {n['channels']} channels, {n['conv_depth']} 3x3 convs, "
           f"{n['dense_depth']} dense layers of {64 * n['width']}; SGD Nesterov; "
           f"warm-up {warmup}, {repeats} interleaved repeats. Peak memory: arguments + "
           "outputs + temporaries - donated aliases, from the compiled step's "
           "memory_analysis(); FLOPs from its cost_analysis(): the time ratio a step would "
           "have if every op ran at the same speed."]
  return timing.report(f"AOL vs plain train step ({args.size})", table, r,
                       module=__spec__.name, argv=argv, json_path=args.json, notes=notes)


if __name__ == "__main__":
  main()
