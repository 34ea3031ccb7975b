"""Gram formulations of the AOL rescaling, forward and forward+backward, per layer shape.

Each row times ``rescale(K)`` (forward) and the gradient of ``<rescale(K), R>`` (forward +
backward) for one formulation, interleaved with the others at the same shape; ratios are
against the core's default, and each row also gives the FLOPs of the compiled program
(XLA's ``cost_analysis``). Conv methods ``conv`` (self-convolution) and ``taps`` (one
triangle of the pairs of taps) and the dense ``matmul`` (one triangle of row blocks) are
``aol_jax.rescaling``'s; ``autodiff`` (the whole tap-pair product with JAX's own two-product
derivative) is ``benchmarks.gram_variants``'.

  python -m benchmarks.gram --size paper
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import timing

# (name, kernel shape): the layers of AOL-Small/Medium/Large (dense 64w for w = 16/32/48).
SHAPES = {
    "tiny": [("3x3 8->8", (3, 3, 8, 8)), ("dense 32", (32, 32))],
    "quick": [("1x1 48->192", (1, 1, 48, 192)), ("3x3 192->192", (3, 3, 192, 192)),
              ("1x1 192->192", (1, 1, 192, 192)), ("dense 1024", (1024, 1024))],
    "paper": [("1x1 48->192", (1, 1, 48, 192)), ("3x3 192->192", (3, 3, 192, 192)),
              ("1x1 192->192", (1, 1, 192, 192)), ("dense 1024", (1024, 1024)),
              ("dense 2048", (2048, 2048)), ("dense 3072", (3072, 3072))],
}


def run(size: str, *, warmup: int, repeats: int) -> list[dict[str, Any]]:
  import jax
  import jax.numpy as jnp
  from aol_jax._src import rescaling
  from benchmarks import gram_variants as gv
  from benchmarks import nets

  rows = []
  for name, shape in SHAPES[size]:
    k1, k2 = jax.random.split(jax.random.key(0))
    kernel = jax.random.normal(k1, shape) / shape[-1] ** 0.5
    probe = jax.random.normal(k2, shape)
    dense = len(shape) == 2
    methods = gv.DENSE_METHODS if dense else gv.CONV_METHODS
    baseline = "matmul" if dense else rescaling.DEFAULT_GRAM_METHOD
    fns, flops = {}, {}
    for m in methods:
      rescale = gv.rescale_dense_fn(m) if dense else gv.rescale_conv_fn(m)
      fwd = jax.jit(rescale).lower(kernel).compile()
      grad = jax.jit(jax.grad(lambda k, rescale=rescale: jnp.vdot(rescale(k), probe)))
      grad = grad.lower(kernel).compile()
      flops[m] = (nets.flops(fwd), nets.flops(grad))
      fns[f"{m} fwd"] = lambda f=fwd: f(kernel)
      fns[f"{m} fwd+bwd"] = lambda f=grad: f(kernel)
    stats = timing.time_interleaved(fns, warmup=warmup, repeats=repeats)
    for m in methods:
      rows.append({
          "layer": name, "shape": shape, "method": m, "baseline": baseline,
          "fwd_flops": flops[m][0], "fwdbwd_flops": flops[m][1],
          "fwd_ms": stats[f"{m} fwd"]["median"] * 1e3,
          "fwdbwd_ms": stats[f"{m} fwd+bwd"]["median"] * 1e3,
          "fwd_ratio": timing.ratio(stats, f"{m} fwd", f"{baseline} fwd"),
          "fwdbwd_ratio": timing.ratio(stats, f"{m} fwd+bwd", f"{baseline} fwd+bwd"),
          "stats": {k: v for k, v in stats.items() if k.startswith(m + " ")}})
  return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = timing.parse(timing.parser(__doc__.splitlines()[0]), argv)
  warmup, repeats = timing.warmup_and_repeats(
      args, {"tiny": (1, 1), "quick": (2, 7), "paper": (2, 7)})
  rows = run(args.size, warmup=warmup, repeats=repeats)
  table = timing.markdown_table(
      ["layer", "method", "fwd (ms)", "fwd+bwd (ms)", "fwd / baseline", "fwd+bwd / baseline",
       "baseline", "fwd MFLOP", "fwd+bwd MFLOP"],
      [[r["layer"], r["method"], r["fwd_ms"], r["fwdbwd_ms"], r["fwd_ratio"],
        r["fwdbwd_ratio"], r["baseline"], r["fwd_flops"] / 1e6, r["fwdbwd_flops"] / 1e6]
       for r in rows])
  notes = [f"Medians of {repeats} interleaved repeats after {warmup} warm-up; all methods of "
           "a layer are timed together. Forward = the rescaled kernel; fwd+bwd = its "
           "gradient through a fixed random projection. FLOPs: XLA's cost_analysis() of each "
           "compiled program."]
  return timing.report(f"Gram formulations ({args.size})", table, rows,
                       module=__spec__.name, argv=argv, json_path=args.json, notes=notes)


if __name__ == "__main__":
  main()
