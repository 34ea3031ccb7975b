"""The certification modes side by side: certified accuracy at every radius, and time.

For each model, every mode of ``aol_jax.ROUNDING_MODES`` certifies the same images; the
table gives the certified robust accuracy (CRA) per radius, its difference from
'float32_statistical' (the cost of a rigorous certificate), the largest allowance, and the
time per image (one whole ``certify_dataset`` call, the modes interleaved in one process,
median of the repeats). A second table says where the default mode's allowance comes from:
per step of the network, the median share of the logit error bound ``e_K`` it contributes
(its ``d_k`` carried through the constants of the steps after it).

Models: every ``--workdir`` of ``python -m experiments.cifar`` (its newest checkpoint and
its dataset's test split; e.g. the digits run of ``make run`` and the mnist5k preset), and
with ``--size paper`` the full-size AOL-Small with every raw kernel perturbed by 1e-6 (so that none is exactly the identity) on
uniform random 32x32x3 images labelled by its own predictions.

  python -m benchmarks.certify_modes --workdir runs/digits --workdir runs/mnist5k --size paper
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import timing

BASELINE = "float32_statistical"
NUM_IMAGES = {"tiny": 8, "quick": 64, "paper": 256}
BATCH = 128


def _from_workdir(workdir: str):
  import numpy as np
  import experiments
  from experiments.common import input_pipeline
  model, config = experiments.load(workdir)
  data = input_pipeline.load(config.dataset, data_dir=config.data_dir,
                             manual_dir=config.manual_dir, download=False,
                             train_indices=lambda n: np.zeros(0, np.int64))
  return f"{config.dataset} ({workdir})", model, data.test_inputs(), data.test_labels


def _perturbed_aol_small(n: int, size_name: str):
  import jax
  import numpy as np
  from flax import nnx
  import aol_jax
  sizes = {} if size_name == "paper" else dict(channels=32, conv_depth=2, dense_depth=3)
  model = aol_jax.aol_small(10, rngs=nnx.Rngs(0), **sizes)
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [
      p + 1e-6 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
  images = np.random.default_rng(0).uniform(size=(n, 32, 32, 3)).astype(np.float32)
  labels = np.asarray(jax.jit(aol_jax.freeze(model))(images).argmax(-1))
  name = "AOL-Small" + (" (paper size)" if size_name == "paper" else " (reduced)")
  return f"{name}, perturbed, random images", model, images, labels


def step_shares(model, images) -> list[tuple[str, float]]:
  """Per step, the median over ``images`` of its share of ``e_K`` in the default mode."""
  import jax
  import numpy as np
  from flax import nnx
  import aol_jax
  prepared = aol_jax.certification.prepare(model, images.shape[1:])
  steps = aol_jax.certification.flatten(nnx.merge(prepared.graphdef, prepared.state))
  fmt = prepared.mode.fmt
  constants = prepared.constants.steps

  def bounds(state, x):
    z, out = x, []
    for (path, step) in aol_jax.certification.flatten(nnx.merge(prepared.graphdef, state)):
      z, d = step.rounding_error(z, fmt)
      out.append(d)
    return out

  with prepared.mode.arithmetic():
    d = np.stack([np.asarray(v, np.float64) for v in jax.jit(bounds)(prepared.state, images)])
  after = np.ones(len(constants))
  for k in range(len(constants) - 2, -1, -1):
    after[k] = after[k + 1] * constants[k + 1].lipschitz
  carried = d * after[:, None]
  share = carried / carried.sum(axis=0, keepdims=True)
  return [("/".join(map(str, path)) + f" ({type(step).__name__})", float(np.median(s)))
          for (path, step), s in zip(steps, share)]


def run(workdirs: Sequence[str], size_name: str, *, warmup: int,
        repeats: int) -> dict[str, Any]:
  import aol_jax
  cases = [_from_workdir(w) for w in workdirs]
  cases.append(_perturbed_aol_small(NUM_IMAGES[size_name], size_name))
  modes = list(aol_jax.ROUNDING_MODES)
  rows, shares = [], {}
  for name, model, x, y in cases:
    results = {}

    def certify(mode, model=model, x=x, y=y):
      results[mode] = aol_jax.certify_dataset(model, x, y, batch_size=BATCH, rounding=mode)
      return results[mode]

    stats = timing.time_interleaved({m: (lambda m=m: certify(m)) for m in modes},
                                    warmup=warmup, repeats=repeats)
    for mode in modes:
      r = results[mode]
      rows.append(dict(model=name, rounding=mode, n=r.num_examples, lipschitz=r.lipschitz_constant,
                       clean=r.clean_accuracy, cra=list(r.cra), eps=list(r.eps_list),
                       cost=[b - a for a, b in zip(r.cra, results[BASELINE].cra)],
                       max_allowance=max(r.max_allowance),
                       ms_per_image=1e3 * stats[mode]["median"] / r.num_examples,
                       time_vs_baseline=timing.ratio(stats, mode, BASELINE)))
    shares[name] = step_shares(model, x[:BATCH])
  return {"rows": rows, "shares": shares}


def main(argv: Sequence[str] | None = None) -> None:
  p = timing.parser(__doc__.splitlines()[0])
  p.add_argument("--workdir", action="append", default=[],
                 help="a workdir of python -m experiments.cifar (repeatable)")
  args = timing.parse(p, argv)
  warmup, repeats = timing.warmup_and_repeats(
      args, {"tiny": (0, 1), "quick": (0, 1), "paper": (0, 3)})
  import aol_jax
  out = run(args.workdir, args.size, warmup=warmup, repeats=repeats)
  rows = out["rows"]
  pct = lambda v: f"{100 * v:.1f}"
  labels = [aol_jax.certification.radius_label(e) for e in rows[0]["eps"]]
  table = timing.markdown_table(
      ["model", "rounding", "n", "L", "clean", *labels,
       *(f"cost {l}" for l in labels), "max A", "ms / image", f"time / {BASELINE}"],
      [[r["model"], r["rounding"], r["n"], f"{r['lipschitz']:.6f}", pct(r["clean"]),
        *map(pct, r["cra"]), *(f"{100 * c:+.1f}" for c in r["cost"]),
        f"{r['max_allowance']:.2g}", f"{r['ms_per_image']:.2f}",
        f"{r['time_vs_baseline']:.2f}"] for r in rows])
  parts = [table, "", "Where the default mode's logit error bound e_K comes from (median "
           "share per step, steps below 1 % left out):", ""]
  for name, share in out["shares"].items():
    parts.append(f"- {name}: " + ", ".join(f"{s} {100 * v:.0f} %" for s, v in share
                                            if v >= 0.01))
  timing.report("Certification modes: CRA (%) and the cost of rigour", "\n".join(parts), out,
                module="benchmarks.certify_modes", argv=argv, json_path=args.json)


if __name__ == "__main__":
  main()
