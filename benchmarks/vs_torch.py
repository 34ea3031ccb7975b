"""Train-step time against PyTorch + orthogonium (``AOLConv2D``), same process and threads.

Both sides train the same architecture (AOL-Small at ``paper``: ConcatenationPooling 4 ->
1x1 conv 48->192 -> 12 x [3x3 conv 192, MaxMin] -> 1x1 conv -> FirstChannels(16) -> 14
dense AOL 1024 -> FirstChannels(10)) with the offset cross-entropy and SGD (Nesterov 0.9)
on the same batch size, and a single 3x3 conv layer of 192 channels on 8x8 inputs (input
gradient included, as in a middle layer), and that layer's bare convolution split into
forward, input gradient and kernel gradient. orthogonium has no AOL dense layer, so the torch
side's dense AOL is written here (``AOLLinear``). Plain (unconstrained) rows of both
libraries separate the conv engine's speed from the cost of the rescaling. Target:
ours / theirs <= 1.0.

  python -m benchmarks.vs_torch --size paper
  python -m benchmarks.vs_torch --size quick --sweep-xla-flags   # one process per flag set
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python -m benchmarks.vs_torch --size paper

torch and orthogonium are benchmark-only dependencies (``pip install 'aol-jax[benchmarks]'``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from benchmarks import timing

TARGET = 1.0

# XLA:CPU options tried by --sweep-xla-flags (each needs a fresh process).
XLA_FLAG_SETS = (
    "",
    "--xla_cpu_use_thunk_runtime=false",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_experimental_ynn_fusion_type=",  # experiments' CPU runs (accelerator.py)
)


def _import_torch():
  try:
    import orthogonium  # noqa: F401
    import torch
  except ImportError as e:
    raise SystemExit(
        f"benchmarks.vs_torch needs PyTorch and orthogonium ({e}). Install them with "
        "`pip install 'aol-jax[benchmarks]'` (torch==2.13.0, orthogonium==0.0.4).") from e
  return torch


def torch_modules(torch):
  """The torch side: a dense AOL layer, the offset cross-entropy, and the network."""
  from orthogonium.layers import MaxMin
  from orthogonium.layers.conv.AOL import AOLConv2D
  nn = torch.nn

  class AOLLinear(nn.Module):
    """``y = x (P D)^T + b`` with ``d_j = (sum_k |P^T P|_jk + eps)^-1/2`` (AOL, Theorem 1)."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-6):
      super().__init__()
      self.weight = nn.Parameter(torch.eye(out_features, in_features))
      self.bias = nn.Parameter(torch.zeros(out_features))
      self.eps = eps

    def forward(self, x):
      d = torch.rsqrt((self.weight.T @ self.weight).abs().sum(1) + self.eps)
      return nn.functional.linear(x, self.weight * d, self.bias)

  class Lambda(nn.Module):
    def __init__(self, fn):
      super().__init__()
      self.fn = fn

    def forward(self, x):
      return self.fn(x)

  def network(size, plain: bool = False) -> nn.Module:
    c, w = size.channels, size.width
    conv = (lambda i, o, k: nn.Conv2d(i, o, k, padding=k // 2)) if plain else (
        lambda i, o, k: AOLConv2D(i, o, k, padding=k // 2))
    dense = nn.Linear if plain else AOLLinear
    layers = [Lambda(lambda x: nn.functional.pixel_unshuffle(x, 4)), conv(48, c, 1), MaxMin()]
    for _ in range(size.conv_depth):
      layers += [conv(c, c, 3), MaxMin()]
    layers += [conv(c, c, 1), Lambda(lambda x: x[:, :w].flatten(1))]
    for i in range(size.dense_depth):
      layers.append(dense(64 * w, 64 * w))
      if i < size.dense_depth - 1:
        layers.append(MaxMin())
    layers.append(Lambda(lambda x: x[:, :10]))
    return nn.Sequential(*layers)

  def offset_ce(logits, y, offset: float = math.sqrt(2), temperature: float = 0.25):
    onehot = nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return temperature * nn.functional.cross_entropy((logits - offset * onehot) / temperature, y)

  class InputScale(nn.Module):
    """A learnable scalar in front of a single layer, so its input gradient is computed."""

    def __init__(self):
      super().__init__()
      self.s = nn.Parameter(torch.ones(()))

    def forward(self, x):
      return x * self.s

  def single_layer(c: int, plain: bool = False) -> nn.Module:
    conv = nn.Conv2d(c, c, 3, padding=1) if plain else AOLConv2D(c, c, 3, padding=1)
    return nn.Sequential(InputScale(), conv)

  return network, single_layer, offset_ce, AOLLinear


def torch_step(torch, model, x, y, loss):
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

  def step():
    opt.zero_grad(set_to_none=True)
    value = loss(model(x), y)
    value.backward()
    opt.step()
    return value

  return step


PARTS = ("layer", "conv", "network")


def agreement(torch, aol_linear, channels: int, features: int) -> dict[str, float]:
  """Both sides compute the same layers: ``max |ours - theirs| / max |ours|`` of one forward
  pass with the same random weights and inputs, for a 3x3 ``channels -> channels`` AOLConv
  against orthogonium's ``AOLConv2D`` (which rescales input channels when ``out >= in``, as
  ours always does) and for ``AOLDense`` against the torch side's ``AOLLinear``."""
  import jax
  import numpy as np
  from flax import nnx
  from orthogonium.layers.conv.AOL import AOLConv2D
  from aol_jax import AOLConv, AOLDense

  keys = jax.random.split(jax.random.key(2), 6)
  to_torch = lambda a, *axes: torch.from_numpy(np.asarray(a).transpose(*axes).copy())
  out = {}
  conv, conv_t = AOLConv(channels, channels, (3, 3), rngs=nnx.Rngs(0)), AOLConv2D(
      channels, channels, 3, padding=1)
  dense, dense_t = AOLDense(features, features, rngs=nnx.Rngs(0)), aol_linear(features, features)
  for name, ours, theirs, x_shape, k_axes, x_axes in [
      ("3x3 layer", conv, conv_t, (4, 8, 8, channels), (3, 2, 0, 1), (0, 3, 1, 2)),
      ("dense layer", dense, dense_t, (4, features), (1, 0), (0, 1))]:
    kernel = jax.random.normal(keys[0], ours.kernel.shape) / ours.kernel.shape[-1] ** 0.5
    bias = jax.random.normal(keys[1], ours.bias.shape)
    x = jax.random.normal(keys[2], x_shape)
    ours.kernel, ours.bias = nnx.Param(kernel), nnx.Param(bias)
    weight = getattr(theirs, "parametrizations", None)  # orthogonium's raw kernel
    with torch.no_grad():
      (theirs.weight if weight is None else weight.weight.original).copy_(to_torch(kernel, *k_axes))
      theirs.bias.copy_(to_torch(bias))
      y_t = theirs(to_torch(x, *x_axes)).numpy().transpose(np.argsort(x_axes))
    y = np.asarray(ours(x))
    out[name] = float(np.abs(y - y_t).max() / np.abs(y).max())
  return out


def run(size_name: str, *, warmup: int, repeats: int,
        parts: Sequence[str] = PARTS) -> dict[str, Any]:
  torch = _import_torch()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from aol_jax import AOLConv
  from benchmarks import nets

  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  network, single_layer, offset_ce, aol_linear = torch_modules(torch)
  size = nets.SIZES[size_name]
  results: dict[str, Any] = {"size": size_name, "net": vars(size), "threads": threads,
                             "torch": torch.__version__,
                             "agreement": agreement(torch, aol_linear, size.channels,
                                                    64 * size.width)}

  # Single 3x3 layer, c channels on 8x8, batch as the network's.
  class InputScale(nnx.Module):
    def __init__(self):
      self.s = nnx.Param(jnp.ones(()))

    def __call__(self, x):
      return x * self.s[...]

  c = size.channels
  xs = jax.random.normal(jax.random.key(0), (size.batch, 8, 8, c))
  xs_t = torch.from_numpy(np.asarray(xs).transpose(0, 3, 1, 2).copy())
  mse = lambda out, _: jnp.mean(out ** 2)
  mse_t = lambda out, _: (out ** 2).mean()
  layer = lambda conv: nnx.Sequential(InputScale(), conv)
  aol_conv = AOLConv(c, c, (3, 3), rngs=nnx.Rngs(0))
  jax_layers = {
      "jax AOL": layer(aol_conv),
      "jax plain": layer(nnx.Conv(c, c, (3, 3), padding="SAME", rngs=nnx.Rngs(0))),
      "jax plain bf16": layer(nnx.Conv(c, c, (3, 3), padding="SAME", dtype=jnp.bfloat16,
                                       rngs=nnx.Rngs(0))),
  }
  fns = {}
  for name, m in (jax_layers if "layer" in parts else {}).items():
    step = nets.train_step(m, xs, None, loss=mse)
    fns[name] = lambda s=step: s(xs, None)
  if "layer" in parts:
    fns["torch AOL (orthogonium)"] = torch_step(torch, single_layer(c), xs_t, None, mse_t)
    fns["torch plain"] = torch_step(torch, single_layer(c, plain=True), xs_t, None, mse_t)
    results["layer"] = timing.time_interleaved(fns, warmup=warmup, repeats=repeats)

  # The bare 3x3 conv (no bias, no AOL), split into forward, + input grad, + kernel grad.
  kernel = jax.random.normal(jax.random.key(1), (3, 3, c, c)) / (3 * c ** 0.5)
  kernel_t = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fwd = jax.jit(conv)
  dgrad = jax.jit(jax.grad(lambda x, k: jnp.vdot(conv(x, k), x), argnums=0))
  wgrad = jax.jit(jax.grad(lambda x, k: jnp.vdot(conv(x, k), x), argnums=1))
  xg, kg = xs_t.clone().requires_grad_(), kernel_t.clone().requires_grad_()

  def torch_conv(x, k, grad_of=None):
    def fn():
      if grad_of is None:
        with torch.no_grad():
          return torch.nn.functional.conv2d(x, k, padding=1)
      grad_of.grad = None
      (torch.nn.functional.conv2d(x, k, padding=1) * xs_t).sum().backward()
    return fn

  if "conv" in parts:
    results["conv"] = timing.time_interleaved({
        "jax forward": lambda: fwd(xs, kernel), "torch forward": torch_conv(xs_t, kernel_t),
        "jax forward + input grad": lambda: dgrad(xs, kernel),
        "torch forward + input grad": torch_conv(xg, kernel_t, xg),
        "jax forward + kernel grad": lambda: wgrad(xs, kernel),
        "torch forward + kernel grad": torch_conv(xs_t, kg, kg)}, warmup=warmup, repeats=repeats)
  if "network" not in parts:
    return results

  # The full network.
  x, y = nets.batch(size)
  x_t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  y_t = torch.from_numpy(np.asarray(y).astype(np.int64))
  aol = nets.aol_net(size)
  fns = {}
  for name, m in {"jax AOL": aol, "jax plain": nets.plain_net(aol)}.items():
    step = nets.train_step(m, x, y)
    fns[name] = lambda s=step: s(x, y)
  fns["torch AOL (orthogonium)"] = torch_step(torch, network(size), x_t, y_t, offset_ce)
  fns["torch plain"] = torch_step(torch, network(size, plain=True), x_t, y_t, offset_ce)
  results["network"] = timing.time_interleaved(fns, warmup=warmup, repeats=repeats)
  return results


def _rows(results: dict[str, Any]) -> list[list[Any]]:
  rows = []
  for part, label in (("layer", "3x3 layer"), ("network", "network"), ("conv", "bare 3x3 conv")):
    stats = results.get(part, {})
    for name in stats:
      if not name.startswith("jax"):
        continue
      if part == "conv":
        theirs = name.replace("jax", "torch")
      else:
        theirs = "torch plain" if "plain" in name else "torch AOL (orthogonium)"
      r = timing.ratio(stats, name, theirs)
      rows.append([label, name, theirs, stats[name]["median"] * 1e3,
                   stats[theirs]["median"] * 1e3, r,
                   stats[name]["min"] / stats[theirs]["min"],
                   timing.ratio(stats, name, theirs, "cpu_median"),
                   timing.met(r, TARGET)])
  return rows


def sweep(size: str, repeats: int | None, warmup: int | None, parts: str
          ) -> list[dict[str, Any]]:
  """Runs this benchmark once per XLA flag set, each in its own process."""
  out = []
  for flags in XLA_FLAG_SETS:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
      cmd = [sys.executable, "-m", "benchmarks.vs_torch", "--size", size, "--json", f.name,
             "--parts", parts]
      cmd += [] if repeats is None else ["--repeats", str(repeats)]
      cmd += [] if warmup is None else ["--warmup", str(warmup)]
      env = dict(os.environ, XLA_FLAGS=flags)
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
      if proc.returncode:
        out.append({"flags": flags, "error": proc.stderr.strip().splitlines()[-1:]})
        continue
      out.append({"flags": flags, "results": json.load(open(f.name))["results"]})
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = timing.parser(__doc__.splitlines()[0])
  p.add_argument("--sweep-xla-flags", action="store_true",
                 help="rerun in one process per XLA_FLAGS setting and tabulate the ratios")
  p.add_argument("--parts", default=",".join(PARTS),
                 help=f"comma-separated subset of {PARTS} to run")
  args = timing.parse(p, argv)
  parts = args.parts.split(",")
  if not set(parts) <= set(PARTS):
    p.error(f"--parts must be a subset of {PARTS}, got {args.parts!r}")
  if args.sweep_xla_flags:
    _import_torch()
    runs = sweep(args.size, args.repeats, args.warmup, args.parts)
    columns = [("3x3 layer", "jax AOL"), ("3x3 layer", "jax plain"),
               ("bare 3x3 conv", "jax forward"), ("bare 3x3 conv", "jax forward + input grad"),
               ("bare 3x3 conv", "jax forward + kernel grad"), ("network", "jax AOL"),
               ("network", "jax plain")]
    rows = []
    for r in runs:
      if "error" in r:
        rows.append([r["flags"] or "(none)", "failed: " + " ".join(r["error"])]
                    + [""] * (len(columns) - 1))
        continue
      by = {(row[0], row[1]): f"{row[5]:.2f} / {row[7]:.2f}" for row in _rows(r["results"])}
      rows.append([r["flags"] or "(none)"] + [by.get(c, "") for c in columns])
    keep = [0] + [i + 1 for i in range(len(columns)) if any(row[i + 1] for row in rows)]
    header = ["XLA_FLAGS"] + [f"{a}: {b}" for a, b in columns]
    table = timing.markdown_table([header[i] for i in keep],
                                  [[row[i] for i in keep] for row in rows])
    return timing.report(f"vs PyTorch, XLA flag sweep ({args.size})", table, runs,
                         module=__spec__.name, argv=argv, json_path=args.json,
                         notes=["Each row is its own process; every cell is ours / theirs "
                                "measured within that process, as median wall time / median "
                                "CPU time."])
  warmup, repeats = timing.warmup_and_repeats(
      args, {"tiny": (1, 1), "quick": (2, 5), "paper": (1, 5)})
  results = run(args.size, warmup=warmup, repeats=repeats, parts=parts)
  table = timing.markdown_table(
      ["what", "ours", "theirs", "ours (ms)", "theirs (ms)", "ours / theirs (median)",
       "ours / theirs (min)", "CPU time ratio", f"<= {TARGET}"], _rows(results))
  n = results["net"]
  notes = [f"torch {results['torch']}, torch.set_num_threads({results['threads']}); XLA's CPU "
           f"pool sized by the process's {results['threads']} CPUs. Batch {n['batch']}, "
           f"{n['channels']} channels; warm-up {warmup}, {repeats} interleaved repeats. "
           "Torch runs NCHW (its default), JAX NHWC. Same weights, same output: max |ours - "
           "theirs| / max |ours| = "
           + ", ".join(f"{v:.1e} ({k})" for k, v in results["agreement"].items()) + "."]
  return timing.report(f"vs PyTorch / orthogonium ({args.size})", table, results,
                       module=__spec__.name, argv=argv, json_path=args.json, notes=notes)


if __name__ == "__main__":
  main()
