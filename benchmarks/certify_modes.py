"""The two rounding modes of ``certify_dataset`` side by side: CRA and time per image.

Rows: a small AOL-Small trained on scikit-learn's digits (the model and 397 test images of
``tests/test_attacks.py``) and, at ``--size paper``, the full-size AOL-Small at its paper
initialisation on uniform random 32x32x3 images labelled by its own prediction. Each
``certify_dataset`` call is timed whole (freezing, bounds, every batch), the two modes
interleaved in one process (``benchmarks.timing``), so their ratio is what to read.

  python -m benchmarks.certify_modes --size paper
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import timing

MODES = ("float32_statistical", "float64")
# Random 32x32x3 images certified with the full-size model, and the batch size, per size.
NUM_IMAGES = {"tiny": 0, "quick": 0, "paper": 128}
BATCH = 64


def _digits_model():
  """The small AOL net of tests/test_attacks.py, trained on digits; its test split."""
  from benchmarks.digits import digits_split, train  # the tests' split and loop
  from flax import nnx
  import aol_jax
  x_train, y_train, x_test, y_test = digits_split()
  model = aol_jax.aol_small(10, rngs=nnx.Rngs(0), channels=16, conv_depth=2, dense_depth=3,
                           width=8, pool=2, image_size=8, in_channels=1)
  train(model, x_train, y_train, steps=300, learning_rate=3e-3, batch_size=128, seed=1)
  return model, x_test, y_test


def _full_size(n: int):
  import jax
  import numpy as np
  from flax import nnx
  import aol_jax
  model = aol_jax.MODELS["aol_small"](10, rngs=nnx.Rngs(0))
  images = np.random.default_rng(0).uniform(size=(n, 32, 32, 3)).astype(np.float32)
  graphdef, state = nnx.split(aol_jax.freeze(model))
  labels = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, images).argmax(-1)
  return model, images, np.asarray(labels)


def run(size_name: str, *, warmup: int, repeats: int) -> list[dict[str, Any]]:
  import aol_jax
  cases = [("small AOL net trained on digits", *_digits_model())]
  if NUM_IMAGES[size_name]:
    cases.append(("AOL-Small full size (init), random 32x32x3",
                  *_full_size(NUM_IMAGES[size_name])))
  rows = []
  for name, model, x, y in cases:
    results = {}

    def certify(mode, model=model, x=x, y=y):
      results[mode] = aol_jax.certify_dataset(model, x, y, batch_size=BATCH, rounding=mode)
      return results[mode]

    stats = timing.time_interleaved({m: (lambda m=m: certify(m)) for m in MODES},
                                    warmup=warmup, repeats=repeats)
    for mode in MODES:
      r = results[mode]
      rows.append(dict(model=name, rounding=mode, n=r.num_examples, lipschitz=r.lipschitz_constant,
                       clean=r.clean_accuracy, cra=list(r.cra), eps=list(r.eps_list),
                       max_allowance=max(r.max_allowance),
                       ms_per_image=1e3 * stats[mode]["median"] / r.num_examples,
                       time_vs_probabilistic=timing.ratio(stats, mode, MODES[0])))
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  p = timing.parser(__doc__.splitlines()[0])
  args = p.parse_args(argv)
  timing.set_threads(args.threads)
  warmup, repeats = timing.warmup_and_repeats(
      args, {"tiny": (0, 1), "quick": (1, 3), "paper": (1, 3)})
  rows = run(args.size, warmup=warmup, repeats=repeats)
  pct = lambda v: f"{100 * v:.1f}"
  table = timing.markdown_table(
      ["model", "rounding", "n", "L", "clean", *("eps %.3g" % e for e in rows[0]["eps"]),
       "max A", "ms / image", "time / probabilistic"],
      [[r["model"], r["rounding"], r["n"], f"{r['lipschitz']:.9f}", pct(r["clean"]),
        *map(pct, r["cra"]), f"{r['max_allowance']:.2g}", f"{r['ms_per_image']:.2f}",
        f"{r['time_vs_probabilistic']:.2f}"] for r in rows])
  timing.report("certify_dataset: probabilistic vs worst-case rounding", table, rows,
                module="benchmarks.certify_modes", argv=argv, json_path=args.json)


if __name__ == "__main__":
  main()
