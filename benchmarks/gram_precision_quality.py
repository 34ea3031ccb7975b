"""Training quality with the bfloat16 Gram against 'highest' (issue 16, "training quality is
unchanged"), and how far from 1 the applied kernels' exact spectral norms drift in training.

For every preset, precision and seed it trains with the experiment runner, one subprocess
per run, at most ``--jobs`` at a time::

  python -m experiments.cifar --accelerator=cpu --preset=P --config.gram_precision=G \\
      --seed=S --config.epochs=E --config.checkpoint_every=1 --config.max_to_keep=100 \\
      --workdir=<--workdir>/P/G_sS

(a run whose workdir already holds ``results.json`` for those epochs is reused, not rerun),
then reads each run's ``results.json`` (clean accuracy and CRA at every radius, certified as
the runner does) and ``metrics.jsonl`` (seconds per epoch), and restores every epoch's
checkpoint to measure, for every AOL layer, the exact l2 operator norm of the kernel as
training applies it: rescaled by the layer's own ``gram_precision`` (``layer.rescale``):

- ``AOLDense``: the largest singular value of the rescaled ``(in, out)`` matrix (float64 SVD);
- ``AOLConv`` 1x1 (stride 1): the same of its ``(in, out)`` tap, exact for any input size;
- ``AOLConv`` kxk ('SAME', stride 1): the largest singular value of the convolution on the
  input shape the layer sees in the network (the exact norm of the layer as trained), by
  Lanczos to machine precision on a float64 matrix-free conv (an SVD of the explicit
  matrix of mnist5k's 7x7x64 layers takes minutes on a shared CPU); the test checks it
  against ``aol_jax.lipschitz.operator_norm``.

The table gives per cell the seeds' mean, min and max per precision and the verdict: 'in'
when bfloat16's mean lies within the min-max range of 'highest', 'overlap' when only the two
ranges overlap, 'OUT' otherwise. Per-run records (with per-epoch norms) go to ``--json``,
written atomically; each run's norms are also cached in its workdir (``norms.json``).

  python -m benchmarks.gram_precision_quality --json /tmp/gpq.json
  python -m benchmarks.gram_precision_quality --presets mnist5k --epochs mnist5k=20
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import timing

PRECISIONS = ("highest", "bfloat16")
PRESETS = ("digits", "mnist5k")
# --size tiny: one short run per precision (the test); quick/paper: the presets as they are.
TINY_EPOCHS = 1
TINY_MODEL = ("--config.model_kwargs.channels=16", "--config.model_kwargs.conv_depth=1",
              "--config.model_kwargs.dense_depth=1")
MODULE = "benchmarks.gram_precision_quality"


def run_command(preset: str, precision: str, seed: int, epochs: int, workdir: str,
                extra: Sequence[str] = ()) -> list[str]:
  """The runner's command line for one run."""
  return [sys.executable, "-m", "experiments.cifar", "--accelerator=cpu", f"--preset={preset}",
          f"--config.gram_precision={precision}", f"--seed={seed}",
          f"--config.epochs={epochs}", "--config.checkpoint_every=1",
          "--config.max_to_keep=100", f"--workdir={workdir}", *extra]


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _history(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def finished(workdir: str, epochs: int) -> bool:
  """Whether ``workdir`` holds a certified run of ``epochs`` epochs."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return False
  history = [r for r in _history(workdir) if "epoch" in r]
  return bool(history) and history[-1]["epoch"] == epochs and _read_json(path)["mode"] == "train"


def train(preset: str, precision: str, seed: int, epochs: int, workdir: str,
          extra: Sequence[str] = ()) -> None:
  """Train and certify with the runner (a subprocess) unless ``workdir`` already has it."""
  if finished(workdir, epochs):
    return
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, "..", os.path.basename(workdir) + ".log")
  with open(log, "w") as f:
    proc = subprocess.run(run_command(preset, precision, seed, epochs, workdir, extra),
                          stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode != 0 or not finished(workdir, epochs):
    raise RuntimeError(f"{preset} {precision} seed {seed}: the runner failed "
                       f"(exit {proc.returncode}); see {log}.")


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _input_shapes(model, image_shape) -> dict[int, tuple[int, ...]]:
  """The input shape (H, W, C) each top-level layer of ``model`` sees."""
  import jax.numpy as jnp
  x = jnp.zeros((1, *image_shape), jnp.float32)
  shapes = {}
  for i, layer in enumerate(model.layers):
    shapes[i] = tuple(x.shape[1:])
    x = layer(x)
  return shapes


def layer_norms(model, shapes: dict[int, tuple[int, ...]]) -> list[dict[str, Any]]:
  """The exact l2 operator norm of every AOL layer's kernel as training applies it;
  ``shapes``: :func:`_input_shapes`."""
  import aol_jax
  out = []
  for i, layer in enumerate(model.layers):
    if not isinstance(layer, (aol_jax.AOLDense, aol_jax.AOLConv)):
      continue
    kernel = layer.rescale(layer.kernel[...])  # the layer's own gram_precision
    k = np.asarray(kernel, np.float64)
    if isinstance(layer, aol_jax.AOLDense):
      norm, how = np.linalg.svd(k, compute_uv=False)[0], "dense SVD"
    else:
      if (layer.feature_group_count != 1 or any(s != 1 for s in layer.strides)
          or any(d != 1 for d in layer.kernel_dilation)):
        raise ValueError(f"layer {i}: only ungrouped stride-1 undilated convs are measured.")
      if all(s == 1 for s in layer.kernel_size) and layer.padding != "CIRCULAR":
        norm, how = np.linalg.svd(k.reshape(k.shape[-2:]), compute_uv=False)[0], "1x1 SVD"
      else:
        shape = shapes[i]
        norm = conv_norm(k, shape, layer.padding)
        how = f"Lanczos on the conv on {'x'.join(map(str, shape))}"
    out.append({"layer": i, "kind": type(layer).__name__, "norm": float(norm), "how": how,
                "gram_precision": layer.gram_precision})
  return out


def _same_pads(kernel: np.ndarray, padding: Any) -> list[tuple[int, int]]:
  ksize = kernel.shape[:-2]
  if padding != "SAME" or any(k % 2 == 0 for k in ksize):
    raise ValueError(f"only 'SAME' zero padding with odd kernel sizes is measured, got "
                     f"{padding!r} and {ksize}.")
  return [((k - 1) // 2, (k - 1) // 2) for k in ksize]


def conv_apply(kernel: np.ndarray, x: np.ndarray, padding: Any = "SAME") -> np.ndarray:
  """The stride-1 convolution of ``x`` (H, W, C_in) with ``kernel`` (kh, kw, C_in, C_out)
  and zero 'SAME' padding, in float64 (``y[h, w] = sum_t x[h + t - c] @ kernel[t]``)."""
  pads = _same_pads(kernel, padding)
  (kh, kw), (h, w) = kernel.shape[:2], x.shape[:2]
  xp = np.pad(x, pads + [(0, 0)])
  y = np.zeros((h, w, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      y += xp[i:i + h, j:j + w] @ kernel[i, j]
  return y


def conv_apply_transpose(kernel: np.ndarray, y: np.ndarray, padding: Any = "SAME") -> np.ndarray:
  """The adjoint of :func:`conv_apply` applied to ``y`` (H, W, C_out)."""
  pads = _same_pads(kernel, padding)
  (kh, kw), (h, w) = kernel.shape[:2], y.shape[:2]
  xp = np.zeros((h + pads[0][0] * 2, w + pads[1][0] * 2, kernel.shape[-2]))
  for i in range(kh):
    for j in range(kw):
      xp[i:i + h, j:j + w] += y @ kernel[i, j].T
  return xp[pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w]


def conv_norm(kernel: np.ndarray, input_shape: Sequence[int], padding: Any = "SAME") -> float:
  """The l2 operator norm of :func:`conv_apply` on inputs of ``input_shape``: its largest
  singular value by Lanczos (``scipy.sparse.linalg.svds``, tolerance 0: to machine
  precision), matrix-free; the tests check it against an SVD of the explicit matrix."""
  from scipy.sparse import linalg as sparse_linalg
  shape = tuple(input_shape)
  out_shape = shape[:2] + (kernel.shape[-1],)
  n_in, n_out = int(np.prod(shape)), int(np.prod(out_shape))
  op = sparse_linalg.LinearOperator(
      (n_out, n_in), dtype=np.float64,
      matvec=lambda v: conv_apply(kernel, v.reshape(shape), padding).reshape(-1),
      rmatvec=lambda v: conv_apply_transpose(kernel, v.reshape(out_shape), padding).reshape(-1))
  v0 = np.ones(min(n_in, n_out))  # deterministic start
  return float(sparse_linalg.svds(op, k=1, tol=0, v0=v0, return_singular_vectors=False)[0])


def checkpoint_norms(workdir: str, *, every: int = 1) -> list[dict[str, Any]]:
  """Per saved epoch (every ``every``-th, and the last), each AOL layer's exact norm."""
  from experiments.cifar import train as runner
  from experiments.cifar.configs import Config
  from aol_jax import training
  with training.Checkpointer(os.path.join(workdir, "checkpoints")) as ck:
    found = ck.latest_metadata()
  if found is None:
    raise RuntimeError(f"{workdir} holds no checkpoint.")
  config = Config(**found[1]["config"])
  config.mode = "certify"
  run = runner.setup(config, workdir, train=False)
  try:
    image_shape = run.data.test_images.shape[1:]
    steps = run.checkpointer.all_steps()
    per_epoch = found[0] // found[1]["history"][-1]["epoch"]
    records, shapes = [], None
    for step in steps:
      epoch = step // per_epoch
      if epoch % every and step != steps[-1]:
        continue
      state, _ = run.checkpointer.restore(step, run.state)
      model = training.merge_model(run.graphdef, state)
      shapes = shapes or _input_shapes(model, image_shape)
      records.append({"epoch": epoch, "step": step, "layers": layer_norms(model, shapes)})
  finally:
    run.checkpointer.close()
  return records


def run_record(preset: str, precision: str, seed: int, epochs: int, workdir: str, *,
               norm_every: int) -> dict[str, Any]:
  """What one finished run measured: accuracy, CRA, seconds, norms per epoch."""
  results = _read_json(os.path.join(workdir, "results.json"))
  history = [r for r in _history(workdir) if "epoch" in r]
  cache = os.path.join(workdir, "norms.json")
  key = {"epochs": epochs, "every": norm_every, "step": results["step"]}
  norms = None
  if os.path.exists(cache):
    cached = _read_json(cache)
    if cached.get("key") == key:
      norms = cached["norms"]
  if norms is None:
    norms = checkpoint_norms(workdir, every=norm_every)
    _write_atomic(cache, json.dumps({"key": key, "norms": norms}) + "\n")
  max_norm = max(l["norm"] for r in norms for l in r["layers"])
  return {"preset": preset, "gram_precision": precision, "seed": seed, "epochs": epochs,
          "workdir": workdir, "clean_accuracy": results["clean_accuracy"],
          "cra": results["cra"], "num_examples": results["num_examples"],
          "train_seconds": sum(r.get("seconds", 0.0) for r in history),
          "max_norm": max_norm, "epochs_measured": [r["epoch"] for r in norms],
          "norms": norms}


def _spread(values: Sequence[float]) -> dict[str, float]:
  return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def verdict(bf16: dict[str, float], highest: dict[str, float]) -> str:
  """'in': bf16's mean within highest's min-max; 'overlap': the ranges overlap; else 'OUT'."""
  if highest["min"] <= bf16["mean"] <= highest["max"]:
    return "in"
  if bf16["min"] <= highest["max"] and highest["min"] <= bf16["max"]:
    return "overlap"
  return "OUT"


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per preset and metric: the spread per precision and the verdict."""
  rows = []
  for preset in dict.fromkeys(r["preset"] for r in records):
    runs = {p: [r for r in records if r["preset"] == preset and r["gram_precision"] == p]
            for p in PRECISIONS}
    if not all(runs.values()):
      continue
    labels = list(runs["highest"][0]["cra"])
    metrics = [("clean", lambda r: r["clean_accuracy"])]
    metrics += [(f"CRA {lab}", lambda r, lab=lab: r["cra"][lab]) for lab in labels]
    for name, get in metrics:
      spread = {p: _spread([100 * get(r) for r in runs[p]]) for p in PRECISIONS}
      rows.append({"preset": preset, "metric": name, "seeds": len(runs["highest"]),
                   **{p: spread[p] for p in PRECISIONS},
                   "verdict": verdict(spread["bfloat16"], spread["highest"])})
    spread = {p: _spread([r["max_norm"] for r in runs[p]]) for p in PRECISIONS}
    rows.append({"preset": preset, "metric": "max exact layer norm", "seeds": len(runs["highest"]),
                 **spread, "verdict": None})
  return rows


def _cell(s: dict[str, float], digits: int) -> str:
  return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  table = []
  for row in rows:
    digits = 6 if row["verdict"] is None else 1
    table.append([row["preset"], row["metric"], row["seeds"], _cell(row["highest"], digits),
                  _cell(row["bfloat16"], digits), row["verdict"] or "-"])
  return timing.markdown_table(
      ["preset", "metric (%)", "seeds", "highest: mean [min, max]",
       "bfloat16: mean [min, max]", "bf16 vs spread"], table)


def _parse_epochs(items: Sequence[str], presets: Sequence[str]) -> dict[str, int]:
  import importlib
  epochs = {p: importlib.import_module(f"experiments.cifar.configs.{p}").get_config().epochs
            for p in presets}
  for item in items:
    name, _, value = item.partition("=")
    if name not in presets or not value.isdigit() or int(value) < 1:
      raise SystemExit(f"--epochs {item!r}: give PRESET=N with PRESET one of {list(presets)} "
                       f"and N >= 1.")
    epochs[name] = int(value)
  return epochs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", choices=("tiny", "quick", "paper"), default="paper",
                 help=f"tiny: digits, {TINY_EPOCHS} epoch, the first seed, a smaller net (a smoke "
                      "test); "
                      "quick and paper: the presets' epochs")
  p.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--epochs", nargs="*", default=[], metavar="PRESET=N",
                 help="fewer (or more) epochs than the preset, for both precisions")
  p.add_argument("--norm-every", type=int, default=1,
                 help="measure the norms at every N-th epoch (and the last)")
  p.add_argument("--jobs", type=int, default=2, help="runs trained at once (subprocesses)")
  p.add_argument("--workdir", default="runs/gram_precision_quality",
                 help="one sub-directory per run; finished runs there are reused")
  p.add_argument("--json", default=None, help="also write everything here (atomically)")
  args = p.parse_args(argv)
  if args.jobs < 1 or args.norm_every < 1:
    raise SystemExit(f"--jobs and --norm-every must be >= 1, got {args.jobs} and "
                     f"{args.norm_every}.")
  presets, seeds, extra = args.presets, args.seeds, []
  if args.size == "tiny":
    presets, seeds = ["digits"], seeds[:1]
    extra = ["--config.eval_every=1", "--config.log_every=100", *TINY_MODEL]
  epochs = _parse_epochs(args.epochs, presets)
  if args.size == "tiny":
    epochs = {p: TINY_EPOCHS for p in presets}
  runs = [(preset, precision, seed) for preset in presets for seed in seeds
          for precision in PRECISIONS]
  wd = lambda preset, precision, seed: os.path.join(args.workdir, preset, f"{precision}_s{seed}")
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = [pool.submit(train, *r, epochs[r[0]], wd(*r), extra) for r in runs]
    for f in futures:
      f.result()
  records = [run_record(*r, epochs[r[0]], wd(*r), norm_every=args.norm_every) for r in runs]
  rows = summarise(records)
  title = ("Training quality, gram_precision 'bfloat16' against 'highest' ("
           + ", ".join(f"{p} {epochs[p]} epochs" for p in presets)
           + f", seeds {' '.join(map(str, seeds))})")
  seconds = {f"{r['preset']} {r['gram_precision']} s{r['seed']}": round(r["train_seconds"], 1)
             for r in records}
  notes = [
      "Clean accuracy and CRA in % of the test set (the runner's certificate, "
      "results.json); mean [min, max] over the seeds. 'in': bfloat16's mean lies within "
      "'highest''s min-max; 'overlap': only the ranges overlap; 'OUT': neither.",
      "max exact layer norm: the largest exact l2 operator norm, over the AOL layers and "
      "the measured epochs (" + ", ".join(
          f"{p}: {len(next(r for r in records if r['preset'] == p)['epochs_measured'])}"
          for p in presets) + "), of a kernel rescaled with the run's own Gram precision "
      "(what training applies); min/max over the seeds.",
      "Training seconds (sum of the runner's per-epoch times): " + ", ".join(
          f"{k} {v}" for k, v in seconds.items()) + ".",
  ]
  payload = timing.report(title, markdown(rows), {"rows": rows, "runs": records},
                          module=MODULE, argv=argv, json_path=None, notes=notes)
  if args.json:
    _write_atomic(args.json, json.dumps(payload, indent=1) + "\n")
  return payload


if __name__ == "__main__":
  main()
