"""Smoke tests: every benchmark runs at its tiny size, prints its table and writes JSON.

No timing assertions: how fast something runs is measured by the benchmarks, never tested.
"""

import json

import pytest

from benchmarks import aol_vs_plain, certify_throughput, gram, timing

TINY = ["--size", "tiny", "--warmup", "0", "--repeats", "1"]


def _check(capsys, tmp_path, main, columns):
  path = tmp_path / "out.json"
  payload = main(TINY + ["--json", str(path)])
  out = capsys.readouterr().out
  assert "|---" in out
  for column in columns:
    assert column in out
  written = json.loads(path.read_text())
  assert written["title"] == payload["title"]
  assert written["environment"]["jax"]
  assert "--size tiny" in written["environment"]["command"]
  return written["results"]


def test_time_interleaved_runs_every_candidate_and_rotates():
  calls = []
  stats = timing.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                  warmup=1, repeats=2)
  assert calls == ["a", "b", "a", "b", "b", "a"]
  assert set(stats["a"]) >= {"median", "min", "max", "times", "cpu_median"}
  assert len(stats["b"]["times"]) == 2


def test_markdown_table():
  assert timing.markdown_table(["x", "y"], [["a", 1.23456]]) == "| x | y |\n|---|---|\n| a | 1.23 |"


def test_aol_vs_plain(capsys, tmp_path):
  results = _check(capsys, tmp_path, aol_vs_plain.main, ["time / plain"])
  assert set(results["time_ratio"]) == {"aol", "aol_proto", "plain"}
  assert results["memory_ratio"]["plain"] == 1.0


def test_aol_vs_plain_memory_variants(capsys, tmp_path):
  path = tmp_path / "mem.json"
  aol_vs_plain.main(["--size", "tiny", "--memory-variants", "--json", str(path)])
  assert "memory / plain" in capsys.readouterr().out
  results = json.loads(path.read_text())["results"]
  assert results["plain"]["memory_ratio"] == 1.0


def test_gram(capsys, tmp_path):
  rows = _check(capsys, tmp_path, gram.main, ["fwd+bwd / baseline"])
  assert {r["method"] for r in rows} >= {"conv", "taps", "matmul"}


def test_gram_variants_match_the_core():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from aol_jax import rescaling
  from benchmarks import gram_variants as gv
  for shape in [(3, 3, 6, 5), (1, 1, 4, 6)]:
    k = jax.random.normal(jax.random.key(0), shape)
    probe = jax.random.normal(jax.random.key(1), shape)
    ref = rescaling.conv_gram(k, method="conv")
    ref_grad = jax.grad(lambda k: jnp.vdot(rescaling.rescale_conv(k, method="conv"), probe))(k)
    for m in gv.CONV_METHODS:
      np.testing.assert_allclose(jax.jit(gv.conv_gram_fn(m))(k), ref, rtol=1e-5, atol=1e-5)
      grad = jax.jit(jax.grad(lambda k: jnp.vdot(gv.rescale_conv_fn(m)(k), probe)))(k)
      np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
  p = jax.random.normal(jax.random.key(2), (12, 7))
  probe = jax.random.normal(jax.random.key(3), (12, 7))
  np.testing.assert_allclose(jax.jit(gv.rescale_dense_sym)(p), rescaling.rescale_dense(p),
                             rtol=1e-6)
  np.testing.assert_allclose(
      jax.jit(jax.grad(lambda p: jnp.vdot(gv.rescale_dense_sym(p), probe)))(p),
      jax.grad(lambda p: jnp.vdot(rescaling.rescale_dense(p), probe))(p), rtol=1e-5, atol=1e-6)


def test_certify_throughput(capsys, tmp_path):
  results = _check(capsys, tmp_path, certify_throughput.main, ["images/s"])
  assert results["throughput_ratio"] > 0


def test_vs_torch(capsys, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("orthogonium")
  from benchmarks import vs_torch
  results = _check(capsys, tmp_path, vs_torch.main, ["ours / theirs (median)"])
  assert "torch AOL (orthogonium)" in results["network"]
  assert "torch forward + kernel grad" in results["conv"]


def test_input_pipeline(capsys, tmp_path):
  from benchmarks import input_pipeline
  results = _check(capsys, tmp_path, input_pipeline.main, ["epoch / steps (median)"])
  assert results["steps"] == input_pipeline.STEPS["tiny"]
