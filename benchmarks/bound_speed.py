"""Time of the sound kernel-norm bounds: a perturbed AOL-Small frozen and bounded.

Every kernel of AOL-Small (``aol_jax.aol_small``, 18.7M parameters) is perturbed by
``0.05 N(0, 1)`` noise, so no layer sits at its identity initialisation (where the bound is
trivial); the model is frozen in float32 and ``lipschitz_bound()`` bounds every layer with
``aol_jax.conv_norm_bound`` / ``aol_jax.dense_norm_bound`` (float64, Cholesky-verified),
timed in wall and process CPU time (issue 25's target: at most 15 s wall). Each repeat uses a
fresh perturbation: the bounds are memoised per kernel, so a repeated kernel would cost
nothing. Per layer kind, the tight bound is timed against the AOL row-sum bound
(``aol_jax.conv_row_sum_bound`` / ``dense_row_sum_bound``), interleaved in one process, and
``dense_norm_bound(|W|)`` (what a certificate's rounding terms need) is timed too; at
``--size paper`` also on a 4096 x 4096 ``|W|``.

  python -m benchmarks.bound_speed --size paper
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import timing

# The model per size: AOL-Small itself from 'quick' on; 'tiny' a small one on 8x8 images.
MODEL = {
    "tiny": dict(channels=16, conv_depth=2, dense_depth=2, width=4, pool=2, image_size=8,
                 in_channels=1),
    "quick": {},
    "paper": {},
}
NOISE = 0.05
WIDE = {"tiny": 0, "quick": 0, "paper": 4096}  # side of the one-sign dense kernel (0: none)


def _perturbed_kernels(size: str, seed: int,
                       bound: bool) -> tuple[tuple[float, float], Any, list, list]:
  """A fresh perturbed model: (wall and process CPU seconds to freeze and bound it, the
  bound; if ``bound``), its 3x3 conv kernels and its dense kernels as float64 host arrays."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  import aol_jax
  model = aol_jax.aol_small(10, rngs=nnx.Rngs(0), **MODEL[size])
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  key = jax.random.key(seed)
  leaves = [w + NOISE * jax.random.normal(jax.random.fold_in(key, i), w.shape, w.dtype)
            if w.ndim >= 2 else w for i, w in enumerate(leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  start, cpu = time.perf_counter(), time.process_time()
  frozen = aol_jax.freeze(model, dtype=jnp.float32)
  value = frozen.lipschitz_bound() if bound else None
  seconds = time.perf_counter() - start, time.process_time() - cpu
  convs, denses = [], []
  if bound:  # its kernels are bounded (and memoised) now: not reused below
    return seconds, value, convs, denses
  for _, layer in nnx.iter_modules(frozen):
    if isinstance(layer, aol_jax.AOLConv) and layer.kernel_size != (1, 1):
      convs.append(np.asarray(layer.applied_kernel(), np.float64))
    elif isinstance(layer, aol_jax.AOLDense):
      denses.append(np.asarray(layer.applied_kernel(), np.float64))
  return seconds, value, convs, denses


def _wide_abs_kernel(side: int, seed: int):
  """``|W|`` of an AOL-rescaled ``I + 0.05 N(0, 1)`` of ``side x side``, float64."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import aol_jax
  raw = jnp.eye(side) + NOISE * jax.random.normal(jax.random.key(seed), (side, side))
  return np.abs(np.asarray(aol_jax.rescale_dense(raw), np.float64))


def run(size: str, *, warmup: int, repeats: int) -> dict[str, Any]:
  import numpy as np
  import aol_jax
  bounded = [_perturbed_kernels(size, seed, True) for seed in range(warmup + repeats)]
  whole = [m[0][0] for m in bounded[warmup:]]
  whole_cpu = [m[0][1] for m in bounded[warmup:]]
  models = [_perturbed_kernels(size, 1000 + seed, False) for seed in range(warmup + repeats)]
  queue = {name: list(range(warmup + repeats)) for name in
           ("conv tight", "conv row-sum", "dense tight", "dense row-sum", "dense |W|")}

  def kernels(name, kind):
    return models[queue[name].pop(0)][kind]

  fns = {
      "conv tight": lambda: [aol_jax.conv_norm_bound(k) for k in kernels("conv tight", 2)],
      "conv row-sum": lambda: [aol_jax.conv_row_sum_bound(k, feature_group_count=1)
                               for k in kernels("conv row-sum", 2)],
      "dense tight": lambda: [aol_jax.dense_norm_bound(k) for k in kernels("dense tight", 3)],
      "dense row-sum": lambda: [aol_jax.dense_row_sum_bound(k)
                                for k in kernels("dense row-sum", 3)],
      "dense |W|": lambda: [aol_jax.dense_norm_bound(np.abs(k))
                            for k in kernels("dense |W|", 3)],
  }
  if WIDE[size]:
    wides = [_wide_abs_kernel(WIDE[size], seed) for seed in range(warmup + repeats)]
    fns[f"|W| {WIDE[size]}"] = lambda: aol_jax.dense_norm_bound(wides.pop(0))
  stats = timing.time_interleaved(fns, warmup=warmup, repeats=repeats)
  return {
      "model": "AOL-Small" if not MODEL[size] else "AOL-Small at tiny sizes",
      "layers": {"conv3x3": len(models[0][2]), "dense": len(models[0][3])},
      "bound": bounded[-1][1],
      "freeze_and_bound_s": whole,
      "freeze_and_bound_median_s": float(np.median(whole)),
      "freeze_and_bound_cpu_s": whole_cpu,
      "freeze_and_bound_cpu_median_s": float(np.median(whole_cpu)),
      "stats": stats,
      "load_average": os.getloadavg(),
  }


def main(argv: Sequence[str] | None = None) -> None:
  p = timing.parser(__doc__.splitlines()[0])
  args = timing.parse(p, argv)
  warmup, repeats = timing.warmup_and_repeats(
      args, {"tiny": (0, 1), "quick": (0, 1), "paper": (1, 3)})
  r = run(args.size, warmup=warmup, repeats=repeats)
  s = r["stats"]
  n_conv, n_dense = r["layers"]["conv3x3"], r["layers"]["dense"]
  rows = [[f"{r['model']}, perturbed: freeze + lipschitz_bound()", n_conv + n_dense + 2,
           f"{r['freeze_and_bound_median_s']:.2f}", "", ""],
          ["3x3 convs: conv_norm_bound / conv_row_sum_bound", n_conv,
           f"{s['conv tight']['median']:.2f}", f"{s['conv row-sum']['median']:.2f}",
           f"{timing.ratio(s, 'conv tight', 'conv row-sum'):.2f}"],
          ["dense: dense_norm_bound / dense_row_sum_bound", n_dense,
           f"{s['dense tight']['median']:.2f}", f"{s['dense row-sum']['median']:.2f}",
           f"{timing.ratio(s, 'dense tight', 'dense row-sum'):.2f}"],
          ["dense: dense_norm_bound(abs(W)) / dense_row_sum_bound", n_dense,
           f"{s['dense |W|']['median']:.2f}", f"{s['dense row-sum']['median']:.2f}",
           f"{timing.ratio(s, 'dense |W|', 'dense row-sum'):.2f}"]]
  wide = [name for name in s if name.startswith("|W| ")]
  for name in wide:
    rows.append([f"dense_norm_bound(abs(W)), W {name[4:]} x {name[4:]}", 1,
                 f"{s[name]['median']:.2f}", "", ""])
  table = timing.markdown_table(["what", "layers", "seconds (median)", "row-sum seconds",
                                 "ratio"], rows)
  load = ", ".join(f"{v:.2f}" for v in r["load_average"])
  timing.report("Sound kernel-norm bounds of a perturbed AOL-Small", table, r,
                module="benchmarks.bound_speed", argv=argv, json_path=args.json,
                notes=[f"Freeze + lipschitz_bound(): process CPU time (all threads, median) "
                       f"{r['freeze_and_bound_cpu_median_s']:.2f} s.",
                       f"Load average (1, 5, 15 min) at the end: {load}; "
                       f"the model's bound: {r['bound']:.6g}."])


if __name__ == "__main__":
  main()
