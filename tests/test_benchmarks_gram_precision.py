"""benchmarks.gram_precision_quality: its conv norm against the explicit matrix's SVD, its
verdicts, and a tiny end-to-end run whose table and JSON agree with the runs it made."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aol_jax._src import lipschitz
from benchmarks import gram_precision_quality as gpq


@pytest.mark.parametrize("ksize,shape", [((3, 3), (5, 4, 3)), ((1, 3), (3, 6, 2)),
                                         ((5, 5), (4, 4, 2))])
def test_conv_norm_is_the_explicit_matrix_norm(ksize, shape):
  rng = np.random.default_rng(sum(ksize) + sum(shape))
  kernel = rng.standard_normal((*ksize, shape[-1], 4))
  k32 = jnp.asarray(kernel, jnp.float32)
  conv = lambda x: jax.lax.conv_general_dilated(
      x[None], k32.astype(x.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision="highest")[0]
  x = rng.standard_normal(shape)
  np.testing.assert_allclose(gpq.conv_apply(kernel, x), conv(jnp.asarray(x, jnp.float32)),
                             rtol=1e-5, atol=1e-5)
  y = rng.standard_normal(shape[:2] + (4,))  # the adjoint: <Ax, y> = <x, A^T y>
  np.testing.assert_allclose(np.vdot(gpq.conv_apply(kernel, x), y),
                             np.vdot(x, gpq.conv_apply_transpose(kernel, y)), rtol=1e-10)
  exact = lipschitz.operator_norm(conv, shape)  # float32 kernel, float64 SVD
  assert gpq.conv_norm(kernel, shape) == pytest.approx(exact, rel=1e-5)


def test_conv_norm_refuses_what_it_does_not_model():
  with pytest.raises(ValueError, match="SAME"):
    gpq.conv_norm(np.ones((3, 3, 2, 2)), (4, 4, 2), "CIRCULAR")
  with pytest.raises(ValueError, match="odd"):
    gpq.conv_norm(np.ones((2, 2, 2, 2)), (4, 4, 2))


def test_verdict():
  spread = lambda lo, hi: {"mean": (lo + hi) / 2, "min": lo, "max": hi}
  highest = spread(90.0, 92.0)
  assert gpq.verdict(spread(90.5, 91.5), highest) == "in"
  assert gpq.verdict(spread(91.2, 91.8), highest) == "in"  # highest's mean is outside bf16's
  assert gpq.verdict(spread(88.0, 90.0), highest) == "overlap"  # they share one point
  assert gpq.verdict(spread(91.5, 95.5), highest) == "overlap"  # mean 93.5, ranges meet
  assert gpq.verdict(spread(92.5, 93.0), highest) == "OUT"


def test_tiny_run_is_consistent(tmp_path, capsys):
  out = str(tmp_path / "out.json")
  payload = gpq.main(["--size", "tiny", "--workdir", str(tmp_path / "runs"), "--json", out])
  printed = capsys.readouterr().out
  with open(out) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(payload))  # the JSON is what main returned
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # written atomically
  runs, rows = saved["results"]["runs"], saved["results"]["rows"]
  assert sorted(r["gram_precision"] for r in runs) == sorted(gpq.PRECISIONS)
  assert {r["preset"] for r in runs} == {"digits"} and {r["epochs"] for r in runs} == {1}
  for r in runs:  # each run's record is its runner's results.json
    with open(os.path.join(r["workdir"], "results.json")) as f:
      results = json.load(f)
    assert r["clean_accuracy"] == results["clean_accuracy"] and r["cra"] == results["cra"]
    assert r["epochs_measured"] == [1]
    layers = r["norms"][0]["layers"]
    assert {l["kind"] for l in layers} == {"AOLConv", "AOLDense"}
    assert {l["gram_precision"] for l in layers} == {r["gram_precision"]}
    assert any(l["how"].startswith("Lanczos") for l in layers)  # a 3x3 conv was measured
    assert r["max_norm"] == max(l["norm"] for l in layers)
  by_precision = {r["gram_precision"]: r for r in runs}
  metrics = ["clean"] + [f"CRA {lab}" for lab in runs[0]["cra"]] + ["max exact layer norm"]
  assert [row["metric"] for row in rows] == metrics
  for row in rows:
    for p in gpq.PRECISIONS:  # one seed: mean = min = max = that run's value
      r = by_precision[p]
      value = (r["max_norm"] if row["metric"].startswith("max") else
               100 * (r["clean_accuracy"] if row["metric"] == "clean"
                      else r["cra"][row["metric"][4:]]))
      assert row[p] == {"mean": pytest.approx(value), "min": pytest.approx(value),
                        "max": pytest.approx(value)}
    if row["verdict"] is not None:
      assert row["verdict"] == gpq.verdict(row["bfloat16"], row["highest"])
    assert f"| digits | {row['metric']} | 1 | {gpq._cell(row['highest'], 6 if row['verdict'] is None else 1)}" in printed
  assert saved["title"] in printed and "digits 1 epochs" in saved["title"]
